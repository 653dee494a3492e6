"""TRL 1.16's DPOConfig loss options in GPO's terms: what each `loss_type` entry is, and the knobs that reshape
the margin (LD-DPO, f-divergences) or the pair weights (WPO).

The rule where `gpo_loss` and `loss_type` meet: the loss is DPOTrainer's, the weighted sum over the `loss_type`
entries with `loss_weights`, and the `sigmoid` entry is the GPO slot, f = `gpo_loss` (logistic by default, which is
DPO's sigmoid exactly). So `loss_type` alone behaves as in DPOTrainer, `gpo_loss` alone is GPO as always, and
`gpo_loss` with a list puts f next to TRL's terms (`[sigmoid, bco_pair, sft]` with `gpo_loss: exponential` is
MPO with the exponential f). Every other entry is computed as DPOTrainer computes it:

- the entries that are f(beta * rho) for a fixed f (hinge, ipo, robust, exo_pair, discopop, sigmoid_norm) run as
  that GPO loss (`MARGIN_LOSS_TYPES`), with GPO's diagnostics;
- the others (nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down) and `sft` run through
  DPOTrainer's own `_compute_loss` (see `trl_terms_loss`).

The three knobs below mirror DPOTrainer 1.16's few lines for them (the package pins TRL 1.16, and the parity tests
check them against DPOTrainer step for step), so that they apply to any f, not only to TRL's.

Contract: the config side (`check_options`, `slot_kwargs`, `build_plan`) reads `GPOConfig` keys and builds nothing
else; the trainer side (`sequence_logps`, `divergence_scores`, `wpo_weights`, `trl_terms_loss`) reads tensors of one
forward. `trl_terms_loss` relies on DPOTrainer 1.16's `_compute_loss(model, inputs, return_outputs)` and the trainer
state it reads (`loss_types`, `loss_weights`, `precompute_ref_logps`, `aux_loss_enabled`, `beta`, `_metrics`,
`_total_train_tokens`), which it sets for the call only and restores.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import GPOLoss, get_loss

# loss_type entry -> (GPO loss, kwargs from DPOConfig keys, per-token margin, beta multiplier, weight(beta))
# ipo: (rho_bar - 1/(2 beta))^2 = (2 beta rho_bar - 1)^2 / (4 beta^2), i.e. squared at 2 beta, weighted 1/(4 beta^2)
MARGIN_LOSS_TYPES = {
    "sigmoid": None,  # the GPO slot: f = gpo_loss
    "hinge": ("hinge", {}, False, 1.0, None),
    "ipo": ("squared", {}, True, 2.0, lambda beta: 1 / (4 * beta**2)),
    "robust": ("robust", {"label_smoothing": "label_smoothing"}, False, 1.0, None),
    "exo_pair": ("exo_pair", {"label_smoothing": "label_smoothing"}, False, 1.0, None),
    "discopop": ("discopop", {"tau": "discopop_tau"}, False, 1.0, None),
    "sigmoid_norm": ("logistic", {}, True, 1.0, None),
}
TRL_LOSS_TYPES = ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "sft")
LOSS_TYPES = (*MARGIN_LOSS_TYPES, *TRL_LOSS_TYPES)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_LOSS_TYPES = {*MARGIN_LOSS_TYPES, "sft"}  # DPOTrainer's own list
# The gpo_* keys that shape the slot's term, with their defaults
_SLOT_KEYS = {"gpo_loss": "logistic", "gpo_loss_kwargs": None, "gpo_length_normalize": False, "gpo_margin": 0.0,
              "beta_calibration": None}
# DPOConfig keys that are parameters of a GPO loss, and their DPOConfig defaults
_LOSS_PARAMETERS = {"robust": ("label_smoothing", "label_smoothing", 0.0),
                    "exo_pair": ("label_smoothing", "label_smoothing", 0.0),
                    "discopop": ("tau", "discopop_tau", 0.05)}


@dataclass(frozen=True)
class MarginTerm:
    """weight * mean over pairs of f(beta * rho - margin): one `loss_type` entry that is a member of the family."""

    entry: str  # the loss_type entry
    loss: GPOLoss
    beta: float
    weight: float
    length_normalize: bool  # rho from per-token averages of each completion's log-ratio (score)
    margin: float = 0.0

    def describe(self) -> str:
        kwargs = f" {self.loss.kwargs}" if self.loss.kwargs else ""
        rho = "per-token rho" if self.length_normalize else "rho"
        gamma = f" - {self.margin:g}" if self.margin else ""
        weight = "" if self.weight == 1 else f", weight {self.weight:g}"
        return (f"loss_type {self.entry!r} -> gpo_loss {self.loss.name!r}{kwargs}: f(t) = {self.loss.formula}, "
                f"t = {self.beta:g} * {rho}{gamma}{weight}")


@dataclass(frozen=True)
class LossPlan:
    margin_terms: tuple[MarginTerm, ...]
    trl_terms: tuple[tuple[str, float], ...]  # (loss_type entry, weight), computed by DPOTrainer's code

    def describe(self) -> str:
        lines = [term.describe() for term in self.margin_terms]
        lines += [f"loss_type {entry!r} -> DPOTrainer's own term" + ("" if weight == 1 else f", weight {weight:g}")
                  for entry, weight in self.trl_terms]
        return "; ".join(lines)


def slot_kwargs(args) -> dict:
    """`gpo_loss_kwargs`, with DPOConfig's `label_smoothing` / `discopop_tau` filled in when `gpo_loss` is the loss
    they parameterise (robust, exo_pair, discopop) and they are set; both set and different is an error."""
    kwargs = dict(args.gpo_loss_kwargs or {})
    if args.gpo_loss in _LOSS_PARAMETERS:
        name, key, default = _LOSS_PARAMETERS[args.gpo_loss]
        value = getattr(args, key)
        if value != default:
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"`{key}={value}` and `gpo_loss_kwargs: {{{name}: {kwargs[name]}}}` both set the "
                                 f"{args.gpo_loss} loss's {name} and disagree. Keep one.")
            kwargs[name] = value
    return kwargs


def build_plan(args, slot_loss: GPOLoss, slot_beta: float) -> LossPlan:
    weights = args.loss_weights or [1.0] * len(args.loss_type)
    margin_terms, trl_terms = [], []
    for entry, weight in zip(args.loss_type, weights, strict=True):
        if entry == "sigmoid":
            margin_terms.append(MarginTerm(entry, slot_loss, slot_beta, float(weight), args.gpo_length_normalize,
                                           float(args.gpo_margin)))
        elif entry in MARGIN_LOSS_TYPES:
            name, keys, normalize, beta_scale, scale = MARGIN_LOSS_TYPES[entry]
            loss = get_loss(name, **{kwarg: getattr(args, key) for kwarg, key in keys.items()})
            weight = float(weight) * (scale(args.beta) if scale else 1.0)
            margin_terms.append(MarginTerm(entry, loss, beta_scale * float(args.beta), weight, normalize))
        else:
            trl_terms.append((entry, float(weight)))
    return LossPlan(tuple(margin_terms), tuple(trl_terms))


def check_options(args):
    """Refuse, before any model is loaded, the settings DPOTrainer refuses or that are ill-defined; warn about
    DPOConfig keys that no term reads (DPOTrainer ignores them silently)."""
    entries = args.loss_type
    if not entries:
        raise ValueError("`loss_type` is an empty list: give at least one entry (e.g. `sigmoid`, where `gpo_loss` "
                         "goes) or leave it unset.")
    for entry in entries:
        if entry not in LOSS_TYPES:
            raise ValueError(f"`loss_type` entry {entry!r} is not a TRL 1.16 loss type. Accepted: "
                             f"{', '.join(LOSS_TYPES)}; for a GPO loss set `gpo_loss` instead.")
    if args.ld_alpha is not None and not (isinstance(args.ld_alpha, (int, float)) and 0 <= args.ld_alpha <= 1):
        raise ValueError(f"`ld_alpha` must be in [0, 1] (1 = plain sums, 0 = only the tokens both completions "
                         f"share), got {args.ld_alpha!r}.")
    _check_f_divergence(args, entries)
    if args.use_weighting and {"aot", "aot_unpaired"} & set(entries):
        raise ValueError("`use_weighting: true` (WPO) cannot be combined with `loss_type` aot / aot_unpaired: those "
                         "sort the batch's margins, so a per-pair weight no longer belongs to its pair (DPOTrainer "
                         "refuses it too). Drop one of them.")
    if args.use_weighting and "sft" in entries:
        raise ValueError("`use_weighting: true` (WPO) cannot be combined with `loss_type` sft: WPO weights each pair, "
                         "and sft is one batch-level NLL (DPOTrainer 1.16 fails on it at the first step, multiplying "
                         "the expanded NLL in place). Drop sft from loss_type and use `sft_coef` (GPO's SFT term, "
                         "the same NLL, unweighted).")
    if "exo_pair" in entries and args.label_smoothing == 0.0:
        raise ValueError("`loss_type` exo_pair needs `label_smoothing` > 0 (the EXO paper uses 1e-3; DPOTrainer "
                         "refuses 0 too).")
    if "robust" in entries and not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"`loss_type` robust needs 0 <= `label_smoothing` < 0.5 (the assumed flip rate; its loss "
                         f"divides by 1 - 2 * label_smoothing), got {args.label_smoothing}.")
    if "sigmoid" not in entries:
        for key, default in _SLOT_KEYS.items():
            value = getattr(args, key)
            if (value or None) != (default or None):
                raise ValueError(
                    f"`{key}={value!r}` shapes the gpo_loss term, which is loss_type's 'sigmoid' entry, but "
                    f"loss_type={entries} has none. Add 'sigmoid' to loss_type (and a loss_weights entry), or "
                    f"remove `{key}`.")
    _warn_unread(args, entries)


def _check_f_divergence(args, entries):
    kind = args.f_divergence_type
    if kind not in F_DIVERGENCES:
        raise ValueError(f"`f_divergence_type` must be one of {list(F_DIVERGENCES)}, got {kind!r}.")
    if kind == "reverse_kl":
        return
    for entry in entries:
        if entry not in _F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"`f_divergence_type={kind}` cannot be combined with `loss_type` {entry!r}: the f-DPO "
                "reparameterisation leaves a beta * log Z(x) term that cancels only in the chosen-minus-rejected "
                f"margin, and {entry} is not a function of that margin (DPOTrainer refuses it too). Use reverse_kl "
                f"or drop {entry}.")
    if args.gpo_reference == "none":
        raise ValueError(f"`f_divergence_type={kind}` is a divergence from the reference model, but "
                         "`gpo_reference: none` has none: its score would be f' of the raw sequence probability "
                         "(forward_kl's 1 - 1/pi(y) overflows). Use reverse_kl (the reference-free margin) or "
                         "`gpo_reference: model`.")


def _warn_unread(args, entries):
    readers = set(entries) | ({args.gpo_loss} if "sigmoid" in entries else set())
    unread = []
    if args.label_smoothing != 0.0 and not readers & {"robust", "exo_pair", "aot", "aot_unpaired"}:
        unread.append(("label_smoothing", "loss_type robust, exo_pair, aot, aot_unpaired or gpo_loss robust, "
                       "exo_pair (TRL 1.16's sigmoid has no label smoothing)"))
    if args.discopop_tau != 0.05 and "discopop" not in readers:
        unread.append(("discopop_tau", "loss_type or gpo_loss discopop"))
    if args.f_alpha_divergence_coef != 0.5 and args.f_divergence_type != "alpha_divergence":
        unread.append(("f_alpha_divergence_coef", "f_divergence_type alpha_divergence"))
    for key, reader in unread:
        warnings.warn(f"`{key}={getattr(args, key)}` has no effect here, as in DPOTrainer: only {reader} read it.",
                      stacklevel=3)


# --- The knobs, mirroring DPOTrainer 1.16 -------------------------------------------------------------------------


def sequence_logps(per_token_logps: torch.Tensor, token_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """(2B,) log-probs of the completions. LD-DPO (`ld_alpha`): the tokens up to the shorter completion's length of
    the pair count fully, those past it count `ld_alpha` times. `per_token_logps` is 0 off the completion."""
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    position = token_mask.cumsum(dim=1)  # 1, 2, ... along each completion
    shared = torch.minimum(*token_mask.sum(dim=1).long().chunk(2)).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared)
    tail_mask = position > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


def divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """The score whose chosen-minus-rejected difference is the margin under the f-divergence: f'(u) of the policy
    to reference ratio u = exp(h), up to a constant (f-DPO, Wang et al. 2023). reverse_kl: h itself."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":  # f'(u) = 1 - 1/u
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
        return math.log(2) + F.logsigmoid(logratios)
    # alpha: f'(u) = (u^(alpha-1) - 1) / (alpha - 1); exponent capped where float16 / float32 would overflow
    exponent = (alpha - 1.0) * logratios
    cap = 11.0 if exponent.dtype == torch.float16 else 80.0
    return (torch.exp(torch.clamp(exponent.float(), max=cap)) - 1.0).to(exponent.dtype) * (1.0 / (alpha - 1.0))


def wpo_weights(per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor,
                token_mask: torch.Tensor) -> torch.Tensor:
    """(B,) WPO pair weights (Zhou et al. 2024, Eq. 2), no gradient: for each completion exp of the mean over its
    tokens of log p(y_t) - log sum_v p(v)^2, and the pair's weight is the product of its two completions'."""
    with torch.no_grad():
        aligned = (per_token_logps - log_sum_sq_probs) * token_mask
    weights = torch.exp(aligned.sum(dim=1) / token_mask.sum(dim=1).clamp_min(1))
    chosen, rejected = weights.chunk(2)
    return chosen * rejected


def trl_terms_loss(trainer, outputs, inputs, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """The `loss_type` terms that are not f(beta * rho) (bco_pair, sppo_hard, nca_pair, aot, aot_unpaired,
    apo_zero, apo_down, sft), weighted and summed by DPOTrainer's own `_compute_loss`. It is handed this
    forward's outputs (the model it calls returns them) and the reference log-probs as if precomputed, so it runs
    no forward; it applies `ld_alpha` and WPO to its terms itself. Its metrics, which GPO logs itself, go to a
    scratch store, and the state it reads is set for the call only."""
    from trl import DPOTrainer  # here, not at the top: GPOConfig imports this module without transformers' Trainer

    mask = inputs["completion_mask"]
    if not torch.is_tensor(ref_chosen_logps):  # gpo_reference: none -> reference log-probs 0
        ref_chosen_logps = ref_rejected_logps = outputs.log_probs.new_zeros(mask.size(0) // 2)
    replay = {"input_ids": mask, "attention_mask": mask, "completion_mask": mask,
              "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    entries, weights = zip(*trainer.loss_plan.trl_terms, strict=True)
    view = {"loss_types": list(entries), "loss_weights": list(weights), "precompute_ref_logps": True,
            "aux_loss_enabled": False, "beta": float(trainer.args.beta),
            "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)}}
    saved = {name: getattr(trainer, name) for name in [*view, "_total_train_tokens"]}
    try:
        for name, value in view.items():
            setattr(trainer, name, value)
        return DPOTrainer._compute_loss(trainer, lambda **_: outputs, replay, return_outputs=False)
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
