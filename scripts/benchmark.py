"""Benchmark GPOTrainer against TRL's DPOTrainer on the same model, data and seed, in one process.

    python scripts/benchmark.py                      # hh-rlhf sample, 4-layer 256-wide Llama, CPU
    python scripts/benchmark.py --steps 12 --json runs/benchmark.json --losses logistic hinge

For each setting (full fine-tuning / LoRA, with / without precomputed reference log-probs) it runs TRL's DPO
(`loss_type="sigmoid"`) and then GPOTrainer with every requested loss, back to back, and reports the median step time,
tokens/s (non-padding tokens) and peak memory (RSS increase on the CPU, CUDA peak on a GPU) as ratios against the TRL
run of the same setting. It also times the floor, one forward+backward of the policy alone on the same batches with
no reference pass, and reports the padding fraction of the batches.
"""

from __future__ import annotations

import argparse
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
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from gpo_trl import GPOConfig, GPOTrainer, available_losses  # noqa: E402
from gpo_trl.data import check_dataset  # noqa: E402
from gpo_trl.demo import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "tests" / "data" / "hh_rlhf_harmless_base_head300.jsonl"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class PeakMemory:
    """Peak memory while the block runs: CUDA peak allocated on a GPU, else the RSS increase (sampled every 2 ms)."""

    def __enter__(self):
        gc.collect()
        self.process, self.peak, self._running = psutil.Process(), 0, True
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._running = False
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
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


def run(kind: str, loss: str | None, model_path: Path, dataset, args, lora: bool, precompute: bool, out: Path):
    common = dict(output_dir=str(out), use_cpu=not torch.cuda.is_available(), bf16=False,
                  gradient_checkpointing=False, report_to=[], seed=args.seed, save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=1e-5,
                  max_steps=args.warmup + args.steps, precompute_ref_log_probs=precompute, dataloader_num_workers=0,
                  disable_tqdm=True)
    if kind == "trl":
        trainer_cls, config = DPOTrainer, DPOConfig(loss_type="sigmoid", **common)
    else:
        trainer_cls, config = GPOTrainer, GPOConfig(gpo_loss=loss, **common)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    timer = StepTimer()
    trainer = trainer_cls(model=str(model_path), args=config, train_dataset=dataset, peft_config=peft,
                          callbacks=[timer])
    with PeakMemory() as memory:
        trainer.train()
    measured = timer.times[args.warmup:]
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e and "loss" in e]
    step_tokens = [b - a for a, b in zip([0, *tokens[:-1]], tokens)][args.warmup:]
    result = {"trainer": kind, "loss": loss or "sigmoid", "lora": lora, "precompute": precompute,
              "step_time_s": statistics.median(measured), "tokens_per_s": sum(step_tokens) / sum(measured),
              "peak_memory_increase_mb": memory.increase / 2**20, "peak_memory_mb": memory.peak / 2**20}
    floor = floor_time(trainer, args) if kind == "trl" else None
    del trainer
    gc.collect()
    return result, floor


def floor_time(trainer, args) -> dict:
    """Median forward+backward of the policy alone (fused LM head, no reference pass) on the training batches, and
    the padding fraction of those batches."""
    model = trainer.model.train()
    times, padding = [], []
    for index, batch in enumerate(trainer.get_train_dataloader()):
        if index >= args.warmup + args.steps:
            break
        batch = trainer._prepare_inputs(batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
        out.log_probs.sum().backward()
        model.zero_grad(set_to_none=True)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
        mask = batch["attention_mask"]
        padding.append(1 - mask.sum().item() / mask.numel())
    return {"floor_step_time_s": statistics.median(times), "padding_fraction": statistics.mean(padding)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference JSONL (hh-rlhf layout by default)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="+", default=available_losses())
    parser.add_argument("--settings", nargs="+", default=["full", "lora", "full+precompute", "lora+precompute"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    raw = load_dataset("json", data_files=args.data, split="train").select(range(args.rows))
    dataset, report = check_dataset(raw, Path(args.data).name)
    print(report)
    with tempfile.TemporaryDirectory() as tmp:
        texts = [row[k] for row in dataset for k in ("prompt", "chosen", "rejected")]
        model_path = build_model(Path(tmp) / "model", texts, args.seed)
        results, floors = [], {}
        run("trl", None, model_path, dataset, args, False, False, Path(tmp) / "o")  # warm-up: allocator, caches
        for setting in args.settings:
            lora, precompute = "lora" in setting, "precompute" in setting
            # TRL runs first and last in each setting (A B.. A): the ratios use the mean of the two, so drift in
            # the machine's speed or the allocator's footprint over the setting does not favour either side.
            first, floors[setting] = run("trl", None, model_path, dataset, args, lora, precompute, Path(tmp) / "o")
            gpo_results = []
            for loss in args.losses:
                result, _ = run("gpo", loss, model_path, dataset, args, lora, precompute, Path(tmp) / "o")
                gpo_results.append(result)
            last, _ = run("trl", None, model_path, dataset, args, lora, precompute, Path(tmp) / "o")
            baseline = {key: (first[key] + last[key]) / 2 if isinstance(first[key], float) else first[key]
                        for key in first}
            for result in [baseline, *gpo_results]:
                result["setting"] = setting
            for result in gpo_results:
                result["step_time_ratio"] = result["step_time_s"] / baseline["step_time_s"]
                result["tokens_per_s_ratio"] = result["tokens_per_s"] / baseline["tokens_per_s"]
                result["memory_ratio"] = result["peak_memory_mb"] / baseline["peak_memory_mb"]
                result["vs_floor"] = result["step_time_s"] / floors[setting]["floor_step_time_s"]
            results += [baseline, *gpo_results]
    print_table(results, floors)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "floors": floors}, indent=2))
    return results, floors


def print_table(results, floors):
    header = f"{'setting':<17}{'trainer':<24}{'step s':>8}{'tok/s':>9}{'peak MB':>9}{'time/TRL':>9}" \
             f"{'tok/TRL':>9}{'mem/TRL':>9}{'/floor':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        name = "TRL DPO (sigmoid)" if r["trainer"] == "trl" else f"GPO {r['loss']}"
        ratios = "".join(f"{r[k]:>9.3f}" if k in r else f"{'':>9}" for k in ("step_time_ratio", "tokens_per_s_ratio",
                                                                             "memory_ratio"))
        floor = f"{r['vs_floor']:>8.2f}" if "vs_floor" in r else f"{'':>8}"
        print(f"{r['setting']:<17}{name:<24}{r['step_time_s']:>8.3f}{r['tokens_per_s']:>9.0f}"
              f"{r['peak_memory_mb']:>9.0f}{ratios}{floor}")
    for setting, floor in floors.items():
        print(f"floor ({setting}): forward+backward of the policy alone {floor['floor_step_time_s']:.3f} s; "
              f"padding {floor['padding_fraction']:.0%} of the batch")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
