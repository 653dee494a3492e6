"""The GPO loss family: convex functions f of the scaled margin t = beta * rho.

GPO (Tang et al. 2024, arXiv 2402.05749) writes every offline preference loss as E[f(beta * rho)], with rho the
chosen-minus-rejected log-ratio margin. This module is the registry of those functions f.

Adding a loss is one short function plus its decorator::

    @register_loss("my_loss", convex=True)
    def my_loss(t):
        "f(t) = ..."
        return ...

`get_loss("my_loss")` or `get_loss("package.module:function")` returns a validated `GPOLoss` whose f'(0) and
f''(0) are measured with autograd, never typed in by hand.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]

# Exponential loss: exact while e^-t <= e^_EXP_CAP, tangent line beyond. A pair at t = -20 already weighs e^20 ~ 5e8
# times a pair at t = 0; capping the slope there keeps values, batch means and the gradients that flow back through
# the network (times beta, in bfloat16) finite, where e^50 was measured to overflow the backward pass at beta = 1e4.
_EXP_CAP = 20.0


@dataclass(frozen=True)
class _Entry:
    fn: LossFn
    formula: str
    convex: bool | None  # declared by the registrant; None means "measure it"
    descends_at_zero: bool = True  # f'(0) < 0 required; False only for a registered loss shipped as published


_REGISTRY: dict[str, _Entry] = {}
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class GPOLoss:
    """A validated GPO loss: call it on t = beta * rho to get f(t) elementwise."""

    name: str
    fn: LossFn = field(repr=False)
    formula: str
    convex: bool
    d1_at_0: float  # f'(0), measured with autograd; must be < 0 so that minimising f pushes the margin up
    d2_at_0: float  # f''(0), measured with autograd
    kwargs: dict = field(default_factory=dict)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t, **self.kwargs)

    @property
    def c_f(self) -> float:
        """Offline-regularisation constant c_f = f''(0) / (2 |f'(0)|).

        Per unit of push (E f(beta rho) divided by beta |f'(0)|) the second-order term is beta * c_f * E[rho^2]:
        strength beta * c_f on E[rho^2], i.e. 2 * beta * c_f on the logged `gpo/offline_reg` = 1/2 E[rho^2].
        """
        return self.d2_at_0 / (2 * abs(self.d1_at_0))

    def derivative(self, t: torch.Tensor) -> torch.Tensor:
        """f'(t) elementwise, by autograd on a detached copy (used for the `gpo/push` diagnostic)."""
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(t).sum(), t)
        return grad


def register_loss(name: str, *, formula: str | None = None, convex: bool | None = None,
                  descends_at_zero: bool = True):
    """Decorator that registers `f(t: Tensor, **kwargs) -> Tensor` under `name`.

    `formula` defaults to the first line of the function's docstring. `convex` declares the function's convexity;
    leave it `None` to have it measured numerically when the loss is built. `descends_at_zero=False` waives the
    f'(0) < 0 check, for a published loss that rises at 0 for some kwargs (DiscoPOP).
    """
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"Loss name {name!r} is invalid: use lowercase letters, digits and underscores.")
    if name in _REGISTRY:
        raise ValueError(f"A loss named {name!r} is already registered; pick another name.")

    def decorator(fn: LossFn) -> LossFn:
        _REGISTRY[name] = _Entry(fn=fn, formula=formula or _first_doc_line(fn, name), convex=convex,
                                 descends_at_zero=descends_at_zero)
        return fn

    return decorator


def available_losses() -> list[str]:
    """Names of the registered losses, in registration order."""
    return list(_REGISTRY)


def get_loss(name: str, **kwargs) -> GPOLoss:
    """Build a validated `GPOLoss` from a registered name or an import path `"package.module:function"`.

    `kwargs` are bound to the function (`gpo_loss_kwargs` in `GPOConfig`). Raises `ValueError` naming the function
    and the measured value when it is not a usable GPO loss.
    """
    if name in _REGISTRY:
        entry = _REGISTRY[name]
    elif ":" in name:
        fn = _import_function(name)
        entry = _Entry(fn=fn, formula=_first_doc_line(fn, name), convex=None)
    else:
        raise ValueError(
            f"Unknown GPO loss {name!r}. Available: {', '.join(available_losses())}; or give an import path "
            "'package.module:function' to your own f(t)."
        )
    return _validate(name, entry, kwargs)


def _first_doc_line(fn: LossFn, default: str) -> str:
    lines = (fn.__doc__ or "").strip().splitlines()
    return lines[0] if lines else default


def _import_function(path: str) -> LossFn:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} for GPO loss {path!r}: {err}") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (GPO loss {path!r}).")
    if not callable(fn):
        raise ValueError(f"GPO loss {path!r} is not callable (got {type(fn).__name__}).")
    return fn


def _validate(name: str, entry: _Entry, kwargs: dict) -> GPOLoss:
    """Probe f on a small tensor, measure f'(0), f''(0) with autograd, and check convexity on a grid."""
    fn = entry.fn
    probe = torch.linspace(-5.0, 5.0, 11)
    try:
        out = fn(probe, **kwargs)
    except Exception as err:
        raise ValueError(f"GPO loss {name!r} raised {type(err).__name__} on a probe tensor: {err}") from err
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"GPO loss {name!r} must return a tensor of the input's shape {tuple(probe.shape)}; got {got}.")
    if not torch.isfinite(out).all():
        raise ValueError(f"GPO loss {name!r} returned non-finite values on t in [-5, 5]: {out.tolist()}.")

    d1, d2 = _derivatives_at_zero(name, fn, kwargs)
    if not d1 < 0 and entry.descends_at_zero:
        raise ValueError(
            f"GPO loss {name!r} has f'(0) = {d1:.6g}, but a GPO loss needs f'(0) < 0 so that minimising it "
            "increases the chosen-minus-rejected margin."
        )
    convex = measure_convexity(fn, kwargs)
    if entry.convex is None and not convex:
        warnings.warn(f"GPO loss {name!r} is not convex on [-10, 10] (measured on a grid); training may be unstable.")
    return GPOLoss(name=name, fn=fn, formula=entry.formula, convex=convex if entry.convex is None else entry.convex,
                   d1_at_0=d1, d2_at_0=d2, kwargs=dict(kwargs))


def _derivatives_at_zero(name: str, fn: LossFn, kwargs: dict) -> tuple[float, float]:
    t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    try:
        (d1,) = torch.autograd.grad(fn(t, **kwargs).sum(), t, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), t, allow_unused=True)[0] if d1.requires_grad else None
    except RuntimeError as err:
        raise ValueError(f"GPO loss {name!r} is not differentiable with autograd at t = 0: {err}") from err
    return d1.item() + 0.0, (0.0 if d2 is None else d2.item() + 0.0)  # + 0.0 turns -0.0 into 0.0


def measure_convexity(fn: LossFn, kwargs: dict | None = None, lo: float = -10.0, hi: float = 10.0) -> bool:
    """True when every second difference of f on a fine grid over [lo, hi] is >= 0 (up to rounding)."""
    t = torch.linspace(lo, hi, 4001, dtype=torch.float64)
    y = fn(t, **(kwargs or {})).detach()
    second_diff = y[:-2] - 2 * y[1:-1] + y[2:]
    return bool((second_diff >= -1e-9 * y.abs().max().clamp(min=1.0)).all())


# --- The built-in family (GPO paper, Table 1). Docstrings: f(t); f'(0); f''(0); what it reproduces. ---


@register_loss("logistic", formula="log(1 + exp(-t))", convex=True)
def logistic(t: torch.Tensor) -> torch.Tensor:
    """f(t) = log(1 + e^-t); f'(0) = -1/2, f''(0) = 1/4. DPO: TRL loss_type="sigmoid".

    Written as -logsigmoid(t), TRL's own expression, so that the parity with DPO is bit-for-bit.
    """
    return -F.logsigmoid(t)


@register_loss("hinge", formula="max(0, 1 - t)", convex=True)
def hinge(t: torch.Tensor) -> torch.Tensor:
    """f(t) = max(0, 1 - t); f'(0) = -1, f''(0) = 0. SLiC: TRL loss_type="hinge"."""
    return torch.relu(1 - t)


@register_loss("squared", formula="(t - 1)^2", convex=True)
def squared(t: torch.Tensor) -> torch.Tensor:
    """f(t) = (t - 1)^2; f'(0) = -2, f''(0) = 2. IPO: with length-normalised margins, beta = 2 tau gives 4 tau^2 x TRL ipo."""
    return (t - 1) ** 2


@register_loss("exponential", formula="exp(-t)", convex=True)
def exponential(t: torch.Tensor) -> torch.Tensor:
    """f(t) = e^-t; f'(0) = -1, f''(0) = 1. New in GPO (the AdaBoost loss).

    Exact for t >= -20; below, the tangent line at t = -20 (convex, C^1) keeps values and gradients finite.
    """
    clipped = torch.clamp(-t, max=_EXP_CAP)
    return torch.exp(clipped) * (1 + (-t - clipped))


@register_loss("truncated_quadratic", formula="max(0, 1 - t)^2", convex=True)
def truncated_quadratic(t: torch.Tensor) -> torch.Tensor:
    """f(t) = max(0, 1 - t)^2; f'(0) = -2, f''(0) = 2. New in GPO (squared hinge)."""
    return torch.relu(1 - t) ** 2


@register_loss("savage", formula="1 / (1 + exp(t))^2", convex=False)
def savage(t: torch.Tensor) -> torch.Tensor:
    """f(t) = 1 / (1 + e^t)^2; f'(0) = -1/4, f''(0) = 1/8. New in GPO; non-convex for t < -ln 2.

    Written as sigmoid(-t)^2, which never overflows.
    """
    return torch.sigmoid(-t) ** 2


# --- TRL 1.16's other losses of the margin alone (TRL loss_type of the same name; same expressions, for parity) ---


@register_loss("robust", formula="[(1-e) log(1+e^-t) - e log(1+e^t)] / (1-2e)", convex=True)
def robust(t: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (rDPO, e = label_smoothing in [0, 1/2)): unbiased under flip rate e. = logistic(t) - e t / (1-2e).

    TRL loss_type="robust". Convex: logistic plus a linear term; f'(0) = -1/2 - e/(1-2e).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (the assumed flip rate), got {label_smoothing}")
    clean = -(1 - label_smoothing) * F.logsigmoid(t)
    flipped = -label_smoothing * F.logsigmoid(-t)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@register_loss("exo_pair", formula="KL(Bernoulli(sigmoid(t)) || Bernoulli(1-e))", convex=False)
def exo_pair(t: torch.Tensor, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO-pref (e = label_smoothing in (0, 1/2), the EXO paper's 1e-3 by default): KL to the smoothed labels.

    TRL loss_type="exo_pair". f'(0) = log(e / (1-e)) / 4. Minimum 0 at t = log((1-e)/e), from where it rises
    back to -log(1-e) as t -> inf: bounded, so not convex (and past the minimum it pushes the margin down).
    """
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 0.5, got {label_smoothing}")
    epsilon = torch.tensor(label_smoothing, device=t.device)
    chosen = torch.sigmoid(t) * (F.logsigmoid(t) - torch.log1p(-epsilon))
    rejected = torch.sigmoid(-t) * (F.logsigmoid(-t) - torch.log(epsilon))
    return chosen + rejected


@register_loss("discopop", formula="(1 - s) log(1 + e^-t) + s e^-t, s = sigmoid(t / tau)", convex=False,
               descends_at_zero=False)
def discopop(t: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), tau = TRL's discopop_tau (default 0.05). TRL loss_type="discopop".

    Not convex; f'(0) = -3/4 + (1 - ln 2) / (4 tau), > 0 for tau < 0.1023 (+0.78 at 0.05): near t = 0 it rises.
    s e^-t is taken as exp(-t + logsigmoid(t / tau)), which stays finite (0) where TRL's product gives inf * 0.
    """
    if not tau > 0:
        raise ValueError(f"discopop needs tau > 0, got {tau}")
    return -F.logsigmoid(t) * torch.sigmoid(-t / tau) + torch.exp(-t + F.logsigmoid(t / tau))


def loss_table() -> list[dict]:
    """One row per registered loss: name, formula, f'(0), f''(0), c_f, convex (for `gpo-trl losses` and docs)."""
    rows = []
    for name in available_losses():
        loss = get_loss(name)
        rows.append({"name": name, "formula": loss.formula, "d1_at_0": loss.d1_at_0, "d2_at_0": loss.d2_at_0,
                     "c_f": loss.c_f, "convex": loss.convex})
    return rows


def format_number(x: float) -> str:
    """Short exact-looking form for table cells: -0.5, 0.25, 2."""
    return f"{x:.4g}" if math.isfinite(x) else str(x)
