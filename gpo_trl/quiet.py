"""Quiet by default, everything with `--verbose`.

gpo_trl's own configs and calls use the current names (`activation_checkpointing`, `is_activation_checkpointing`),
so they raise no deprecation warning. Two lines remain that come from libraries' calls which gpo_trl cannot change;
they are held back here, by their exact text, and only while not verbose:

- transformers 5's FutureWarnings "`is_gradient_checkpointing` / `gradient_checkpointing_disable` /
  `gradient_checkpointing_enable` is deprecated": raised when peft's `PeftModel.__init__` and TRL 1.16's
  `disable_gradient_checkpointing` (around `DPOTrainer.compute_ref_log_probs`) use the old names.
- kernels' "Skipping publisher trust check for 'kernels-community/...' because Hugging Face Hub is in offline
  mode": bitsandbytes, imported by peft, asks `kernels` for an optional CPU kernel on every import (see
  gpo_trl.fourbit, which holds back bitsandbytes' own line about it the same way).

Verbose means: `gpo-trl --verbose ...` (or `GPO_TRL_VERBOSE=1`), or `TRANSFORMERS_VERBOSITY` set to info or debug.
It shows those lines again, and `--verbose` also sets transformers' and datasets' log level to info unless
TRANSFORMERS_VERBOSITY / DATASETS_VERBOSITY say otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, start of the message) of each warning held back while not verbose
LIBRARY_WARNINGS = [(FutureWarning, f"`{name}` is deprecated") for name in
                    ("is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable")]
# (logger, start of the message) of each log record held back while not verbose
LIBRARY_LOG_LINES = [("kernels._internals.hf_hub", "Skipping publisher trust check for ")]


def is_verbose() -> bool:
    return (os.environ.get("GPO_TRL_VERBOSE", "") not in ("", "0", "false")
            or os.environ.get("TRANSFORMERS_VERBOSITY", "").lower() in ("info", "debug"))


class _HoldBack(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return is_verbose() or not record.getMessage().startswith(self.prefix)


def hold_back_library_warnings():
    """Install the filters (idempotent). Called when gpo_trl is imported, before peft, bitsandbytes or TRL are."""
    if is_verbose():
        return
    for category, prefix in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=_regex(prefix), category=category)
    for name, prefix in LIBRARY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HoldBack) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_HoldBack(prefix))


def set_verbose():
    """What `--verbose` does: the held-back lines come back (in this process and its children) and the libraries
    log at info level unless their own variables say otherwise."""
    os.environ["GPO_TRL_VERBOSE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
    os.environ.setdefault("DATASETS_VERBOSITY", "info")
    held = {_regex(prefix) for _, prefix in LIBRARY_WARNINGS}
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in held)]
    getattr(warnings, "_filters_mutated", lambda: None)()  # drop the warnings module's cached decisions


def _regex(prefix: str) -> str:
    import re

    return re.escape(prefix)
