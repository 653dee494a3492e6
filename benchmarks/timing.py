"""The race between contenders, and its summary: the timing every part shares.

How it measures: all contenders of a comparison take turns on the same batches (the same row indices for everyone,
from a seeded shuffle, or transformers' length-grouped sampler for a length-grouped contender); every contender steps
on batch k before anyone moves to batch k+1, and the order of the turns rotates every step, so when a shared machine
slows down for a second it slows all of them alike. The first `--warmup` steps are not recorded. Each ratio is taken
per step against the baseline contender on the same batch, and the summary reports the median of those ratios, for
wall time and for the process's CPU time (tokens/s of a length-grouped contender: totals, its batches differ). Peak
memory (unless `--no-memory`): after timing, each contender alone runs two steps inside `PeakMemory`; the first
measurement is discarded (it also holds one-time allocations).
"""

from __future__ import annotations

import statistics

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from .contender import Contender
from .memory import PeakMemory


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

