"""Benchmarks of GPOTrainer against TRL's DPOTrainer: one module per part, over shared timing and memory helpers.

    python -m benchmarks --help                  # from the repository root; `python scripts/benchmark.py` is the same

Parts (each a `part_*(model_path, dataset, args, tmp) -> list[dict]` of result rows, chosen with `--parts`):
- losses.py: the whole training step of TRL's DPO and of GPO with every loss, plus the floor (policy fwd+bwd).
- layouts.py: TRL's padded DPO against GPO in every batch layout (padded, length-grouped, packed, prefix-shared) and
  attention kernel that runs on the device.
- overhead.py: the milliseconds of GPO's code around the model (loss path replayed on recorded outputs, gradient check).
- reference_free.py: GPO with the reference against reference-free SimPO: time, forwards and memory per step and run.
- gpu_scale.py: the realistic model shapes for a GPU, the defaults that follow from --device/--scale, the markdown.
Shared helpers:
- workload.py: the random-init model, its BPE tokenizer and the trainers every part builds.
- contender.py: one code path (TRL, GPO with a loss, the floor) and its timed step on a shared trainer instance.
- timing.py: the race (same batches, rotating turns), the per-step ratios and medians, the printed table.
- memory.py: peak memory of a block (CUDA peak, or the sampled RSS with glibc returning freed blocks).
- cli.py: the command line (flags, JSON and markdown outputs); its docstring is `--help`.
"""

import os
from pathlib import Path

# Before datasets/transformers are imported by any module of the package: offline, and no progress bars in the tables
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
