"""`GPOConfig`: TRL's `DPOConfig` plus the choice of the GPO loss function f."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import DPOConfig

from .losses import GPOLoss, available_losses, get_loss

# DPOConfig knobs that only act inside TRL's own loss branches. GPOTrainer replaces those branches, so a non-default
# value would be silently ignored: refuse it instead, and say what to use.
_TRL_LOSS_ONLY_KNOBS = {
    "loss_weights": (None, "GPO trains one loss f; combine losses in your own f and name it in `gpo_loss`"),
    "ld_alpha": (None, "length-desensitised DPO is not part of GPO; use `gpo_length_normalize: true` instead"),
    "f_divergence_type": ("reverse_kl", "GPO uses the reverse-KL log-ratio margin"),
    "use_weighting": (False, "WPO weighting is not part of GPO"),
    "label_smoothing": (0.0, "label smoothing belongs to TRL's robust/exo/aot losses; write it into your own f"),
}


@dataclass
class GPOConfig(DPOConfig):
    r"""
    Configuration class for [`GPOTrainer`]: every [`trl.DPOConfig`] parameter, plus the GPO loss.

    GPO (Tang et al. 2024) minimises E[f(beta * rho)], with rho the chosen-minus-rejected log-ratio margin.
    TRL's `loss_type` is replaced by `gpo_loss`; `beta` keeps its DPO meaning.

    Parameters:
        > Parameters that control the GPO loss

        gpo_loss (`str`, *optional*, defaults to `"logistic"`):
            The convex function f: a registered name (`gpo-trl losses` lists them: logistic = DPO, hinge = SLiC,
            squared = IPO, exponential, truncated_quadratic, savage) or an import path `"package.module:function"`.
        gpo_loss_kwargs (`dict`, *optional*):
            Keyword arguments passed to f with every call.
        gpo_length_normalize (`bool`, *optional*, defaults to `False`):
            Use the per-token average of each completion's log-ratio instead of its sum (as TRL's IPO does).
        beta_calibration (`str`, *optional*):
            Name of a reference loss g. When set, f runs at `beta * c_g / c_f`, the beta that gives f the
            offline-regularisation strength g has at `beta` (c_f = f''(0) / 2|f'(0)|).
    """

    gpo_loss: str = field(
        default="logistic",
        metadata={
            "help": "GPO convex function f(t), t = beta * margin: a registered name (logistic = DPO, hinge = SLiC, "
            "squared = IPO, exponential, truncated_quadratic, savage; `gpo-trl losses` lists all) or an import path "
            "'package.module:function'."
        },
    )
    gpo_loss_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments passed to the GPO loss function (a mapping, or JSON on the command line)."},
    )
    gpo_length_normalize: bool = field(
        default=False,
        metadata={"help": "Average each completion's log-ratio over its tokens instead of summing (IPO-style)."},
    )
    beta_calibration: str | None = field(
        default=None,
        metadata={
            "help": "Reference loss g: run gpo_loss at beta * c_g / c_f, i.e. with the offline-regularisation "
            "strength g has at `beta`. Undefined for hinge (c = 0)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_trl_loss_knobs()
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"`beta` must be a number > 0, got {self.beta!r}.")
        if isinstance(self.gpo_loss_kwargs, str):
            self.gpo_loss_kwargs = _parse_json_mapping("gpo_loss_kwargs", self.gpo_loss_kwargs)
        if self.gpo_loss_kwargs is not None and not isinstance(self.gpo_loss_kwargs, dict):
            raise ValueError(f"`gpo_loss_kwargs` must be a mapping, got {type(self.gpo_loss_kwargs).__name__}.")
        loss = self.build_loss()  # validates the function now, before any model is loaded
        if self.beta_calibration is not None:
            self._check_calibration(loss)

    def build_loss(self) -> GPOLoss:
        """The validated loss object for `gpo_loss` with `gpo_loss_kwargs` bound."""
        return get_loss(self.gpo_loss, **(self.gpo_loss_kwargs or {}))

    @property
    def effective_beta(self) -> float:
        """The beta the loss runs at: `beta`, or `beta * c_g / c_f` under `beta_calibration`."""
        if self.beta_calibration is None:
            return float(self.beta)
        return float(self.beta) * get_loss(self.beta_calibration).c_f / self.build_loss().c_f

    def _check_trl_loss_knobs(self):
        if self.loss_type != ["sigmoid"]:
            raise ValueError(
                f"`loss_type={self.loss_type}` is TRL's loss selector; GPOTrainer replaces it. Remove `loss_type` and "
                f"set `gpo_loss` instead (sigmoid -> logistic, hinge -> hinge, ipo -> squared with "
                f"gpo_length_normalize=true and beta = 2 * tau). Available: {', '.join(available_losses())}."
            )
        for name, (default, reason) in _TRL_LOSS_ONLY_KNOBS.items():
            if getattr(self, name) != default:
                raise ValueError(f"`{name}={getattr(self, name)!r}` has no effect in GPOTrainer ({reason}). Remove it.")

    def _check_calibration(self, loss: GPOLoss):
        if self.beta_calibration not in available_losses():
            raise ValueError(
                f"`beta_calibration={self.beta_calibration!r}` is not a registered loss. "
                f"Available: {', '.join(available_losses())}."
            )
        reference = get_loss(self.beta_calibration)
        for which in (reference, loss):
            if which.c_f <= 0:
                raise ValueError(
                    f"`beta_calibration` is undefined with {which.name!r}: its c_f = f''(0) / 2|f'(0)| is "
                    f"{which.c_f:g}, so it has no curvature-based offline regulariser to match (hinge regularises "
                    "through its margin). Unset `beta_calibration` or use a loss with f''(0) > 0."
                )


def _parse_json_mapping(name: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{name}` must be a JSON mapping such as '{{\"margin\": 2.0}}', got {text!r}: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a JSON mapping, got {text!r}.")
    return value
