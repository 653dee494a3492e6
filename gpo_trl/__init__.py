"""gpo_trl: Generalized Preference Optimization (GPO) for Hugging Face TRL.

The public names load on first use (PEP 562), so that `gpo-trl --help`, `gpo-trl losses` and the error messages of
the command line do not wait for transformers and TRL to import.
"""

import importlib
from importlib.metadata import version

from packaging.version import Version

from .fourbit import hold_back_import_warning
from .quiet import hold_back_library_warnings

hold_back_import_warning()  # before peft imports bitsandbytes: its optional-kernel warning is not an error
hold_back_library_warnings()  # deprecation lines from peft's/TRL's calls, shown again with --verbose (gpo_trl.quiet)

# GPOTrainer mirrors a few TRL internals (the fused LM head's outputs, the `_metrics` store, the collator's
# [chosen; rejected] layout). They were checked against this TRL minor version only. The installed distribution's
# version is read without importing TRL.
_TRL_TESTED = "1.16"
_trl_installed = version("trl")
if Version(_trl_installed).release[:2] != Version(_TRL_TESTED).release[:2]:
    raise ImportError(
        f"gpo_trl was tested with trl {_TRL_TESTED}.x, but trl {_trl_installed} is installed. GPOTrainer "
        f"overrides DPOTrainer internals that change between TRL minor versions. Install a matching TRL: "
        f"pip install 'trl>={_TRL_TESTED},<1.{int(_TRL_TESTED.split('.')[1]) + 1}'"
    )

__version__ = "0.1.0"
_PUBLIC = {"CalibrationError": "errors", "GPOConfig": "config", "GPOLoss": "losses", "available_losses": "losses",
           "builtin_losses": "losses", "get_loss": "losses", "register_loss": "losses", "GPOTrainer": "trainer",
           "register_reward": "auxiliary"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gpo_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
