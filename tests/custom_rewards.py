"""A user's own reward functions, named in tests by import path (`custom_rewards:exclamations`)."""

CALLS = {"count": 0}


def exclamations(prompt: str, completion: str, bonus: float = 1.0) -> float:
    """Counts calls, so a test can prove rewards are scored once per row and never inside a training step."""
    CALLS["count"] += 1
    return bonus * completion.count("!")


def raises(prompt, completion):
    raise RuntimeError("reward service down")


def returns_text(prompt, completion):
    return "high"


def returns_nan(prompt, completion):
    return float("nan")


def fails_on_long_answers(prompt, completion):
    if len(completion.split()) > 12:
        raise ValueError("too long to score")
    return 0.0


def constant(prompt, completion, value: float = 3.0):
    """The same reward for every answer: it carries no information about which is better."""
    return value
