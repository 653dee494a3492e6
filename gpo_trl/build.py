"""Building the objective from a `GPOConfig`: the loss f, the beta it runs at, the `loss_type` plan, the rewards.

Contract: these functions read `GPOConfig` keys (`gpo_loss`, `gpo_loss_kwargs` and the DPOConfig keys that
parameterise it, `beta`, `beta_calibration`, `loss_type`, `loss_weights`, `aux_rewards`, `aux_coef`) and return new
objects; they change nothing. A bad name or argument raises from the registry that resolves it (`get_loss`,
`resolve_reward`) or from `trl_compat.slot_kwargs`. `GPOConfig.__post_init__` builds once as a trial, so that a
bad value fails when the config is parsed, before any model loads; `GPOTrainer.__init__` calls `build_objective` once and keeps what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .auxiliary import WeightedReward, resolve_reward
from .losses import GPOLoss, get_loss
from .trl_compat import LossPlan, build_plan, slot_kwargs


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises, as built from its config."""

    loss: GPOLoss  # f of the `sigmoid` slot (`gpo_loss`)
    beta: float  # the beta f runs at (`effective_beta`)
    plan: LossPlan  # every `loss_type` term with its weight
    aux_rewards: list[WeightedReward]  # [] when the auxiliary objective is off


def build_loss(args) -> GPOLoss:
    """The loss object for `gpo_loss` with `gpo_loss_kwargs` bound (and DPOConfig's `label_smoothing` or
    `discopop_tau` when `gpo_loss` is robust, exo_pair or discopop and they are set)."""
    return get_loss(args.gpo_loss, **slot_kwargs(args))


def effective_beta(args, loss: GPOLoss) -> float:
    """The beta `loss` runs at: `beta`, or `beta * c_g / c_f` under `beta_calibration` (g the named loss)."""
    if args.beta_calibration is None:
        return float(args.beta)
    return float(args.beta) * get_loss(args.beta_calibration).c_f / loss.c_f


def build_loss_plan(args, loss: GPOLoss | None = None) -> LossPlan:
    """Every `loss_type` term with its weight, the `sigmoid` one being `loss` (default: `build_loss(args)`) at its
    effective beta (see gpo_trl.trl_compat)."""
    loss = build_loss(args) if loss is None else loss
    return build_plan(args, loss, effective_beta(args, loss))


def build_aux_rewards(args) -> list[WeightedReward]:
    """The auxiliary rewards, or [] when the objective is off (aux_coef == 0 or no rewards)."""
    if not args.aux_coef or not args.aux_rewards:
        return []
    return [resolve_reward(spec) for spec in args.aux_rewards]


def build_objective(args) -> Objective:
    """The loss, its beta, the `loss_type` plan (whose `sigmoid` term is f = `gpo_loss` at that beta) and the
    auxiliary rewards, each built once."""
    loss = build_loss(args)
    beta = effective_beta(args, loss)
    return Objective(loss, beta, build_plan(args, loss, beta), build_aux_rewards(args))
