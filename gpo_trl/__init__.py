"""gpo_trl: Generalized Preference Optimization (GPO) for Hugging Face TRL."""

from packaging.version import Version

from .fourbit import hold_back_import_warning

hold_back_import_warning()  # before peft imports bitsandbytes: its optional-kernel warning is not an error

import trl  # noqa: E402

# GPOTrainer mirrors a few TRL internals (the fused LM head's outputs, the `_metrics` store, the collator's
# [chosen; rejected] layout). They were checked against this TRL minor version only.
_TRL_TESTED = "1.16"
if Version(trl.__version__).release[:2] != Version(_TRL_TESTED).release[:2]:
    raise ImportError(
        f"gpo_trl was tested with trl {_TRL_TESTED}.x, but trl {trl.__version__} is installed. GPOTrainer "
        f"overrides DPOTrainer internals that change between TRL minor versions. Install a matching TRL: "
        f"pip install 'trl>={_TRL_TESTED},<1.{int(_TRL_TESTED.split('.')[1]) + 1}'"
    )

from .config import CalibrationError, GPOConfig  # noqa: E402
from .losses import GPOLoss, available_losses, get_loss, register_loss  # noqa: E402
from .trainer import GPOTrainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CalibrationError", "GPOConfig", "GPOLoss", "GPOTrainer", "available_losses", "get_loss", "register_loss"]
