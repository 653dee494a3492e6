"""The study file: every key of a study YAML, typed and checked (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...losses import available_losses

# The GPO paper's losses, the study's default grid (the other built-ins are TRL's; name them in `losses` to add them)
PAPER_LOSSES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
from ...recipe import ConfigError


@dataclass
class StudyConfig:
    """Every key of a study YAML file. An unknown key is an error (the project's rule: nothing silently ignored)."""

    seed: int = 0
    threads: int = 2  # torch intra-op threads; fixed so that runs are reproducible and comparable in time
    # The task and the base LM
    vocab: int = 32  # content tokens w0..w{vocab-1}
    prompt_length: int = 4
    max_new_tokens: int = 12
    hidden_size: int = 64
    layers: int = 2
    corpus_size: int = 8000
    base_steps: int = 800
    base_batch_size: int = 64
    base_learning_rate: float = 3e-3
    # Preference data and evaluation
    train_pairs: int = 512
    eval_pairs: int = 128
    heldout_prompts: int = 64
    samples_per_prompt: int = 8
    # The GPO grid
    losses: list[str] = field(default_factory=lambda: list(PAPER_LOSSES))
    betas: list[float] = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.4])
    calibration: str | None = "logistic"  # the reference loss of the calibrated arm; null skips that arm
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-3


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read study file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"Study file {path} must be a YAML mapping of `key: value` lines.")
    fields = {f.name: f.type for f in dataclasses.fields(StudyConfig)}
    for key, value in spec.items():
        if key not in fields:
            raise ConfigError(f"Unknown key {key!r} in study file {path}; known keys: {', '.join(fields)}.")
        if not _has_type(value, fields[key]):
            raise ConfigError(f"`{key}` in study file {path} must be {fields[key]}, got {value!r}.")
        if fields[key] == "int" and key != "seed" and value < 1:
            raise ConfigError(f"`{key}` in study file {path} must be >= 1, got {value!r}.")
    config = StudyConfig(**spec)
    unknown_losses = [name for name in config.losses if name not in available_losses()]
    if unknown_losses:
        raise ConfigError(f"Unknown losses {unknown_losses} in {path}; available: {', '.join(available_losses())}.")
    if not config.betas or any(not b > 0 for b in config.betas):
        raise ConfigError(f"`betas` in {path} must be a non-empty list of numbers > 0, got {config.betas!r}.")
    if "logistic" not in config.losses:
        raise ConfigError(f"`losses` in {path} must include logistic: the c_f predictions are relative to it.")
    if config.calibration is not None and config.calibration not in available_losses():
        raise ConfigError(f"`calibration: {config.calibration}` in {path} is not a registered loss.")
    return config


def _has_type(value, annotation: str) -> bool:
    """The YAML value matches the field's annotation (ints are fine where floats are expected; bools never are)."""
    if isinstance(value, bool):
        return False
    expected = {"int": int, "float": (int, float), "list[str]": list, "list[float]": list,
                "str | None": (str, type(None))}
    return isinstance(value, expected[annotation])
