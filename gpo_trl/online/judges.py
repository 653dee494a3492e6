"""Judges that score sampled completions, and how scored samples become preference pairs.

A judge is named in the `judge:` key of an iterate or evaluate file:

    judge: aux:length                                  # a registered auxiliary reward (gpo_trl.auxiliary) ...
    judge: aux:my_pkg.rewards:helpfulness              # ... or an import path to f(prompt, completion) -> float
    judge: {reward_func: my_pkg.rewards:helpful, weight: 1, kwargs: {}, batch_size: 64}
                                                       # TRL's reward_funcs: f(prompts, completions, **kw) -> [float]
    judge: {aux: length, weight: -1, kwargs: {unit: words}}   # weight -1: shorter is better
    judge: {reward_model: path/or/hub-id, batch_size: 16}     # AutoModelForSequenceClassification, one logit
    judge: {pairwise: my_pkg.judges:prefer}            # f(prompt, a, b) -> 0 if a is better, 1 if b is better

A `reward_func` is called on batches of samples with `prompts=`, `completions=` (texts) and `completion_ids=` (the
sampled ids), as TRL's GRPO/OnlineDPO trainers call theirs, so it must take `**kwargs`. A name registered with
`gpo_trl.register_reward` works in `aux:` and `reward_func:` alike (a batched one is called row by row under `aux:`).

Every score is checked: a judge that raises, or returns a non-number or NaN/inf, stops the run with the prompt index
named, before any training. A pairwise judge scores each sample by its wins in a round robin over the samples of
its prompt (n(n-1)/2 calls per prompt), so the pairing rules below apply to every judge.

Pairing (per prompt): `best_vs_worst` (the highest- against the lowest-scored sample), `all_pairs` (every two samples
with different scores), `random_pair` (two samples drawn at random). Equal scores make no pair: they are dropped and
counted as ties.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
from dataclasses import dataclass, field

from ..auxiliary import BUILTIN_REWARDS, REGISTERED, Registered, resolve_reward
from ..errors import ConfigError, JudgeError, RewardError
from .generation import check_keys

PAIRINGS = ("best_vs_worst", "all_pairs", "random_pair")


@dataclass
class Judge:
    kind: str  # "aux", "reward_func", "reward_model" or "pairwise"
    name: str
    settings: dict = field(default_factory=dict)
    fn: object = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.kind}:{self.name}"


def make_judge(spec) -> Judge:
    """A Judge from the `judge:` value (see the module docstring); checked without loading any model."""
    if isinstance(spec, str):
        if not spec.startswith("aux:"):
            raise ConfigError(f"`judge: {spec}`: a judge given as text is `aux:<reward>` (a built-in reward "
                              f"{sorted(BUILTIN_REWARDS)} or an import path); otherwise use {{reward_model: PATH}} "
                              "or {pairwise: module:function}.")
        spec = {"aux": spec[len("aux:"):]}
    if not isinstance(spec, dict):
        raise ConfigError(f"`judge` must be `aux:<reward>` or a mapping, got {spec!r}.")
    kinds = [k for k in ("aux", "reward_func", "reward_model", "pairwise") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"`judge` needs exactly one of aux, reward_func, reward_model, pairwise; got {sorted(spec)}.")
    kind = kinds[0]
    allowed = {"aux": ["aux", "weight", "kwargs"], "reward_model": ["reward_model", "batch_size"],
               "pairwise": ["pairwise", "kwargs"],
               "reward_func": ["reward_func", "weight", "kwargs", "batch_size"]}[kind]
    check_keys(spec, allowed, f"the {kind} judge")
    name = spec[kind]
    if kind == "aux":
        try:
            reward = resolve_reward({"name": name, "weight": spec.get("weight", 1.0), "kwargs": spec.get("kwargs")})
        except RewardError as err:
            raise ConfigError(f"`judge`: {err}") from err
        return Judge(kind, name, {"weight": reward.weight}, reward)
    if kind == "pairwise":
        return Judge(kind, name, {"kwargs": dict(spec.get("kwargs") or {})}, _import(name, "Pairwise judge"))
    batch_size = spec.get("batch_size", 16)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"`judge.batch_size` must be an integer >= 1, got {batch_size!r}.")
    if kind == "reward_func":
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"`judge.weight` must be a finite number, got {weight!r}.")
        reward = REGISTERED.get(name) or Registered(_import(name, "Reward function"), batched=True)
        return Judge(kind, str(name), {"weight": float(weight), "kwargs": dict(spec.get("kwargs") or {}),
                                       "batch_size": batch_size}, reward)
    from ..inputs import check_model_source

    check_model_source(str(name), "`judge.reward_model`")  # now, not after the sampling
    return Judge(kind, str(name), {"batch_size": batch_size})


def _import(path: str, what: str):
    module, _, attr = str(path).partition(":")
    if not attr:
        raise ConfigError(f"{what} {path!r} must be an import path 'package.module:function'"
                          + (f" or a registered name ({sorted(REGISTERED)})." if what == "Reward function" else "."))
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"Cannot load {what.lower()} {path!r}: {err}") from err


# --- Scoring ----------------------------------------------------------------------------------------------------


def score_samples(judge: Judge, prompts: list[str], samples, device=None) -> list[float]:
    """One score per sample (higher is better); prompts are the texts the judge sees (as_text of the prompt)."""
    if judge.kind == "aux":
        weight = judge.settings["weight"]
        return [weight * _checked(lambda: judge.fn(prompts[s.prompt_index], s.completion), judge, s)
                for s in _bar(samples)]
    if judge.kind == "reward_model":
        return _reward_model_scores(judge, prompts, samples, device)
    if judge.kind == "reward_func":
        return _reward_func_scores(judge, prompts, samples)
    return _round_robin_scores(judge, prompts, samples)


def _reward_func_scores(judge: Judge, prompts, samples) -> list[float]:
    """A TRL-style batched reward on batches of samples (a per-row registered one, sample by sample)."""
    reward, settings = judge.fn, judge.settings
    if not reward.batched:
        return [settings["weight"] * _checked(lambda: reward.fn(prompts[s.prompt_index], s.completion,
                                                                **settings["kwargs"]), judge, s) for s in _bar(samples)]
    scores = []
    for start in _bar(range(0, len(samples), settings["batch_size"]), desc="Judging (reward function)"):
        batch = samples[start:start + settings["batch_size"]]
        try:
            values = list(reward.fn(prompts=[prompts[s.prompt_index] for s in batch],
                                    completions=[s.completion for s in batch],
                                    completion_ids=[s.completion_ids for s in batch], **settings["kwargs"]))
        except Exception as err:
            raise JudgeError(f"Judge {judge.describe()!r} raised {type(err).__name__} on the batch of prompt index "
                             f"{batch[0].prompt_index} (sample {batch[0].sample_index}) onwards: {err}") from err
        if len(values) != len(batch):
            raise JudgeError(f"Judge {judge.describe()!r} returned {len(values)} scores for {len(batch)} completions; "
                             "a reward function returns one score per completion.")
        scores += [settings["weight"] * _checked(lambda v=v: v, judge, s) for v, s in zip(values, batch)]
    return scores


def _bar(items, desc="Judging"):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="sample")


def _checked(call, judge: Judge, sample) -> float:
    where = f"prompt index {sample.prompt_index} (sample {sample.sample_index})"
    try:
        value = call()
    except Exception as err:
        raise JudgeError(f"Judge {judge.describe()!r} raised {type(err).__name__} on {where}: {err}") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JudgeError(f"Judge {judge.describe()!r} returned {value!r:.40} on {where}; a judge must return a "
                         "finite number. Fix the judge; nothing was trained.")
    return float(value)


def _reward_model_scores(judge: Judge, prompts, samples, device) -> list[float]:
    """The single logit of a sequence classifier on prompt + completion, batched, without gradient."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(judge.name)
    model = AutoModelForSequenceClassification.from_pretrained(judge.name).to(device or "cpu").eval()
    if model.config.num_labels != 1:
        raise ConfigError(f"Reward model {judge.name!r} has {model.config.num_labels} labels; a reward model "
                          "outputs one score (num_labels=1).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    scores = []
    size = judge.settings["batch_size"]
    for start in _bar(range(0, len(samples), size), desc="Judging (reward model)"):
        batch = samples[start:start + size]
        texts = [prompts[s.prompt_index] + s.completion for s in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            logits = model(**encoded).logits[:, 0].float().tolist()
        scores += [_checked(lambda v=v: v, judge, s) for v, s in zip(logits, batch)]
    del model
    return scores


def _round_robin_scores(judge: Judge, prompts, samples) -> list[float]:
    wins = [0.0] * len(samples)
    by_prompt: dict[int, list[int]] = {}
    for position, s in enumerate(samples):
        by_prompt.setdefault(s.prompt_index, []).append(position)
    for positions in _bar(list(by_prompt.values()), desc="Judging (pairwise)"):
        for i, j in itertools.combinations(positions, 2):
            a, b = samples[i], samples[j]
            verdict = _checked(lambda: judge.fn(prompts[a.prompt_index], a.completion, b.completion,
                                                **judge.settings["kwargs"]), judge, a)
            if verdict not in (0, 1):
                raise JudgeError(f"Pairwise judge {judge.name!r} returned {verdict!r} on prompt index "
                                 f"{a.prompt_index}; it must return 0 (first is better) or 1 (second is better).")
            wins[j if verdict == 1 else i] += 1
    return wins


# --- Pairing ----------------------------------------------------------------------------------------------------


def make_pairs(samples, scores: list[float], pairing: str, seed: int) -> tuple[list[tuple[int, int]], int]:
    """([(chosen position, rejected position)], ties) over the samples grouped by prompt."""
    rng = random.Random(seed)
    by_prompt: dict[int, list[int]] = {}
    for position, s in enumerate(samples):
        by_prompt.setdefault(s.prompt_index, []).append(position)
    pairs, ties = [], 0
    for positions in by_prompt.values():
        if pairing == "best_vs_worst":
            candidates = [(max(positions, key=lambda p: scores[p]), min(positions, key=lambda p: scores[p]))]
        elif pairing == "random_pair":
            candidates = [tuple(rng.sample(positions, 2))]
        else:
            candidates = list(itertools.combinations(positions, 2))
        for a, b in candidates:
            if scores[a] == scores[b]:
                ties += 1
            else:
                pairs.append((a, b) if scores[a] > scores[b] else (b, a))
    return pairs, ties
