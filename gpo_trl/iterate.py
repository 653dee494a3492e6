"""Iterative (on-policy) GPO: sample from the current policy, let a judge rank the samples, train on the fresh pairs,
repeat. `gpo-trl iterate --config rounds.yaml`.

    # rounds.yaml
    base: ../demo.yaml                 # the training recipe (relative to this file); its model starts round 1
    output_dir: runs/iterate-demo
    prompts: {path: json, data_files: prompts.jsonl}   # any `datasets:` source; only the prompts are used
    max_prompts: 64                    # the first distinct prompts (default: all)
    rounds: 3
    samples_per_prompt: 4              # >= 2
    generation: {max_new_tokens: 64, temperature: 1.0, top_p: 1.0, batch_size: 16}
    generation_backend: transformers   # or vllm (when installed)
    judge: {aux: length, weight: -1}   # see gpo_trl.judges
    pairing: best_vs_worst             # all_pairs, random_pair; ties are dropped and counted
    reference: initial                 # or previous: the reference of round K is round K-1's policy
    overrides: {num_train_epochs: 2}   # recipe keys for every round's training
    launch: []                         # options for `accelerate launch`, as for `gpo-trl train`; [] trains in-process
    seed: 0

Round K samples from the policy of round K-1 (round 0: the recipe's model), scores and pairs the samples, writes
`round_K/samples.jsonl` and `round_K/pairs.jsonl` (a recipe source: prompt, chosen, rejected, scores), trains with the
recipe (the same `gpo_trl.recipe.main` as `gpo-trl train`, so LoRA, QLoRA and accelerate work) starting from that
policy, and saves the adapter to `round_K/adapter`. A LoRA adapter is then merged into `round_K/policy`, where round
K+1 starts. The reference is the initial model (`reference: initial`, passed as `ref_model_name_or_path`) or the
round's starting policy (`previous`: the base with the adapter disabled, no extra model in memory).

`round_K/round.json` marks a finished round; its row is also in `rounds.jsonl` / `rounds.csv`. A rerun skips the
finished rounds and, inside an unfinished round, reuses its pairs if they were written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .auxiliary import as_text
from .data import PreferenceSource
from .generation import (GenerationSettings, check_backend, check_keys, load_prompts, make_generation,
                         make_prompt_source, sample_completions, sample_with_vllm)
from .guards import write_text_atomic
from .judges import PAIRINGS, Judge, make_judge, make_pairs, score_samples
from .recipe import ConfigError, parse_args, read_yaml_file

REFERENCES = ("initial", "previous")
_REQUIRED = ("base", "output_dir", "prompts", "rounds", "judge")
_KEYS = [*_REQUIRED, "max_prompts", "samples_per_prompt", "generation", "generation_backend", "pairing", "reference",
         "overrides", "launch", "seed"]
# Set by iterate for each round; an override of them would break the rounds' chaining.
_ROUND_KEYS = ("model_name_or_path", "output_dir", "datasets", "ref_model_name_or_path")
_ROUND_DEFAULTS = {"prepare_demo_assets": False, "eval_before_training": False}


@dataclass
class IteratePlan:
    base: Path
    output_dir: Path
    prompts: PreferenceSource
    rounds: int
    judge: Judge
    max_prompts: int | None = None
    samples_per_prompt: int = 4
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    generation_backend: str = "transformers"
    pairing: str = "best_vs_worst"
    reference: str = "initial"
    overrides: dict = field(default_factory=dict)
    launch: list[str] = field(default_factory=list)
    seed: int = 0


def load_plan(path: str) -> IteratePlan:
    """Read and check an iterate file; the round recipe is parsed now, so a typo fails before any model loads."""
    path = Path(path)
    spec = read_yaml_file(path, "iterate file")
    if not isinstance(spec, dict):
        raise ConfigError(f"Iterate file {path} must be a YAML mapping (see `gpo-trl iterate --help`).")
    check_keys(spec, _KEYS, f"iterate file {path}")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"Iterate file {path} needs {missing} (see `gpo-trl iterate --help`).")
    plan = IteratePlan(
        base=(path.parent / spec["base"]).resolve(), output_dir=Path(spec["output_dir"]),
        prompts=make_prompt_source(spec["prompts"]), rounds=spec["rounds"], judge=make_judge(spec["judge"]),
        max_prompts=spec.get("max_prompts"), samples_per_prompt=spec.get("samples_per_prompt", 4),
        generation=make_generation(spec.get("generation")),
        generation_backend=spec.get("generation_backend", "transformers"),
        pairing=spec.get("pairing", "best_vs_worst"), reference=spec.get("reference", "initial"),
        overrides=spec.get("overrides") or {}, launch=[str(a) for a in spec.get("launch") or []],
        seed=spec.get("seed", 0))
    _check(plan)
    return plan


def _check(plan: IteratePlan):
    def positive_int(name, value, least):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"`{name}` must be an integer >= {least}, got {value!r}.")

    positive_int("rounds", plan.rounds, 1)
    positive_int("samples_per_prompt", plan.samples_per_prompt, 2)
    positive_int("seed", plan.seed, 0)
    if plan.max_prompts is not None:
        positive_int("max_prompts", plan.max_prompts, 1)
    if plan.pairing not in PAIRINGS:
        raise ConfigError(f"`pairing` must be one of {list(PAIRINGS)}, got {plan.pairing!r}.")
    if plan.reference not in REFERENCES:
        raise ConfigError(f"`reference` must be one of {list(REFERENCES)}, got {plan.reference!r}.")
    check_backend(plan.generation_backend)
    if not isinstance(plan.overrides, dict):
        raise ConfigError("`overrides` must be a mapping of recipe keys.")
    clash = sorted(set(plan.overrides) & set(_ROUND_KEYS))
    if clash:
        raise ConfigError(f"`overrides` sets {clash}, which iterate sets for each round; remove them (the initial "
                          "model is the base recipe's `model_name_or_path`).")
    if not plan.base.is_file():
        raise ConfigError(f"Base recipe {plan.base} does not exist.")
    with tempfile.TemporaryDirectory() as tmp:  # the round recipe, with placeholder paths
        placeholder = Path(tmp) / "pairs.jsonl"
        recipe = write_round_recipe(plan, Path(tmp), "start-model", placeholder, reference="initial-model")
        try:
            parse_args(["--config", str(recipe)])
        except ConfigError as err:
            raise ConfigError(f"The round recipe (base {plan.base} + overrides): {err}") from err


def initial_model(plan: IteratePlan) -> str:
    return parse_args(["--config", str(plan.base)])[2].model_name_or_path


def write_round_recipe(plan: IteratePlan, round_dir: Path, start: str, pairs: Path, reference: str | None) -> Path:
    """round_K/recipe.yaml: the base recipe, the overrides, and this round's model, data, output and reference."""
    recipe = yaml.safe_load(plan.base.read_text()) or {}
    recipe.update(_ROUND_DEFAULTS)
    recipe.update(plan.overrides)
    recipe.update({"model_name_or_path": str(start), "output_dir": str(round_dir / "adapter"),
                   "datasets": [{"data_files": str(pairs)}]})
    recipe.pop("dataset_name", None)
    if reference is not None:
        recipe["ref_model_name_or_path"] = str(reference)
    path = round_dir / "recipe.yaml"
    write_text_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- The rounds -------------------------------------------------------------------------------------------------


def run_iterate(plan: IteratePlan) -> list[dict]:
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    initial = initial_model(plan)
    prompts = load_prompts(plan.prompts, plan.max_prompts)
    start = initial
    for k in range(1, plan.rounds + 1):
        round_dir = plan.output_dir / f"round_{k}"
        record = round_dir / "round.json"
        if record.is_file():
            start = json.loads(record.read_text())["policy"]
            print(f"[round {k}/{plan.rounds}] finished earlier, skipped")
            continue
        print(f"[round {k}/{plan.rounds}] policy {start}", flush=True)
        round_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        reference = initial if plan.reference == "initial" and k > 1 else None
        recipe = write_round_recipe(plan, round_dir, start, round_dir / "pairs.jsonl", reference)
        if not (round_dir / "pairs.jsonl").is_file():  # pairs.jsonl is written last: it marks a complete sampling
            sample_round(plan, k, start, prompts, round_dir)
        sampling = json.loads((round_dir / "sampling.json").read_text())
        sampled = time.time()
        train_round(plan, k, recipe)
        start = merge_round(start, round_dir / "adapter", round_dir / "policy")
        row = round_row(k, sampling, round_dir, start, sampled - started, time.time() - sampled)
        write_text_atomic(record, json.dumps(row, indent=2))
        write_tables(plan.output_dir)
        print(f"[round {k}/{plan.rounds}] judge mean {row['judge_mean']:.4g} (sd {row['judge_std']:.3g}), "
              f"{row['pairs']} pairs, {row['ties']} ties, policy -> {start}", flush=True)
    return write_tables(plan.output_dir)


def sample_round(plan: IteratePlan, k: int, policy: str, prompts: list, round_dir: Path):
    """Sample, judge and pair; writes samples.jsonl, sampling.json, then pairs.jsonl. Raises before training when
    the judge fails on a sample (naming the prompt index)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    seed = plan.seed + 1000 * k
    _, training_args, model_args, _ = parse_args(["--config", str(round_dir / "recipe.yaml")])
    device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    if plan.generation_backend == "vllm":
        samples = sample_with_vllm(policy, tokenizer, prompts, plan.samples_per_prompt, plan.generation, seed)
    else:
        dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype).to(device)
        samples = sample_completions(model, tokenizer, prompts, plan.samples_per_prompt, plan.generation, seed,
                                     desc=f"Sampling round {k}")
        del model
    texts = [as_text(p) for p in prompts]
    scores = score_samples(plan.judge, texts, samples, device=device)
    pairs, ties = make_pairs(samples, scores, plan.pairing, seed)
    write_jsonl(round_dir / "samples.jsonl", [
        {"prompt_index": s.prompt_index, "sample_index": s.sample_index, "prompt": prompts[s.prompt_index],
         "completion": s.completion, "score": score, "completion_tokens": len(s.completion_ids)}
        for s, score in zip(samples, scores)])
    if not pairs:
        raise ConfigError(f"Round {k}: every prompt's samples tied under judge {plan.judge.describe()!r} "
                          f"({ties} ties), so there is nothing to train on. Raise `samples_per_prompt` or "
                          "`generation.temperature`, or use a judge that separates the samples.")
    stats = {"prompts": len(prompts), "samples": len(samples), "pairs": len(pairs), "ties": ties,
             "judge_mean": statistics.fmean(scores), "judge_std": statistics.pstdev(scores),
             "mean_completion_tokens": statistics.fmean(len(s.completion_ids) for s in samples),
             "mean_completion_words": statistics.fmean(len(s.completion.split()) for s in samples)}
    write_text_atomic(round_dir / "sampling.json", json.dumps(stats, indent=2))
    write_jsonl(round_dir / "pairs.jsonl", [pair_row(prompts, samples, scores, a, b) for a, b in pairs])


def pair_row(prompts, samples, scores, chosen: int, rejected: int) -> dict:
    prompt = prompts[samples[chosen].prompt_index]

    def completion(position):  # conversational prompts get assistant-message completions
        text = samples[position].completion
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    return {"prompt": prompt, "chosen": completion(chosen), "rejected": completion(rejected),
            "score_chosen": scores[chosen], "score_rejected": scores[rejected]}


def train_round(plan: IteratePlan, k: int, recipe: Path):
    """Train round k through the recipe: in this process, or through `gpo-trl train` when `launch` is set."""
    if not plan.launch:
        from .recipe import main as recipe_main

        recipe_main(*parse_args(["--config", str(recipe)]))
        return
    command = [sys.executable, "-m", "gpo_trl", "train", "--config", str(recipe), *plan.launch]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"Round {k}'s training failed (see above); finished rounds are kept, rerun `gpo-trl "
                           "iterate` to resume.")


def merge_round(start: str, adapter_dir: Path, policy_dir: Path) -> str:
    """The round's policy as a full model: the LoRA adapter merged into the round's starting model (a full
    fine-tune's output already is one). Written to a staging folder, then renamed."""
    if not (adapter_dir / "adapter_config.json").is_file():
        return str(adapter_dir)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(start, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = policy_dir.with_name(f".{policy_dir.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
    shutil.rmtree(policy_dir, ignore_errors=True)
    os.replace(staging, policy_dir)
    return str(policy_dir)


def round_row(k: int, sampling: dict, round_dir: Path, policy: str, sample_s: float, train_s: float) -> dict:
    run = json.loads((round_dir / "adapter" / "gpo_run.json").read_text())
    train = {f"train/{key}": run["metrics"][key] for key in ("train_loss", "rewards/accuracies", "rewards/margins",
                                                            "gpo/margin") if key in run["metrics"]}
    return {"round": k, **sampling, **train, "steps": run["steps"], "sample_seconds": round(sample_s, 2),
            "train_seconds": round(train_s, 2), "adapter": str(round_dir / "adapter"), "policy": policy,
            "finished_at": time.time()}


def write_jsonl(path: Path, rows: list[dict]):
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_tables(output_dir: Path) -> list[dict]:
    records = sorted(output_dir.glob("round_*/round.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows = [json.loads(p.read_text()) for p in records]
    write_jsonl(output_dir / "rounds.jsonl", rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(output_dir / "rounds.csv", buffer.getvalue())
    return rows
