"""Benchmark GPOTrainer against TRL's DPOTrainer on the same model, data and seed, in one process.

    python scripts/benchmark.py --json runs/benchmark.json          # hh-rlhf sample, 4-layer 256-wide Llama, CPU
    python scripts/benchmark.py --parts layouts --steps 6          # only the batch layouts

Part `losses`: TRL's DPO (`loss_type="sigmoid"`) and GPOTrainer with every built-in loss, for full fine-tuning and
LoRA, with and without precomputed reference log-probs, plus the floor: one forward+backward of the policy alone on
the same padded batch (fused LM head, no reference pass, no loss).
Part `layouts`: TRL's padded DPO against GPO (logistic) with padded, length-grouped, packed (`padding_free`),
prefix-shared and packed + prefix-shared batches, LoRA, at the same batch size and max_length.

How it measures. The trainers of one comparison are built side by side and take turns on the same batches (the same
row indices for everyone; the order of the turns rotates every step), so when this shared machine slows down for a
second it slows all of them alike. A timed step is what the Trainer does per batch: collate the rows, then
`training_step` (forward, reference pass unless precomputed, loss, metrics, backward); the optimizer step follows,
untimed (identical for all). Each ratio is taken per step against TRL on the same batch, and the table reports the
median of those ratios. tokens/s counts the real tokens of the pairs as TRL does (prompt + completion per sequence),
so every layout is credited with the same work. Peak memory: after timing, each trainer alone runs two steps while
the RSS is sampled (freed memory is first returned to the OS with malloc_trim), or the CUDA peak on a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from gpo_trl import GPOConfig, GPOTrainer, available_losses  # noqa: E402
from gpo_trl.data import check_dataset  # noqa: E402
from gpo_trl.demo import build_tokenizer  # noqa: E402
from gpo_trl.packing import is_packed, pair_units, sequence_units  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "tests" / "data" / "hh_rlhf_harmless_base_head300.jsonl"
LAYOUTS = {
    "padded": {},
    "length-grouped": {},  # padded, batches drawn by transformers' LengthGroupedSampler
    "packed": dict(padding_free=True),
    "prefix-shared": dict(prefix_sharing=True),
    "packed+prefix-shared": dict(padding_free=True, prefix_sharing=True),
}


class PeakMemory:
    """Peak memory while the block runs: CUDA peak allocated on a GPU, else the RSS increase (sampled every 2 ms)."""

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back, so the base is what is really in use
            self.process, self._running = psutil.Process(), True
            self.base = self.peak = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
        self.increase = max(self.peak - self.base, 0)


def build_model(path: Path, texts: list[str], seed: int) -> Path:
    tokenizer = build_tokenizer(texts, vocab_size=1024)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Contender:
    """One trainer (or the floor) that can take a timed step on given rows."""

    def __init__(self, name: str, trainer, floor: bool = False, grouped: bool = False):
        self.name, self.trainer, self.floor, self.grouped = name, trainer, floor, grouped
        self.times, self.collate_times, self.tokens, self.cells, self.filled = [], [], [], [], []
        if not floor:
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step

    def step(self, indices: list[int], record: bool):
        trainer = self.trainer
        start = time.perf_counter()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
        collated = time.perf_counter()
        if self.floor:
            batch = trainer._prepare_inputs(batch)
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                                use_cache=False, fused_lm_head=True)
            out.log_probs.sum().backward()
        else:
            trainer.training_step(trainer.model, batch)
        elapsed = time.perf_counter() - start
        if not self.floor:
            trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
        if record:
            self.times.append(elapsed)
            self.collate_times.append(collated - start)
            self.tokens.append(int(batch["sequence_lengths" if is_packed(batch) else "attention_mask"].sum()))
            self.cells.append(batch["input_ids"].numel())
            self.filled.append(self.tokens[-1] if not is_packed(batch) else self._filled_cells(indices))

    def _filled_cells(self, indices: list[int]) -> int:
        """Non-padding cells of a packed batch: the lengths of its units (a shared prompt counts once)."""
        padded = self.trainer._padded_collator([self.trainer.train_dataset[i] for i in indices])
        units = pair_units(padded) if self.trainer.args.prefix_sharing else sequence_units(padded)
        return sum(len(unit) for unit in units)


def make_trainer(kind: str, model_path: Path, dataset, args, lora: bool, precompute: bool, out: Path,
                 loss: str = "logistic", **layout):
    common = dict(output_dir=str(out), use_cpu=not torch.cuda.is_available(), bf16=False,
                  gradient_checkpointing=False, report_to=[], seed=args.seed, save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=1e-5,
                  precompute_ref_log_probs=precompute, dataloader_num_workers=0, disable_tqdm=True)
    if kind == "trl":
        trainer_cls, config = DPOTrainer, DPOConfig(loss_type="sigmoid", **common)
    else:
        trainer_cls, config = GPOTrainer, GPOConfig(gpo_loss=loss, **common, **layout)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    return trainer_cls(model=str(model_path), args=config, train_dataset=dataset, peft_config=peft)


def batches(dataset, args, grouped: bool) -> list[list[int]]:
    """Row indices of each measured batch: a seeded shuffle, or transformers' length-grouped sampler."""
    generator = torch.Generator().manual_seed(args.seed)
    if grouped:
        lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in dataset]
        order = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=generator))
    else:
        order = torch.randperm(len(dataset), generator=generator).tolist()
    count = args.warmup + args.steps
    return [order[i * args.batch:(i + 1) * args.batch] for i in range(count)]


def race(contenders: list[Contender], args) -> None:
    """Every contender steps on batch k before anyone moves to batch k+1; the order rotates each step."""
    dataset = contenders[0].trainer.train_dataset
    plain, grouped = batches(dataset, args, grouped=False), batches(dataset, args, grouped=True)
    for k in range(args.warmup + args.steps):
        shift = k % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.step((grouped if contender.grouped else plain)[k], record=k >= args.warmup)


def memory(contender: Contender, args) -> float:
    """Peak memory (MB) of two steps of this contender alone."""
    rows = batches(contender.trainer.train_dataset, args, grouped=contender.grouped)
    with PeakMemory() as peak:
        for indices in rows[:2]:
            contender.step(indices, record=False)
    return peak.increase / 2**20


def summarise(contenders: list[Contender], baseline: Contender, args, **fields) -> list[dict]:
    results = []
    for contender in contenders:
        ratios = [t / b for t, b in zip(contender.times, baseline.times)]
        step = statistics.median(contender.times)
        results.append({
            **fields, "name": contender.name, "step_time_s": step, "collate_s": statistics.median(contender.collate_times),
            "tokens_per_s": sum(contender.tokens) / sum(contender.times),
            "step_time_ratio": statistics.median(ratios),
            "tokens_per_s_ratio": statistics.median([1 / r for r in ratios]) if not contender.grouped else
            (sum(contender.tokens) / sum(contender.times)) / (sum(baseline.tokens) / sum(baseline.times)),
            "padding_fraction": 1 - sum(contender.filled) / sum(contender.cells),
            "peak_memory_mb": memory(contender, args) if args.memory else None,
        })
    base_memory = results[contenders.index(baseline)]["peak_memory_mb"]
    for result in results:
        if base_memory:
            result["memory_ratio"] = result["peak_memory_mb"] / base_memory
    return results


def part_losses(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    results = []
    for setting in args.settings:
        lora, precompute = "lora" in setting, "precompute" in setting
        trl = Contender("TRL DPO (sigmoid)", make_trainer("trl", model_path, dataset, args, lora, precompute, tmp))
        floor = Contender("floor (policy fwd+bwd)", trl.trainer, floor=True)
        gpo = [Contender(f"GPO {loss}", make_trainer("gpo", model_path, dataset, args, lora, precompute, tmp, loss))
               for loss in args.losses]
        race([trl, floor, *gpo], args)
        rows = summarise([trl, *gpo, floor], trl, args, part="losses", setting=setting)
        floor_step = rows[-1]["step_time_s"]
        for row, contender in zip(rows, [trl, *gpo, floor]):
            row["vs_floor"] = statistics.median([t / f for t, f in zip(contender.times, floor.times)])
        results += rows
        print_table(rows, f"setting: {setting} (floor {floor_step:.3f} s)")
        del trl, floor, gpo
        gc.collect()
    return results


def part_layouts(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    lora = True
    trl = Contender("TRL DPO padded", make_trainer("trl", model_path, dataset, args, lora, False, tmp))
    gpo = [Contender(f"GPO {name}", make_trainer("gpo", model_path, dataset, args, lora, False, tmp, **layout),
                     grouped=name == "length-grouped") for name, layout in LAYOUTS.items()]
    race([trl, *gpo], args)
    rows = summarise([trl, *gpo], trl, args, part="layouts", setting="lora")
    prompt_share = prompt_token_share(trl.trainer, batches(trl.trainer.train_dataset, args, grouped=False)[args.warmup:])
    for row in rows:
        row["prompt_token_share"] = prompt_share
    print_table(rows, f"batch layouts, LoRA (prompt tokens are {prompt_share:.0%} of the real tokens)")
    return rows


def prompt_token_share(trainer, index_batches) -> float:
    """Share of the pairs' real tokens (as TRL counts them) that are prompt tokens."""
    prompt = total = 0
    for indices in index_batches:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
        real = batch["attention_mask"].sum().item()
        prompt += real - batch["completion_mask"].sum().item()
        total += real
    return prompt / total


def print_table(rows: list[dict], title: str):
    print(f"\n{title}")
    header = f"{'trainer':<26}{'step s':>8}{'tok/s':>8}{'padding':>9}{'time/TRL':>9}{'tok/TRL':>9}{'peak MB':>9}" \
             f"{'mem/TRL':>9}{'/floor':>8}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        memory_cells = (f"{r['peak_memory_mb']:>9.0f}{r.get('memory_ratio', 0):>9.3f}" if r["peak_memory_mb"]
                        is not None else f"{'':>18}")
        floor = f"{r['vs_floor']:>8.2f}" if "vs_floor" in r else f"{'':>8}"
        print(f"{r['name']:<26}{r['step_time_s']:>8.3f}{r['tokens_per_s']:>8.0f}{r['padding_fraction']:>9.0%}"
              f"{r['step_time_ratio']:>9.3f}{r['tokens_per_s_ratio']:>9.3f}{memory_cells}{floor}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference JSONL (hh-rlhf layout by default)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per comparison")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="+", default=available_losses())
    parser.add_argument("--settings", nargs="+", default=["full", "lora", "full+precompute", "lora+precompute"])
    parser.add_argument("--parts", nargs="+", default=["losses", "layouts"], choices=["losses", "layouts"])
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    raw = load_dataset("json", data_files=args.data, split="train").select(range(args.rows))
    dataset, report = check_dataset(raw, Path(args.data).name)
    print(report)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = [row[k] for row in dataset for k in ("prompt", "chosen", "rejected")]
        model_path = build_model(Path(tmp) / "model", texts, args.seed)
        if "losses" in args.parts:
            results += part_losses(model_path, dataset, args, Path(tmp) / "out")
        if "layouts" in args.parts:
            results += part_layouts(model_path, dataset, args, Path(tmp) / "out")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
