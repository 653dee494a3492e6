"""Benchmark GPOTrainer against TRL's DPOTrainer on the same model, data and seed, in one process.

    python scripts/benchmark.py --json runs/benchmark.json          # hh-rlhf sample, 4-layer 256-wide Llama, CPU
    python scripts/benchmark.py --parts layouts --steps 6          # only the batch layouts
    python scripts/benchmark.py --parts reference_free --steps 6   # GPO with the reference against SimPO
    python scripts/benchmark.py --device cuda --scale qwen2.5-0.5b --markdown docs/benchmark-gpu.md   # on a GPU
    python -m benchmarks --parts overhead                          # the same entry point, from the repository root

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
benchmarks/memory.py), or the CUDA peak on a GPU.

The code: one module per part in benchmarks/ (losses.py, layouts.py, overhead.py, reference_free.py, gpu_scale.py)
over shared helpers (workload.py, contender.py, timing.py, memory.py); this is benchmarks/cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from datasets import load_dataset

from gpo_trl import available_losses
from gpo_trl.data import check_dataset

from .gpu_scale import SCALES, environment, resolve_defaults, write_markdown
from .layouts import part_layouts
from .losses import part_losses
from .overhead import part_overhead
from .reference_free import part_reference_free
from .workload import DEFAULT_DATA, build_model, tokenizer_texts


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
                        "rows; realistic scales: tests/data's 300-row hh-rlhf sample)")
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

