"""Benchmark GPOTrainer against TRL's DPOTrainer on the same model, data and seed, in one process.

    python scripts/benchmark.py --json runs/benchmark.json          # hh-rlhf sample, 4-layer 256-wide Llama, CPU
    python scripts/benchmark.py --parts layouts --steps 6          # only the batch layouts
    python scripts/benchmark.py --parts reference_free --steps 6   # GPO with the reference against SimPO
    python scripts/benchmark.py --device cuda --scale qwen2.5-0.5b --markdown docs/benchmark-gpu.md   # on a GPU

`--scale qwen2.5-0.5b` (or `qwen2.5-1.5b`) is the realistic mode: the model is built from that model's config shape
with random weights (nothing is downloaded), its real 151936-row LM head, a byte-level BPE trained on the hh-rlhf
sample (`--tokenizer_corpus`, target `--vocab_size` 32000; the size reached is reported), batch 8, max_length 1024,
bfloat16, and the `layouts` part for LoRA and full fine-tuning, with the attention kernels of each layout: packed
under sdpa and flash-attention (when flash_attn is installed), prefix-shared under the dense mask (sdpa) and under
FlexAttention (CUDA only: FlexAttention has no CPU backward). `--markdown FILE` writes the tables with the device,
the versions and the command.

Part `losses`: TRL's DPO (`loss_type="sigmoid"`) and GPOTrainer with every built-in loss, for full fine-tuning and
LoRA, with and without precomputed reference log-probs, plus the floor: one forward+backward of the policy alone on
the same padded batch (fused LM head, no reference pass, no loss).
Part `layouts`: TRL's padded DPO against GPO (logistic) with padded, length-grouped, packed (`padding_free`),
prefix-shared and packed + prefix-shared batches, LoRA, at the same batch size and max_length.
Part `overhead`: the milliseconds GPO's code adds around the model per step (loss, metrics and their backward, replayed
on recorded outputs, plus the gradient finiteness check), against TRL's, with a low enough noise to check the 2% target.
Part `reference_free` (not in the default parts): GPO logistic with the reference (LoRA: the disabled-adapter
reference pass; full fine-tuning: the separate reference model) against reference-free SimPO (`gpo_reference: none`,
`gpo_length_normalize`, `gpo_margin`) and the floor, for LoRA and full fine-tuning, all on the instance built with the
reference (the reference-free contender switches `gpo_reference` to `none` for its own steps), with the model forwards
counted per step; then the peak memory of a whole run, model load included, on separate instances.

How it measures. The code paths of one comparison run on ONE GPOTrainer instance: TRL's (DPOTrainer's own
`training_step` and `_compute_loss`, called on the instance; GPOConfig keeps TRL's `loss_type: sigmoid`), GPO's with
each loss, and the floor. They share the model weights in memory, the optimizer and the batches, so nothing but the
code differs; separate instances of one model measurably run at different speeds here (a separate `DPOTrainer`
instance, "TRL DPOTrainer, own model", runs alongside to show how much). The paths take turns on the same batches
(the same row indices for everyone; the order of the turns rotates every step), so when this shared machine slows
down for a second it slows all of them alike. A timed step is what the Trainer does per batch: collate the rows,
then `training_step` (forward, reference pass unless precomputed, loss, metrics, backward); the optimizer step
follows, untimed. Each ratio is taken per step against TRL on the same batch, and the table reports the median of
those ratios, for wall time and for the process's CPU time. tokens/s counts the real tokens of the pairs as TRL does
(prompt + completion per sequence), so every layout is credited with the same work. Peak memory: after timing, each
path alone runs two steps while the RSS is sampled, with glibc made to return freed blocks to the OS (see
PeakMemory), or the CUDA peak on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import gzip  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from gpo_trl import GPOConfig, GPOTrainer, available_losses, get_loss  # noqa: E402
from gpo_trl.data import check_dataset  # noqa: E402
from gpo_trl.guards import all_finite  # noqa: E402
from gpo_trl.demo import build_tokenizer  # noqa: E402
from gpo_trl.packing import PackedPreferenceCollator, is_packed, pair_units, sequence_units  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "tests" / "data" / "hh_rlhf_harmless_base_head300.jsonl"
# The full hh-rlhf sample (2312 rows) where the checkout has the shared data next to it, for the realistic tokenizer
SHARED_CORPUS = [REPO / "shared" / "data" / "hh_rlhf_harmless_base" / "test.jsonl.gz",
                 REPO.parent / "shared" / "data" / "hh_rlhf_harmless_base" / "test.jsonl.gz"]
# Model shapes (from the public configs of these models; random weights). `toy` is the CPU benchmark's.
SCALES = {
    "toy": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


class PeakMemory:
    """Peak memory while the block runs: CUDA peak allocated on a GPU, else the RSS increase (sampled every 2 ms).

    On the CPU, torch allocates with glibc malloc, which keeps freed blocks for reuse, so an RSS increase would depend
    on what earlier trainers in this process left behind. While measuring, blocks of 64 KiB and more are mmapped and
    unmapped on free (M_MMAP_THRESHOLD), so the RSS follows the memory in use; the default is restored after.
    """

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            _libc().malloc_trim(0)  # hand freed pages back, so the base is what is really in use
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
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's initial threshold
        self.increase = max(self.peak - self.base, 0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():
    return ctypes.CDLL("libc.so.6")


def _mallopt(parameter: int, value: int):
    _libc().mallopt(parameter, value)


def build_model(path: Path, texts: list[str], args) -> Path:
    """A random-init model of `args.scale`'s shape and a BPE tokenizer trained on `texts`, saved to `path`."""
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    shape = dict(SCALES[args.scale])
    shape.setdefault("vocab_size", len(tokenizer))  # realistic scales keep their real LM head (more rows than used)
    config = AutoConfig.for_model(shape.pop("model_type"), eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    args.model_info = {"scale": args.scale, "parameters": sum(p.numel() for p in model.parameters()),
                       "model_vocab": config.vocab_size, "tokenizer_vocab": len(tokenizer)}
    return path


def tokenizer_texts(dataset, args) -> list[str]:
    """The tokenizer's training text: `--tokenizer_corpus` (hh-rlhf JSONL, gzipped or not), else the benchmark rows."""
    if not args.tokenizer_corpus:
        return [row[k] for row in dataset for k in ("prompt", "chosen", "rejected")]
    opener = gzip.open if args.tokenizer_corpus.endswith(".gz") else open
    with opener(args.tokenizer_corpus, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [row[k] for row in rows for k in ("chosen", "rejected")]


def synchronize():
    """Wait for queued CUDA kernels, so a wall-clock interval covers the work it launched."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_attention(trainer, attention: str | None):
    """Switch the attention kernels of the trainer's models in place (same weights): transformers'
    `set_attn_implementation`, on the base model under PEFT, and on a separate reference model."""
    if attention is None or trainer._attn_implementation == attention:
        return
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(attention)
    trainer._attn_implementation = attention


class Contender:
    """One code path that takes a timed step on given rows: `trl` (DPOTrainer's training_step and _compute_loss),
    `gpo` (GPOTrainer's, with `loss`), or `floor`; on a trainer, with a collator (the batch layout)."""

    def __init__(self, name: str, trainer, kind: str = "gpo", loss: str | None = None, collator=None,
                 grouped: bool = False, attention: str | None = None, config: dict | None = None):
        self.name, self.trainer, self.kind, self.grouped, self.attention = name, trainer, kind, grouped, attention
        self.loss = get_loss(loss) if loss else None
        self.collator = collator or trainer.data_collator
        self.config = config or {}  # GPOConfig fields set on the shared trainer for this contender's steps only
        self.times, self.cpu_times, self.collate_times, self.tokens, self.cells, self.filled = [], [], [], [], [], []
        self.forwards = []  # model forwards (policy and reference) per recorded step
        if trainer.optimizer is None:
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step

    def step(self, indices: list[int], record: bool):
        trainer = self.trainer
        if self.loss is not None:
            trainer.gpo_loss = self.loss
        set_attention(trainer, self.attention)
        with config_fields(trainer.args, self.config), counted_forwards(trainer) as forwards:
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            batch = self.collator([trainer.train_dataset[i] for i in indices])
            collated = time.perf_counter()
            if self.kind == "floor":
                batch = trainer._prepare_inputs(batch)
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=labels, use_cache=False, fused_lm_head=True)
                out.log_probs.sum().backward()
            elif self.kind == "trl":
                with trl_code_path(trainer):
                    DPOTrainer.training_step(trainer, trainer.model, batch)
            else:
                trainer.training_step(trainer.model, batch)
            synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if self.kind != "floor":
            trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
        if record:
            self.times.append(elapsed)
            self.forwards.append(forwards[0])
            self.cpu_times.append(cpu)
            self.collate_times.append(collated - start)
            self.tokens.append(int(batch["sequence_lengths" if is_packed(batch) else "attention_mask"].sum()))
            self.cells.append(batch["input_ids"].numel())
            self.filled.append(self.tokens[-1] if not is_packed(batch) else self._filled_cells(indices))

    def _filled_cells(self, indices: list[int]) -> int:
        """Non-padding cells of a packed batch: the lengths of its units (a shared prompt counts once)."""
        padded = self.trainer._padded_collator([self.trainer.train_dataset[i] for i in indices])
        units = pair_units(padded) if self.collator.prefix_sharing else sequence_units(padded)
        return sum(len(unit) for unit in units)


@contextlib.contextmanager
def config_fields(config, fields: dict):
    """Set these config fields for the block (the contender's variant of the shared trainer), then restore them."""
    saved = {name: getattr(config, name) for name in fields}
    for name, value in fields.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def counted_forwards(trainer):
    """Count the transformer forwards in the block, policy and reference alike: every one embeds its input ids once,
    so a hook on the input embeddings of the policy and of a separate reference model sees each pass exactly once
    (under LoRA the disabled-adapter reference pass runs the policy's own embeddings)."""
    count = [0]
    embeddings = {id(m.get_input_embeddings()): m.get_input_embeddings()
                  for m in (trainer.model, trainer.ref_model) if m is not None}

    def hook(*_):
        count[0] += 1

    handles = [module.register_forward_hook(hook) for module in embeddings.values()]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def trl_code_path(trainer):
    """Run TRL's DPOTrainer._compute_loss on this trainer instance (GPOConfig keeps TRL's loss_type: sigmoid)."""
    if isinstance(trainer, GPOTrainer):
        trainer._compute_loss = types.MethodType(DPOTrainer._compute_loss, trainer)
    try:
        yield
    finally:
        trainer.__dict__.pop("_compute_loss", None)


def make_trainer(kind: str, model_path: Path, dataset, args, lora: bool, precompute: bool, out: Path,
                 loss: str = "logistic", **layout):
    common = dict(output_dir=str(out), use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
                  model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"},
                  activation_checkpointing=False, report_to=[], seed=args.seed, save_strategy="no", logging_steps=1,
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
    if args.memory:  # discarded: the first measurement also holds one-time allocations (seen: +7% on TRL, first)
        memory(contenders[0], args)
    for contender in contenders:
        ratios = [t / b for t, b in zip(contender.times, baseline.times)]
        cpu_ratios = [t / b for t, b in zip(contender.cpu_times, baseline.cpu_times)]
        step = statistics.median(contender.times)
        results.append({
            **fields, "name": contender.name, "step_time_s": step, "collate_s": statistics.median(contender.collate_times),
            "tokens_per_s": sum(contender.tokens) / sum(contender.times),
            "step_time_ratio": statistics.median(ratios), "step_time_ratios": ratios,
            "cpu_time_ratio": statistics.median(cpu_ratios), "step_times_s": contender.times,
            "tokens_per_s_ratio": statistics.median([1 / r for r in ratios]) if not contender.grouped else
            (sum(contender.tokens) / sum(contender.times)) / (sum(baseline.tokens) / sum(baseline.times)),
            "padding_fraction": 1 - sum(contender.filled) / sum(contender.cells),
            "forwards_per_step": contender.forwards,
            "tokens_per_step": contender.tokens, "cells_per_step": contender.cells, "filled_per_step": contender.filled,
            "peak_memory_mb": memory(contender, args) if args.memory else None,
        })
    base_memory = results[contenders.index(baseline)]["peak_memory_mb"]
    for result in results:
        if base_memory:
            result["memory_ratio"] = result["peak_memory_mb"] / base_memory
    return results


def part_losses(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    """Per setting, one GPOTrainer instance runs TRL's code path, GPO's with every loss, and the floor, so they share
    the model weights in memory, the optimizer and the batches; a separate DPOTrainer instance runs alongside."""
    results = []
    for setting in args.settings:
        lora, precompute = "lora" in setting, "precompute" in setting
        shared = make_trainer("gpo", model_path, dataset, args, lora, precompute, tmp)
        trl = Contender("TRL DPO (sigmoid)", shared, kind="trl")
        own = Contender("TRL DPOTrainer, own model", make_trainer("trl", model_path, dataset, args, lora, precompute,
                                                                  tmp), kind="trl")
        floor = Contender("floor (policy fwd+bwd)", shared, kind="floor")
        gpo = [Contender(f"GPO {loss}", shared, loss=loss) for loss in args.losses]
        contenders = [trl, *gpo, own, floor]
        race(contenders, args)
        rows = summarise(contenders, trl, args, part="losses", setting=setting)
        for row, contender in zip(rows, contenders):
            row["vs_floor"] = statistics.median([t / f for t, f in zip(contender.times, floor.times)])
        results += rows
        print_table(rows, f"setting: {setting} (floor {rows[-1]['step_time_s']:.3f} s)")
        del shared, trl, own, floor, gpo, contenders
        gc.collect()
    return results


def part_layouts(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    """TRL's padded DPO against GPO (logistic) in every batch layout and attention kernel that runs here, per setting
    (LoRA, full fine-tuning), all on one trainer instance (the kernels are switched in place, same weights)."""
    results = []
    for setting in args.layout_settings:
        trainer = make_trainer("gpo", model_path, dataset, args, setting == "lora", False, tmp)
        trainer._attn_implementation = trainer.model.config._attn_implementation
        contenders = layout_contenders(trainer, args)
        race(contenders, args)
        rows = summarise(contenders, contenders[0], args, part="layouts", setting=setting)
        prompt_share = prompt_token_share(trainer, batches(trainer.train_dataset, args, grouped=False)[args.warmup:])
        for row, contender in zip(rows, contenders):
            row["prompt_token_share"] = prompt_share
            row["attention"] = contender.attention or "sdpa"
        print_table(rows, f"batch layouts, {setting} (prompt tokens are {prompt_share:.0%} of the real tokens)")
        results += rows
        set_attention(trainer, "sdpa")
        del trainer, contenders
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def layout_contenders(trainer, args) -> list[Contender]:
    padded = trainer._padded_collator
    pad = trainer._tokenizer.pad_token_id

    def packed(**layout):
        return PackedPreferenceCollator(padded, pad_token_id=pad, row_length=args.max_length, **layout)

    gpo = dict(trainer=trainer, loss="logistic")
    contenders = [Contender("TRL DPO padded", trainer, kind="trl", collator=padded),
                  Contender("GPO padded", collator=padded, **gpo),
                  Contender("GPO length-grouped", collator=padded, grouped=True, **gpo),
                  Contender("GPO packed", collator=packed(padding_free=True), **gpo),
                  Contender("GPO prefix-shared", collator=packed(padding_free=False, prefix_sharing=True), **gpo),
                  Contender("GPO packed+prefix-shared", collator=packed(padding_free=True, prefix_sharing=True), **gpo)]
    if args.device != "cpu" and args.dtype != "float32" and is_flash_attn_2_available():
        contenders.append(Contender("GPO packed, flash-attention", collator=packed(padding_free=True),
                                    attention="flash_attention_2", **gpo))
    if args.device != "cpu":  # FlexAttention has no CPU backward
        contenders.append(Contender("GPO packed+prefix-shared, flex", attention="flex_attention", collator=packed(
            padding_free=True, prefix_sharing=True, block_mask=True), **gpo))
    else:
        print("(CPU: the FlexAttention layout is left out, FlexAttention has no CPU backward; flash-attention needs CUDA)")
    for contender in contenders:  # the kernels are switched before each step: the others run under sdpa
        contender.attention = contender.attention or "sdpa"
    return contenders


# SimPO's loss in GPO's terms (gamma 0.5 at the config's beta; the values do not change the work of a step)
SIMPO = dict(gpo_reference="none", gpo_length_normalize=True, gpo_margin=0.5)


def part_reference_free(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    """GPO logistic with the reference (LoRA: the disabled-adapter pass; full: the separate reference model) against
    reference-free SimPO and the floor, per setting, on ONE trainer instance built with the reference: the
    reference-free contender sets `gpo_reference: none` (and SimPO's fields) for its own steps only, so the same
    weights, optimizer and batches serve both. The step's peak memory is measured on that instance; the memory of a
    whole run, model load included (a reference-free full fine-tune loads no reference copy), on separate instances."""
    results = []
    for setting in args.reference_free_settings:
        lora = setting == "lora"
        trainer = make_trainer("gpo", model_path, dataset, args, lora, False, tmp)
        contenders = [Contender("GPO logistic, reference", trainer, loss="logistic"),
                      Contender("SimPO (reference-free)", trainer, loss="logistic", config=SIMPO),
                      Contender("floor (policy fwd+bwd)", trainer, kind="floor")]
        race(contenders, args)
        rows = summarise(contenders, contenders[0], args, part="reference_free", setting=setting)
        for row, contender in zip(rows, contenders):
            row["vs_floor"] = statistics.median([t / f for t, f in zip(contender.times, contenders[2].times)])
        del trainer, contenders
        gc.collect()
        if args.memory:
            with_load = run_memory(model_path, dataset, args, tmp, lora)
            for row, key in zip(rows, ("reference", "reference_free")):
                row["peak_memory_with_load_mb"] = with_load[key]
                row["memory_with_load_ratio"] = with_load[key] / with_load["reference"]
        print_table(rows, f"reference-free, {setting}; ratios (/TRL columns) against GPO with the reference; model "
                    "forwards per step: "
                    + ", ".join(f"{r['name']} {statistics.median(r['forwards_per_step']):.0f}" for r in rows))
        if args.memory:
            print(f"peak memory of a run, model load + two steps (separate instances, lowest of {args.memory_rounds}): "
                  f"reference "
                  f"{with_load['reference']:.0f} MB, reference-free {with_load['reference_free']:.0f} MB "
                  f"({rows[1]['memory_with_load_ratio']:.3f})")
        results += rows
    return results


def run_memory(model_path: Path, dataset, args, tmp: Path, lora: bool) -> dict[str, float]:
    """Peak memory (MB) of building a trainer (models loaded: the policy, and for a full fine-tune with the reference
    a second copy) and taking two steps, with and without the reference; separate instances, built in turn
    `--memory_rounds` times (reference, reference-free, reference, reference-free, ...), the lowest of each kept (the
    first build can also hold one-time allocations)."""
    peaks = {"reference": [], "reference_free": []}
    for _ in range(args.memory_rounds):
        for key, config in (("reference", {}), ("reference_free", SIMPO)):
            with PeakMemory() as peak:
                trainer = make_trainer("gpo", model_path, dataset, args, lora, False, tmp, **config)
                contender = Contender(key, trainer)
                for indices in batches(trainer.train_dataset, args, grouped=False)[:2]:
                    contender.step(indices, record=False)
                del trainer, contender
            peaks[key].append(peak.increase / 2**20)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {key: min(values) for key, values in peaks.items()}


class Replay(torch.nn.Module):
    """Stands in for the model and returns recorded fused-head outputs: what is left to time is the code around the
    forward (loss, metrics, their backward), which is all that differs between TRL's step and GPO's."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs


def part_overhead(model_path: Path, dataset, args, tmp: Path, repeats: int = 200) -> list[dict]:
    """The per-step cost of GPO's code outside the model, against TRL's, measured in isolation (milliseconds are
    below what whole-step timing can resolve on this machine): each loss path replayed on recorded outputs of a
    real batch, plus GPO's gradient finiteness check on the real gradients of a full fine-tuning step."""
    trainer = make_trainer("gpo", model_path, dataset, args, False, True, tmp)
    Contender("setup", trainer)  # optimizer and accumulation state, as in the other parts
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)]))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    start = time.perf_counter()
    outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            use_cache=False, fused_lm_head=True)
    outputs.log_probs.sum().backward()
    model_step = time.perf_counter() - start
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    outputs = type(outputs)(**{k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v)
                               for k, v in outputs.items()})
    replay = Replay(outputs)

    def loss_path(run) -> float:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            run(replay, batch, False).backward()
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    trl_ms = 1e3 * loss_path(types.MethodType(DPOTrainer._compute_loss, trainer))
    rows = [{"part": "overhead", "name": "TRL DPO (sigmoid)", "loss_path_ms": trl_ms}]
    for loss in args.losses:
        trainer.gpo_loss = get_loss(loss)
        rows.append({"part": "overhead", "name": f"GPO {loss}", "loss_path_ms": 1e3 * loss_path(trainer._compute_loss)})
    check = []
    for _ in range(repeats // 4):
        begin = time.perf_counter()
        all_finite(trainer.accelerator, [torch.stack(torch._foreach_norm(grads))])
        check.append(time.perf_counter() - begin)
    check_ms = 1e3 * statistics.median(check)
    print(f"\noverhead: the code around the model per step (full fine-tuning, batch {args.batch}, precomputed reference; "
          f"one policy forward+backward of this batch takes {1e3 * model_step:.0f} ms)")
    for row in rows:
        row["gradient_check_ms"] = check_ms if row["name"].startswith("GPO") else 0.0
        row["extra_ms_vs_trl"] = row["loss_path_ms"] + row["gradient_check_ms"] - trl_ms
        row["extra_share_of_model_step"] = row["extra_ms_vs_trl"] / (1e3 * model_step)
        print(f"{row['name']:<26} loss path {row['loss_path_ms']:6.2f} ms  + gradient check {row['gradient_check_ms']:5.2f} ms"
              f"  = {row['extra_ms_vs_trl']:+6.2f} ms vs TRL ({row['extra_share_of_model_step']:+.2%} of the model step)")
    return rows


def prompt_token_share(trainer, index_batches) -> float:
    """Share of the pairs' real tokens (as TRL counts them) that are prompt tokens."""
    prompt = total = 0
    for indices in index_batches:
        batch = trainer._padded_collator([trainer.train_dataset[i] for i in indices])
        real = batch["attention_mask"].sum().item()
        prompt += real - batch["completion_mask"].sum().item()
        total += real
    return prompt / total


def print_table(rows: list[dict], title: str):
    print(f"\n{title}")
    header = f"{'trainer':<26}{'step s':>8}{'tok/s':>8}{'padding':>9}{'time/TRL':>9}{'cpu/TRL':>9}{'tok/TRL':>9}" \
             f"{'peak MB':>9}{'mem/TRL':>9}{'/floor':>8}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        memory_cells = (f"{r['peak_memory_mb']:>9.0f}{r.get('memory_ratio', 0):>9.3f}" if r["peak_memory_mb"]
                        is not None else f"{'':>18}")
        floor = f"{r['vs_floor']:>8.2f}" if "vs_floor" in r else f"{'':>8}"
        print(f"{r['name']:<26}{r['step_time_s']:>8.3f}{r['tokens_per_s']:>8.0f}{r['padding_fraction']:>9.0%}"
              f"{r['step_time_ratio']:>9.3f}{r['cpu_time_ratio']:>9.3f}{r['tokens_per_s_ratio']:>9.3f}"
              f"{memory_cells}{floor}")


def environment() -> dict:
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")}
    if is_flash_attn_2_available():
        versions["flash-attn"] = importlib.metadata.version("flash_attn")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    return {"device": device, "cuda": torch.version.cuda, "python": platform.python_version(), **versions}


def write_markdown(path: str, results: list[dict], args, argv: list[str]):
    """The layout tables as markdown, with the device, the versions, the model and the exact command."""
    env = environment()
    info = args.model_info
    lines = [f"# GPO batch layouts on {env['device']}", "",
             f"Command: `python scripts/benchmark.py {' '.join(argv)}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             f"Model: `{info['scale']}` shape, random weights, {info['parameters'] / 1e6:.0f}M parameters, LM head "
             f"{info['model_vocab']} rows; tokenizer: byte-level BPE with {info['tokenizer_vocab']} tokens; "
             f"{args.dtype}; batch {args.batch}, max_length {args.max_length}; {args.steps} measured steps after "
             f"{args.warmup} warm-up; ratios are medians of per-step ratios to TRL on the same batch (tokens/s of the "
             "length-grouped run: totals, its batches differ). Peak memory: torch.cuda.max_memory_allocated over two "
             "steps above what was allocated before (on the CPU: RSS increase).", ""]
    for setting in args.layout_settings:
        rows = [r for r in results if r["part"] == "layouts" and r["setting"] == setting]
        if not rows:
            continue
        lines += [f"## {setting}", "", "| layout | attention | padding | step s | step / TRL | tokens/s | tokens/s / TRL "
                  "| peak MiB | memory / TRL |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            memory_cells = (f"{r['peak_memory_mb']:.0f} | {r.get('memory_ratio', float('nan')):.3f}"
                            if r["peak_memory_mb"] is not None else "- | -")
            lines.append(f"| {r['name']} | {r['attention']} | {r['padding_fraction']:.0%} | {r['step_time_s']:.3f} | "
                         f"{r['step_time_ratio']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_ratio']:.2f}x | "
                         f"{memory_cells} |")
        lines.append("")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


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
    parser.add_argument("--parts", nargs="+", default=["losses", "layouts", "overhead"],
                        choices=["losses", "layouts", "overhead", "reference_free"],
                        help="reference_free (not run by default): GPO with the reference against SimPO")
    parser.add_argument("--reference_free_settings", nargs="+", choices=["lora", "full"], default=["lora", "full"],
                        help="fine-tuning settings of the reference_free part")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--memory_rounds", type=int, default=2, help="reference_free part: builds of each trainer "
                        "for the peak memory with the model load (the lowest is kept)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument("--scale", choices=list(SCALES), default="toy",
                        help="model shape; a realistic one sets batch 8, max_length 1024, bfloat16, the layouts part")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 (toy), bfloat16 (others)")
    parser.add_argument("--vocab_size", type=int, help="BPE target (default 1024 toy, 32000 others)")
    parser.add_argument("--tokenizer_corpus", help="hh-rlhf JSONL(.gz) to train the BPE on (default: the benchmark "
                        "rows; realistic scales: the shared 2312-row sample when present)")
    parser.add_argument("--layout_settings", nargs="+", choices=["lora", "full"],
                        help="fine-tuning settings of the layouts part (default: lora; realistic scales: lora full)")
    parser.add_argument("--markdown", help="write the layout tables as markdown here (e.g. docs/benchmark-gpu.md)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    resolve_defaults(args, argv, parser)

    raw = load_dataset("json", data_files=args.data, split="train").select(range(args.rows))
    dataset, report = check_dataset(raw, Path(args.data).name)
    print(report)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(Path(tmp) / "model", tokenizer_texts(dataset, args), args)
        if "losses" in args.parts:
            results += part_losses(model_path, dataset, args, Path(tmp) / "out")
        if "layouts" in args.parts:
            results += part_layouts(model_path, dataset, args, Path(tmp) / "out")
        if "overhead" in args.parts:
            results += part_overhead(model_path, dataset, args, Path(tmp) / "out")
        if "reference_free" in args.parts:
            results += part_reference_free(model_path, dataset, args, Path(tmp) / "out")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "environment": environment(), "results": results},
                                              indent=2))
    if args.markdown:
        write_markdown(args.markdown, results, args, argv)
    return results


def resolve_defaults(args, argv: list[str], parser):
    """Defaults that depend on the device and the scale; an explicit command-line value always wins."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a machine with CUDA: hide the GPUs with CUDA_VISIBLE_DEVICES= instead")
    realistic = args.scale != "toy"
    if realistic:
        for key, value in {"--batch": 8, "--max_length": 1024, "--parts": ["layouts"]}.items():
            if key not in given:
                setattr(args, key[2:], value)
        if args.tokenizer_corpus is None:
            args.tokenizer_corpus = next((str(p) for p in SHARED_CORPUS if p.exists()), None)
    args.dtype = args.dtype or ("bfloat16" if realistic else "float32")
    args.vocab_size = args.vocab_size or (32000 if realistic else 1024)
    args.layout_settings = args.layout_settings or (["lora", "full"] if realistic else ["lora"])
    if args.dtype == "bfloat16" and args.device == "cpu":
        parser.error("--dtype bfloat16 is for the GPU; the CPU benchmark runs float32")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
