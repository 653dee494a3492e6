"""UPO-style auxiliary objectives: designer rewards optimised offline next to the GPO loss.

The term this project uses (README, "Auxiliary objectives", lists where it departs from Badrinath et al.,
arXiv 2405.17956):

    L        = L_GPO + alpha * L_aux
    R(x, y)  = sum_i w_i r_i(x, y)                   designer rewards, computed once per row when the data is prepared
    A(x, y)  = R(x, y) - V(x),  V(x) = (R_w + R_l) / 2   so A_w = -A_l = (R_w - R_l) / 2
    h(y)     = log pi(y|x) - log ref(y|x)            (per token under gpo_length_normalize, as in the GPO margin)
    omega(y) = max(tanh(A(y) / tau), 0)              the better-scored response of each pair, weight in (0, 1)
    L_aux    = mean over pairs of  sum_{y in {y_w, y_l}} omega(y) * f(beta * h(y))

with f the GPO loss itself: the designer's preferred response of each pair has its log-ratio to the reference
pushed up, as hard as its advantage says, and the push saturates as f does, so the term is bounded by the same
regularisation as the GPO loss. A pair the rewards cannot tell apart (A = 0) contributes exactly 0 in value and
gradient, and each pair's value depends on that pair alone (no normalisation over the batch). At the reference
(h = 0) and for small A the gradient is -beta |f'(0)| / tau * sum_y max(A(y), 0) grad log pi(y|x): an
advantage-weighted likelihood (UPO's form) with the weights measured from the pair's baseline.

A reward is `f(prompt: str, completion: str, **kwargs) -> float`, built in (length, readability, lexicon, regex),
registered under a name (`register_reward`, which also takes TRL's batched reward_funcs), or named by import path
"package.module:function".
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import RewardError

RewardFn = Callable[..., float]
PROBE_ROW = {"prompt": "How do I make tea?", "completion": "Boil water, add the leaves, wait three minutes."}

# --- Built-in rewards ---------------------------------------------------------------------------------------------


def length_reward(prompt: str, completion: str, unit: str = "words") -> float:
    """Length of the completion in words or characters (give it a negative weight to prefer short answers)."""
    if unit == "words":
        return float(len(completion.split()))
    if unit == "chars":
        return float(len(completion))
    raise ValueError(f"length reward: unit must be 'words' or 'chars', got {unit!r}")


_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_SENTENCE_END = re.compile(r"[.!?]+")


def _syllables(word: str) -> int:
    """Vowel groups, minus a silent final 'e': a standard approximation of English syllable counts."""
    word = word.lower()
    count = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and count > 1:
        count -= 1
    return max(count, 1)


def readability_reward(prompt: str, completion: str) -> float:
    """Flesch reading ease: 206.835 - 1.015 words/sentence - 84.6 syllables/word (higher reads easier).

    Syllables are counted with a vowel-group rule (no dictionary download), within a few points of textstat's
    dictionary-based count on ordinary English. An empty completion scores 0.
    """
    words = re.findall(r"[A-Za-z]+", completion)
    if not words:
        return 0.0
    sentences = max(len(_SENTENCE_END.findall(completion)), 1)
    syllables = sum(_syllables(w) for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


def lexicon_reward(prompt: str, completion: str, words: list[str] | None = None, file: str | None = None,
                   per_word: bool = False) -> float:
    """How many words of the completion are in a lexicon (given inline or as a file, one word per line), e.g. a
    profanity list (with a negative weight). `per_word: true` divides by the completion's word count."""
    lexicon = _load_lexicon(tuple(words or ()), file)
    tokens = re.findall(r"[\w']+", completion.lower())
    hits = sum(token in lexicon for token in tokens)
    return hits / max(len(tokens), 1) if per_word else float(hits)


_LEXICONS: dict = {}


def _load_lexicon(words: tuple, file: str | None) -> frozenset:
    key = (words, file)
    if key not in _LEXICONS:
        entries = list(words)
        if file is not None:
            entries += [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
        if not entries:
            raise ValueError("lexicon reward: give `words` (a list) or `file` (one word per line)")
        _LEXICONS[key] = frozenset(e.lower() for e in entries)
    return _LEXICONS[key]


def regex_reward(prompt: str, completion: str, pattern: str = "", count: bool = False) -> float:
    """1.0 if `pattern` matches the completion (or, with `count: true`, the number of matches)."""
    if not pattern:
        raise ValueError("regex reward: give a non-empty `pattern`")
    if count:
        return float(len(re.findall(pattern, completion)))
    return 1.0 if re.search(pattern, completion) else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "length": length_reward,
    "readability": readability_reward,
    "lexicon": lexicon_reward,
    "regex": regex_reward,
}

# --- Named rewards ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    fn: Callable
    batched: bool  # TRL's reward_funcs signature: f(prompts, completions, **kwargs) -> list[float]

    def per_row(self) -> RewardFn:
        if not self.batched:
            return self.fn
        return lambda prompt, completion, **kwargs: self.fn(prompts=[prompt], completions=[completion], **kwargs)[0]


REGISTERED: dict[str, Registered] = {}


def register_reward(name: str, fn: Callable | None = None, *, batched: bool = False):
    """Name a reward, usable by its name wherever a reward is named: `aux_rewards: [{name: NAME}]`, and judges
    (`judge: aux:NAME`, `judge: {reward_func: NAME}`). Per row, `fn(prompt, completion, **kwargs) -> float`; with
    `batched=True`, TRL's reward_funcs signature `fn(prompts, completions, **kwargs) -> list[float]`. Use as
    `register_reward("polite", fn)` or as a decorator `@register_reward("polite")`. A registration lives in the
    process that made it: a launched training (`accelerate launch`) needs it made on import of a module it loads,
    or an import path instead."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"A reward name is a non-empty text without ':', got {name!r}.")
    if name in BUILTIN_REWARDS:
        raise ValueError(f"{name!r} is a built-in reward; choose another name.")

    def add(function):
        if not callable(function):
            raise TypeError(f"register_reward({name!r}, ...) needs a function, got {function!r}.")
        REGISTERED[name] = Registered(function, batched)
        return function

    return add(fn) if fn is not None else add


# --- Building and checking the weighted reward --------------------------------------------------------------------


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn = field(repr=False)
    weight: float
    kwargs: dict

    def __call__(self, prompt: str, completion: str) -> float:
        return self.fn(prompt, completion, **self.kwargs)


def resolve_reward(spec: dict) -> WeightedReward:
    """A WeightedReward from `{name, weight, kwargs}`; `name` is a built-in or "package.module:function"."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise RewardError(f"Each `aux_rewards` entry needs a `name`; got {spec!r}.")
    unknown = set(spec) - {"name", "weight", "kwargs"}
    if unknown:
        raise RewardError(f"`aux_rewards` entry {spec['name']!r} has unknown keys {sorted(unknown)}; "
                          "use name, weight, kwargs.")
    name, weight, kwargs = spec["name"], spec.get("weight", 1.0), dict(spec.get("kwargs") or {})
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RewardError(f"`weight` of reward {name!r} must be a finite number, got {weight!r}.")
    if name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[name]
    elif name in REGISTERED:
        fn = REGISTERED[name].per_row()
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"Cannot load reward function {name!r}: {err}") from err
    else:
        raise RewardError(f"Unknown reward {name!r}. Built-ins: {sorted(BUILTIN_REWARDS)}; registered: "
                          f"{sorted(REGISTERED)}; or give an import path "
                          "'package.module:function' to f(prompt, completion, **kwargs) -> float.")
    return WeightedReward(name=name, fn=fn, weight=float(weight), kwargs=kwargs)


def score(reward: WeightedReward, prompt: str, completion: str, where: str) -> float:
    """Call one reward and check its value; `where` names the row in the error."""
    try:
        value = reward(prompt, completion)
    except Exception as err:
        raise RewardError(f"Reward {reward.name!r} raised {type(err).__name__} on {where}: {err}") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardError(f"Reward {reward.name!r} returned {type(value).__name__} {value!r:.40} on {where}; "
                          "it must return a float.")
    if not math.isfinite(value):
        raise RewardError(f"Reward {reward.name!r} returned {value} on {where}; rewards must be finite.")
    return float(value)


def probe(rewards: list[WeightedReward]):
    """Run every reward on a fixed probe row, so that a broken function fails when the config is built."""
    for reward in rewards:
        score(reward, PROBE_ROW["prompt"], PROBE_ROW["completion"], f"the probe row {PROBE_ROW}")


def as_text(value) -> str:
    """A completion or prompt as text: strings as they are, message lists as their contents joined by newlines."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


REWARD_COLUMNS = ("aux_reward_chosen", "aux_reward_rejected")  # the per-row columns `add_reward_columns` adds


def add_reward_columns(dataset, rewards: list[WeightedReward], name: str):
    """Add `aux_reward_chosen` / `aux_reward_rejected` = sum_i w_i r_i, once per row, through `dataset.map` (cached
    by the datasets library under the rewards' fingerprint)."""

    def score_row(row, index):
        prompt = as_text(row["prompt"]) if row.get("prompt") is not None else ""
        return {f"aux_reward_{side}": sum(
            r.weight * score(r, prompt, as_text(row[side]), f"{name} row {index}, column {side!r}") for r in rewards)
            for side in ("chosen", "rejected")}

    return dataset.map(score_row, with_indices=True, desc=f"Scoring auxiliary rewards ({name})")


# --- The objective --------------------------------------------------------------------------------------------------


def pair_advantages(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """A = R - V(x) for the 2B responses [chosen; rejected], V the pair mean: A_w = (R_w - R_l) / 2 = -A_l.
    Exactly 0 when the two rewards are equal, whatever their value."""
    half_gap = (reward_chosen - reward_rejected).float() / 2
    return torch.cat([half_gap, -half_gap])


def aux_loss(loss_fn, scaled_logratios: torch.Tensor, advantages: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-pair L_aux (B,) from the 2B responses [chosen; rejected] and their beta * h: the sum over the pair of
    max(tanh(A / tau), 0) * f(beta * h). A response with A <= 0 adds exactly 0 to the value and to the gradient
    (no push-down: that is the GPO loss's job, and pushing likelihood down without a target unsettled training)."""
    weights = torch.tanh(advantages.to(scaled_logratios.dtype) / temperature).clamp(min=0)
    # f at 0 where the weight is 0, so that an f that overflows far from the reference cannot turn 0 * inf into NaN
    per_response = weights * loss_fn(torch.where(weights > 0, scaled_logratios, torch.zeros_like(scaled_logratios)))
    chosen, rejected = per_response.chunk(2)
    return chosen + rejected


class RewardCollator:
    """Wraps TRL's preference collator to pass the per-row reward columns through as float tensors (B,)."""

    def __init__(self, collator, columns: tuple[str, ...]):
        self.collator, self.columns = collator, columns

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        for column in self.columns:
            batch[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        return batch
