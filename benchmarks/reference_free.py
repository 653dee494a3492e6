"""Part `reference_free` (not in the default parts): GPO logistic with the reference against reference-free SimPO.

Per setting (`--reference_free_settings`: lora, full), ONE trainer instance built with the reference runs GPO logistic
with it (LoRA: the disabled-adapter reference pass; full fine-tuning: the separate reference model), SimPO
(`gpo_reference: none`, `gpo_length_normalize`, `gpo_margin`, set on the shared config for its own steps only) and
the floor, on the same weights, optimizer and batches; the model forwards of every step are counted (2 with the
reference, 1 without). Ratios are against GPO with the reference. Then, unless `--no-memory`, the peak memory of a
whole run, model load included (a reference-free full fine-tune loads no reference copy): separate instances built in
turn `--memory_rounds` times, the lowest of each kept.
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

import torch

from .contender import Contender
from .memory import PeakMemory
from .timing import batches, print_table, race, summarise
from .workload import make_trainer

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

