"""Judges named by import path in tests/test_iterate.py: ones that fail on one prompt, and a pairwise one."""


def nan_on(prompt: str, completion: str, word: str = "") -> float:
    return float("nan") if word in prompt else 0.0


def raises_on(prompt: str, completion: str, word: str = "") -> float:
    if word in prompt:
        raise ConnectionError("judge service unreachable")
    return 0.0


def prefer_shorter(prompt: str, a: str, b: str) -> int:
    """0 when a is shorter (ties go to a), 1 when b is."""
    return int(len(b) < len(a))


BATCHES = []


def trl_style_brevity(prompts, completions, completion_ids, scale=1.0, **kwargs):
    """TRL's reward_funcs signature: a batch in, one score per completion out (records the batch sizes)."""
    BATCHES.append(len(completions))
    return [-scale * len(ids) for ids in completion_ids]


def trl_style_wrong_count(prompts, completions, **kwargs):
    return [0.0]
