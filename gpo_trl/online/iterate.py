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
    judge: {aux: length, weight: -1}   # see gpo_trl.online.judges
    pairing: best_vs_worst             # all_pairs, random_pair; ties are dropped and counted
    missing_eos_penalty: null          # subtracted from the judge's score of a sample cut at max_new_tokens
    drop_truncated: false              # true: samples cut at max_new_tokens are never paired
    merge_dtype: float32               # each round's LoRA merge (bfloat16/float16: the recipe's half precision)
    prepare_demo_model: false          # true: write the demo's talking model to the recipe's model path if absent
    reference: initial                 # or previous: the reference of round K is round K-1's policy
    overrides: {num_train_epochs: 2}   # recipe keys for every round's training
    launch: []                         # options for `accelerate launch`, as for `gpo-trl train`; [] trains in-process
    seed: 0

Round K samples from the policy of round K-1 (round 0: the recipe's model), scores and pairs the samples, writes
`round_K/samples.jsonl` and `round_K/pairs.jsonl` (a recipe source: prompt, chosen, rejected, scores, and the token
ids as sampled: `prompt_ids`, `chosen_ids`, `rejected_ids`, which the round trains on as they are), trains with the
recipe (the same `gpo_trl.recipe.main` as `gpo-trl train`, so LoRA, QLoRA and accelerate work) starting from that
policy, and saves the adapter to `round_K/adapter`. A LoRA adapter is then merged into `round_K/policy` through
`gpo-trl merge`'s check, where round K+1 starts. The reference is the initial model (`reference: initial`, passed as
`ref_model_name_or_path`) or the round's starting policy (`previous`: the base with the adapter disabled).

A completion cut at `max_new_tokens` has no EOS, and trains without one. By default it is scored and paired like any
other sample (TRL's OnlineDPO default too); `missing_eos_penalty` lowers its score, `drop_truncated` leaves it out.

`OUT/iterate.json` records what defines the rounds (recipe, judge, generation, pairing, prompts, seed, ...): a rerun
with another definition is refused, naming the keys that changed, unless `--restart` (which deletes the rounds).
`round_K/round.json` marks a finished round; its row is also in `rounds.jsonl` / `rounds.csv`. A rerun skips the
finished rounds and, inside an unfinished round, reuses its pairs if they were written and resumes its training from
the last complete checkpoint (when the recipe saves checkpoints: `save_strategy: steps`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..auxiliary import as_text
from ..data import PreferenceSource
from ..atomic import write_text_atomic
from ..recipe import ConfigError, parse_args, read_yaml_file
from .generation import (GenerationSettings, check_backend, check_keys, load_prompts, make_generation,
                         make_prompt_source, sample_completions, sample_with_vllm)
from .judges import PAIRINGS, Judge, make_judge, make_pairs, score_samples

REFERENCES = ("initial", "previous")
_REQUIRED = ("base", "output_dir", "prompts", "rounds", "judge")
_KEYS = [*_REQUIRED, "max_prompts", "samples_per_prompt", "generation", "generation_backend", "pairing", "reference",
         "overrides", "launch", "seed", "missing_eos_penalty", "drop_truncated", "merge_dtype",
         "prepare_demo_model"]
MERGE_DTYPES = ("float32", "bfloat16", "float16")
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
    missing_eos_penalty: float | None = None
    drop_truncated: bool = False
    merge_dtype: str = "float32"
    prepare_demo_model: bool = False
    spec: dict = field(default_factory=dict, repr=False)  # the file's content, for the round definition


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
        seed=spec.get("seed", 0), missing_eos_penalty=spec.get("missing_eos_penalty"),
        drop_truncated=spec.get("drop_truncated", False), merge_dtype=spec.get("merge_dtype", "float32"),
        prepare_demo_model=spec.get("prepare_demo_model", False), spec=spec)
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
    penalty = plan.missing_eos_penalty
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0):
        raise ConfigError(f"`missing_eos_penalty` must be a number >= 0 (or null), got {penalty!r}.")
    for name in ("drop_truncated", "prepare_demo_model"):
        if not isinstance(getattr(plan, name), bool):
            raise ConfigError(f"`{name}` must be true or false, got {getattr(plan, name)!r}.")
    if plan.merge_dtype not in MERGE_DTYPES:
        raise ConfigError(f"`merge_dtype` must be one of {list(MERGE_DTYPES)}, got {plan.merge_dtype!r}.")
    if plan.output_dir.exists() and not plan.output_dir.is_dir():
        raise ConfigError(f"`output_dir` {plan.output_dir} is a file; iterate writes a folder of rounds there. "
                          "Choose another path.")
    check_launch(plan.launch)
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


def check_launch(launch: list[str]):
    """`launch` read as `gpo-trl train` reads it, now: a bad flag fails before round 1 samples."""
    if not launch:
        return
    from accelerate.commands.launch import launch_command_parser

    from ..cli import (_LAUNCH_OPTIONS, accelerate_launch_args, parse_accelerate_args, split_launch_args,
                      split_passthrough)

    argv, passthrough = split_passthrough(launch)
    options, rest = split_launch_args(argv)
    if rest:
        raise ConfigError(f"`launch` has {rest[0]!r}, which is not a launch option ({sorted(_LAUNCH_OPTIONS)}); other "
                          "`accelerate launch` flags go after '--', e.g. [--num_processes, 2, --, --rdzv_backend, "
                          "c10d].")
    try:
        flags = accelerate_launch_args(options) + passthrough
    except ValueError as err:  # e.g. int('two') for --num_processes
        raise ConfigError(f"`launch` {options}: {err}") from err
    parse_accelerate_args(flags, ["--config", "round.yaml"], launch_command_parser())


def initial_model(plan: IteratePlan) -> str:
    return parse_args(["--config", str(plan.base)])[2].model_name_or_path


def write_round_recipe(plan: IteratePlan, round_dir: Path, start: str, pairs: Path, reference: str | None) -> Path:
    """round_K/recipe.yaml: the base recipe, the overrides, and this round's model, data, output and reference."""
    recipe = yaml.safe_load(plan.base.read_text()) or {}
    recipe.update(_ROUND_DEFAULTS)
    recipe.update(plan.overrides)
    recipe.setdefault("resume_from_checkpoint", "last")  # an interrupted round resumes (a no-op without checkpoints)
    recipe.update({"model_name_or_path": str(start), "output_dir": str(round_dir / "adapter"),
                   "datasets": [{"data_files": str(pairs)}]})
    recipe.pop("dataset_name", None)
    if reference is not None:
        recipe["ref_model_name_or_path"] = str(reference)
    path = round_dir / "recipe.yaml"
    write_text_atomic(path, yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- The rounds -------------------------------------------------------------------------------------------------


def run_iterate(plan: IteratePlan, restart: bool = False) -> list[dict]:
    prompts = load_prompts(plan.prompts, plan.max_prompts)  # a missing or empty file fails before any model loads
    check_definition(plan, definition(plan, prompts), restart)
    initial = initial_model(plan)
    if plan.prepare_demo_model:
        from ..demo import prepare_talking_model

        prepare_talking_model(initial)
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
        if not (round_dir / "adapter" / "gpo_run.json").is_file():  # written after the final save: training done
            train_round(plan, k, recipe)
        start, merge = merge_round(start, round_dir / "adapter", round_dir / "policy", plan.merge_dtype)
        row = round_row(k, sampling, round_dir, start, sampled - started, time.time() - sampled)
        write_text_atomic(record, json.dumps({**row, **merge}, indent=2))
        write_tables(plan.output_dir)
        print(f"[round {k}/{plan.rounds}] judge mean {row['judge_mean']:.4g} (sd {row['judge_std']:.3g}), "
              f"{row['pairs']} pairs, {row['ties']} ties, policy -> {start}", flush=True)
    return write_tables(plan.output_dir)


# --- What defines the rounds ------------------------------------------------------------------------------------

# Besides the recipe, judge, generation and prompts (`rounds`, `launch` and `output_dir` change how many rounds run,
# how and where, not what a round computes)
_DEFINING = ("max_prompts", "samples_per_prompt", "generation_backend", "pairing", "reference", "seed",
             "missing_eos_penalty", "drop_truncated", "merge_dtype")


def definition(plan: IteratePlan, prompts: list) -> dict:
    """What a round's samples, pairs and training depend on: the round recipe (base + overrides), every other key of
    the iterate file, and the prompts themselves (a hash of the loaded prompts, so an edited file counts)."""
    recipe = yaml.safe_load(plan.base.read_text()) or {}
    recipe.update({**_ROUND_DEFAULTS, **plan.overrides})
    for key in (*_ROUND_KEYS, "dataset_name"):
        recipe.pop(key, None)
    recipe["model_name_or_path"] = initial_model(plan)
    judge = plan.spec["judge"]
    defined = {name: getattr(plan, name) for name in _DEFINING}
    defined.update({"recipe": recipe, "generation": asdict(plan.generation),
                    "judge": {"aux": judge[len("aux:"):]} if isinstance(judge, str) else judge,
                    "prompts": {"source": plan.spec["prompts"],
                                "sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}})
    return json.loads(json.dumps(defined, default=str))  # as it reads back from the file


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ (recursing into mappings)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def check_definition(plan: IteratePlan, defined: dict, restart: bool):
    """OUT/iterate.json holds the definition the rounds in OUT were made with. Another one is refused (its rounds
    would be skipped or mixed as if they were this run's), or starts over with `restart`."""
    path = plan.output_dir / "iterate.json"
    if path.is_file():
        changed = changed_keys(json.loads(path.read_text())["definition"], defined)
        if changed and not restart:
            raise ConfigError(f"{plan.output_dir} holds rounds made with another definition: {', '.join(changed)} "
                              "changed. Use another `output_dir`, undo the change, or rerun with `--restart` to "
                              "delete those rounds and start over.")
        if not changed:
            return
    elif plan.output_dir.is_dir() and any(plan.output_dir.iterdir()) and not restart:
        raise ConfigError(f"{plan.output_dir} is not empty and holds no iterate.json, so it is not an earlier run of "
                          "iterate: choose an empty or new `output_dir` (nothing there is overwritten).")
    if restart:
        for old in [*plan.output_dir.glob("round_*"), *(plan.output_dir / n for n in ("rounds.jsonl", "rounds.csv"))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    write_text_atomic(path, json.dumps({"definition": defined}, indent=2))


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
    used = scores_for_pairing(plan, samples, scores)
    pairs, ties, unpaired = pair_samples(plan, samples, used, seed)
    write_jsonl(round_dir / "samples.jsonl", [
        {"prompt_index": s.prompt_index, "sample_index": s.sample_index, "prompt": prompts[s.prompt_index],
         "completion": s.completion, "score": score, "stopped": s.stopped, "completion_tokens": len(s.completion_ids),
         "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids}
        for s, score in zip(samples, scores)])
    if not pairs:
        raise ConfigError(f"Round {k}: every prompt's samples tied under judge {plan.judge.describe()!r} "
                          f"({ties} ties, {unpaired} prompts with fewer than 2 samples to pair), so there is nothing "
                          "to train on. Raise `samples_per_prompt`, `generation.temperature` or `max_new_tokens`, or "
                          "use a judge that separates the samples.")
    stats = {"prompts": len(prompts), "samples": len(samples), "pairs": len(pairs), "ties": ties,
             "judge_mean": statistics.fmean(scores), "judge_std": statistics.pstdev(scores),
             "mean_completion_tokens": statistics.fmean(len(s.completion_ids) for s in samples),
             "mean_completion_words": statistics.fmean(len(s.completion.split()) for s in samples),
             "truncated": sum(not s.stopped for s in samples), "unpaired_prompts": unpaired,
             "sampled_from": plan.generation.distortions or "the model's own distribution"}
    write_text_atomic(round_dir / "sampling.json", json.dumps(stats, indent=2))
    write_jsonl(round_dir / "pairs.jsonl", [pair_row(prompts, samples, used, a, b) for a, b in pairs])


def scores_for_pairing(plan: IteratePlan, samples, scores: list[float]) -> list[float]:
    """The judge's scores less `missing_eos_penalty` for each sample cut at max_new_tokens (TRL OnlineDPO's rule)."""
    penalty = plan.missing_eos_penalty or 0
    return [score - penalty * (not s.stopped) for s, score in zip(samples, scores)]


def pair_samples(plan: IteratePlan, samples, scores: list[float], seed: int):
    """(pairs as positions in `samples`, ties, prompts left with fewer than 2 samples). With `drop_truncated`, the
    samples cut at max_new_tokens take no part in the pairing."""
    kept = [i for i, s in enumerate(samples) if s.stopped or not plan.drop_truncated]
    per_prompt = {}
    for i in kept:
        per_prompt.setdefault(samples[i].prompt_index, []).append(i)
    kept = [i for i in kept if len(per_prompt[samples[i].prompt_index]) >= 2]
    unpaired = len({s.prompt_index for s in samples}) - len({samples[i].prompt_index for i in kept})
    pairs, ties = make_pairs([samples[i] for i in kept], [scores[i] for i in kept], plan.pairing, seed)
    return [(kept[a], kept[b]) for a, b in pairs], ties, unpaired


def pair_row(prompts, samples, scores, chosen: int, rejected: int) -> dict:
    """A pair as text (for reading, and for the judge's record) and as the ids sampled, which are what trains."""
    prompt = prompts[samples[chosen].prompt_index]

    def completion(position):  # conversational prompts get assistant-message completions
        text = samples[position].completion
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    return {"prompt": prompt, "chosen": completion(chosen), "rejected": completion(rejected),
            "score_chosen": scores[chosen], "score_rejected": scores[rejected],
            "prompt_ids": samples[chosen].prompt_ids, "chosen_ids": samples[chosen].completion_ids,
            "rejected_ids": samples[rejected].completion_ids}


def train_round(plan: IteratePlan, k: int, recipe: Path):
    """Train round k through the recipe: in this process, or through `gpo-trl train` when `launch` is set."""
    if not plan.launch:
        from ..recipe import main as recipe_main

        recipe_main(*parse_args(["--config", str(recipe)]))
        return
    command = [sys.executable, "-m", "gpo_trl", "train", "--config", str(recipe), *plan.launch]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"Round {k}'s training failed (see above); finished rounds are kept, rerun `gpo-trl "
                           "iterate` to resume.")


def merge_round(start: str, adapter_dir: Path, policy_dir: Path, dtype: str) -> tuple[str, dict]:
    """(the round's policy as a full model, what its merge measured): the LoRA adapter merged into the round's
    starting model through `gpo-trl merge` (checked: merged vs adapter-on-base log-probs within the dtype's
    tolerance), which replaces `policy_dir` as a whole (gpo_trl.atomic; round.json, written after this, decides what
    a rerun trusts). A full fine-tune's output already is one."""
    if not (adapter_dir / "adapter_config.json").is_file():
        return str(adapter_dir), {}
    from ..merge import merge_adapter

    check = merge_adapter(str(adapter_dir), str(policy_dir), dtype=dtype, overwrite=True)
    return str(policy_dir), {"merge_dtype": dtype, "merge_max_abs_logp_diff": check.max_abs_diff}


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
