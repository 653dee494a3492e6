"""`GPOConfig`: TRL's `DPOConfig` plus the choice of the GPO loss function f.

The config checks values and names the key at fault when it is parsed; the objects it describes (the loss, the
`loss_type` plan, the auxiliary rewards) are built by `gpo_trl.build`. `__post_init__` builds them once as a trial,
so a bad loss or reward fails before any model loads; the trainer builds its own once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from trl import DPOConfig

from . import build
from .auxiliary import WeightedReward, probe
from .errors import CalibrationError
from .losses import GPOLoss, available_losses, get_loss
from .nonfinite import NONFINITE_POLICIES
from .packing import PACKING_STRATEGIES
from .trl_compat import LossPlan, check_options

REFERENCES = ("model", "none")


@dataclass
class GPOConfig(DPOConfig):
    r"""
    Configuration class for [`GPOTrainer`]: every [`trl.DPOConfig`] parameter, plus the GPO loss.

    GPO (Tang et al. 2024) minimises E[f(beta * rho)], with rho the chosen-minus-rejected log-ratio margin.
    `beta` keeps its DPO meaning. Every DPOConfig loss option works as in DPOTrainer: the loss is the weighted sum
    over `loss_type` (`loss_weights`), whose `sigmoid` entry (the default) is f = `gpo_loss`; the `gpo_*` keys
    shape that term. `use_weighting`, `ld_alpha` and `f_divergence_type` apply to every term. See
    `gpo_trl.trl_compat`.

    Parameters:
        > Parameters that control the GPO loss

        gpo_loss (`str`, *optional*, defaults to `"logistic"`):
            The convex function f: a registered name (`gpo-trl losses` lists them: logistic = DPO, hinge = SLiC,
            squared = IPO, exponential, truncated_quadratic, savage) or an import path `"package.module:function"`.
        gpo_loss_kwargs (`dict`, *optional*):
            Keyword arguments passed to f with every call.
        gpo_length_normalize (`bool`, *optional*, defaults to `False`):
            Use the per-token average of each completion's log-ratio instead of its sum (as TRL's IPO does).
        gpo_reference (`str`, *optional*, defaults to `"model"`):
            `model`: rho is the margin of log-ratios against the reference model (DPO's). `none`: reference-free,
            the reference log-probs are taken as 0, so no reference model is loaded and no reference pass runs
            (with `gpo_length_normalize` and logistic f this is SimPO).
        gpo_margin (`float`, *optional*, defaults to `0.0`):
            gamma, a target margin subtracted inside f: the loss is f(beta * rho - gamma) (SimPO's gamma).
        sft_coef (`float`, *optional*, defaults to `0.0`):
            Weight of an SFT term added to the GPO loss: the NLL of the chosen completions, averaged over their
            tokens in the batch (TRL's `sft` loss; RPO's alpha). Logged as `gpo/sft_loss`; 0 disables it.
        beta_calibration (`str`, *optional*):
            Name of a reference loss g. When set, f runs at `beta * c_g / c_f`, the beta that gives f the
            offline-regularisation strength g has at `beta` (c_f = f''(0) / 2|f'(0)|).

        > Parameters that control the auxiliary (UPO-style) objective; see `gpo_trl.auxiliary`

        aux_rewards (`list[dict]`, *optional*):
            Designer rewards `{name, weight, kwargs}`: built-ins `length`, `readability`, `lexicon`, `regex`, or an
            import path to `f(prompt, completion, **kwargs) -> float`. Scored once per row when the data is prepared.
        aux_coef (`float`, *optional*, defaults to `0.0`):
            alpha: weight of the auxiliary loss next to the GPO loss; 0 disables it.
        aux_temperature (`float`, *optional*, defaults to `1.0`):
            tau, in reward units: a response's auxiliary weight is max(tanh(A / tau), 0), A its advantage over the
            pair mean.

        > Parameters that control the batch layout; see `gpo_trl.packing`

        padding_free (`bool`, *optional*, defaults to `False`):
            Pack the batch's sequences into rows without padding (position ids restart per sequence). TRL 1.16
            disables this for DPO; GPOTrainer implements it. Exact: same loss and gradients as padded batches.
        packing_strategy (`str`, *optional*, defaults to `"bfd"`):
            With `padding_free`: `bfd` fills rows of at most `max_length` tokens by best-fit-decreasing, `one_row`
            puts the whole batch in a single row (quadratic attention cost over the row on sdpa/eager).
        prefix_sharing (`bool`, *optional*, defaults to `False`):
            Run each pair as one sequence [prompt, chosen, rejected] with a mask that hides the chosen tokens from the
            rejected ones, so the prompt is computed once. Needs sdpa or eager attention and `keep_start` truncation.

        > Parameters that keep long runs safe; see `gpo_trl.guards`

        on_nonfinite (`str`, *optional*, defaults to `"stop"`):
            A NaN/inf loss or gradient: `stop` (error naming the step, before the update; checkpoints intact) or
            `skip` (drop the batch, count it in `gpo/skipped_batches`).
    """

    # TRL's base config defaults the deprecated `gradient_checkpointing` to True, so transformers 5 warned on every
    # config ("use activation_checkpointing"). TRL's default is kept under the new name (set in __post_init__ when
    # neither is given); the old name still works for recipes that use it, and warns as transformers intends.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (removed in transformers v6)."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (~20%% slower). Default: "
                  "true (TRL's default)."},
    )

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
    gpo_reference: str = field(
        default="model",
        metadata={"help": "model: log-ratios against the reference model (DPO); none: reference-free, reference "
                  "log-probs taken as 0 and no reference pass (SimPO with gpo_length_normalize).",
                  "choices": list(REFERENCES)},
    )
    gpo_margin: float = field(
        default=0.0, metadata={"help": "gamma, the target margin: the loss is f(beta * rho - gamma) (SimPO's gamma)."}
    )
    sft_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the chosen completions' per-token NLL added to the GPO loss (RPO's alpha); "
                  "logged as gpo/sft_loss. 0 disables it."},
    )
    beta_calibration: str | None = field(
        default=None,
        metadata={
            "help": "Reference loss g: run gpo_loss at beta * c_g / c_f, i.e. with the offline-regularisation "
            "strength g has at `beta`. Undefined for hinge (c = 0)."
        },
    )

    aux_rewards: list[dict] | str | None = field(
        default=None,
        metadata={"help": "Auxiliary designer rewards, a list of {name, weight, kwargs} (JSON on the command line): "
                  "built-ins length, readability, lexicon, regex, or 'package.module:function'."},
    )
    aux_coef: float = field(
        default=0.0, metadata={"help": "alpha: weight of the auxiliary objective next to the GPO loss; 0 disables it."}
    )
    aux_temperature: float = field(
        default=1.0,
        metadata={"help": "tau, in reward units: a response's auxiliary weight is max(tanh(A / tau), 0); must be > 0."},
    )

    padding_free: bool = field(
        default=False,
        metadata={"help": "Pack the batch's sequences into rows without padding, position ids restarting per sequence "
                  "(exact; TRL disables it for DPO, GPOTrainer implements it)."},
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={"help": "With padding_free: 'bfd' packs rows of at most max_length tokens by best-fit-decreasing, "
                  "'one_row' puts the whole batch in one row.", "choices": list(PACKING_STRATEGIES)},
    )
    prefix_sharing: bool = field(
        default=False,
        metadata={"help": "One sequence [prompt, chosen, rejected] per pair with a branch mask, so the prompt is "
                  "computed once (exact; needs sdpa or eager attention)."},
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where precomputed reference log-probs are kept for reuse across runs (keyed by the "
                  "tokenised data, the reference weights and the truncation settings). Default: the datasets cache "
                  "dir/gpo_trl_ref_logps."},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "On a NaN/inf loss or gradient: stop before the update (error naming the step) or skip the "
                  "batch (counted in gpo/skipped_batches).", "choices": list(NONFINITE_POLICIES)},
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under the name transformers 5 asks for
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or not self.beta > 0 or self.beta == float("inf"):
            raise ValueError(f"`beta` must be a number > 0, got {self.beta!r}.")
        if isinstance(self.gpo_loss_kwargs, str):
            self.gpo_loss_kwargs = _parse_json("gpo_loss_kwargs", self.gpo_loss_kwargs, dict)
        if self.gpo_loss_kwargs is not None and not isinstance(self.gpo_loss_kwargs, dict):
            raise ValueError(f"`gpo_loss_kwargs` must be a mapping, got {type(self.gpo_loss_kwargs).__name__}.")
        check_options(self)  # TRL's loss options (gpo_trl.trl_compat): what DPOTrainer refuses, and contradictions
        loss = build.build_loss(self)  # validates the function now, before any model is loaded
        if self.beta_calibration is not None:
            self._check_calibration(loss)
        build.build_loss_plan(self, loss)  # validates the loss of every loss_type entry
        self._check_reference_and_sft()
        self._check_auxiliary()
        self._check_batch_layout()
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`on_nonfinite` must be one of {list(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}.")

    # Kept for callers of the earlier API: gpo_trl.build builds the objective (and returns a new object per call)

    def build_loss(self) -> GPOLoss:
        """`gpo_trl.build.build_loss` of this config."""
        return build.build_loss(self)

    def loss_plan(self) -> LossPlan:
        """`gpo_trl.build.build_loss_plan` of this config: each `loss_type` term with its weight."""
        return build.build_loss_plan(self)

    @property
    def effective_beta(self) -> float:
        """The beta the loss runs at: `beta`, or `beta * c_g / c_f` under `beta_calibration`."""
        return build.effective_beta(self, build.build_loss(self))

    def build_aux_rewards(self) -> list[WeightedReward]:
        """`gpo_trl.build.build_aux_rewards` of this config: [] when the objective is off."""
        return build.build_aux_rewards(self)

    def _check_auxiliary(self):
        if isinstance(self.aux_rewards, str):
            self.aux_rewards = _parse_json("aux_rewards", self.aux_rewards, list)
        if self.aux_rewards is not None and not isinstance(self.aux_rewards, list):
            raise ValueError(f"`aux_rewards` must be a list of {{name, weight, kwargs}}, got {self.aux_rewards!r}.")
        if not isinstance(self.aux_coef, (int, float)) or self.aux_coef < 0:
            raise ValueError(f"`aux_coef` must be a number >= 0 (0 disables the objective), got {self.aux_coef!r}.")
        if not isinstance(self.aux_temperature, (int, float)) or not 0 < self.aux_temperature < float("inf"):
            raise ValueError(f"`aux_temperature` must be > 0 and finite, got {self.aux_temperature!r}.")
        if self.aux_coef and not self.aux_rewards:
            raise ValueError(f"`aux_coef={self.aux_coef}` needs `aux_rewards` to optimise; add rewards or set 0.")
        probe(build.build_aux_rewards(self))  # a reward that raises or returns a non-number fails here, not at step 500

    def _check_reference_and_sft(self):
        if self.gpo_reference not in REFERENCES:
            raise ValueError(f"`gpo_reference` must be one of {list(REFERENCES)}, got {self.gpo_reference!r}.")
        for name in ("gpo_margin", "sft_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if self.sft_coef < 0:
            raise ValueError(f"`sft_coef` must be >= 0 (0 disables the SFT term), got {self.sft_coef!r}.")
        if self.gpo_reference == "none":
            for name in ("precompute_ref_log_probs", "sync_ref_model"):
                if getattr(self, name):
                    raise ValueError(f"`{name}=True` needs a reference model, but `gpo_reference: none` uses none "
                                     f"(no reference pass runs). Remove `{name}` or set `gpo_reference: model`.")

    def _check_batch_layout(self):
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"`packing_strategy` must be one of {list(PACKING_STRATEGIES)}, got {self.packing_strategy!r}.")
        if self.prefix_sharing and self.truncation_mode != "keep_start" and self.max_length is not None:
            raise ValueError("`prefix_sharing` needs truncation_mode='keep_start' (TRL's default): 'keep_end' cuts the "
                             "prompt of the chosen and the rejected sequence differently, so they no longer share it.")

    def _check_calibration(self, loss: GPOLoss):
        if self.beta_calibration not in available_losses():
            raise ValueError(
                f"`beta_calibration={self.beta_calibration!r}` is not a registered loss. "
                f"Available: {', '.join(available_losses())}."
            )
        reference = get_loss(self.beta_calibration)
        for which in (reference, loss):
            if which.d1_at_0 >= 0:
                raise CalibrationError(f"`beta_calibration` is undefined with {which.name!r}: f'(0) = {which.d1_at_0:g} "
                                 ">= 0, so c_f is not an offline-regularisation strength. Unset `beta_calibration`.")
            if which.c_f <= 0:
                raise CalibrationError(
                    f"`beta_calibration` is undefined with {which.name!r}: its c_f = f''(0) / 2|f'(0)| is "
                    f"{which.c_f:g}, so it has no curvature-based offline regulariser to match (hinge regularises "
                    "through its margin). Unset `beta_calibration` or use a loss with f''(0) > 0."
                )


def _parse_json(name: str, text: str, kind: type):
    what = "mapping such as '{\"margin\": 2.0}'" if kind is dict else "list such as '[{\"name\": \"length\"}]'"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{name}` must be a JSON {what}, got {text!r}: {err}") from err
    if not isinstance(value, kind):
        raise ValueError(f"`{name}` must be a JSON {what}, got {text!r}.")
    return value
