"""The loss registry: every built-in's value and derivatives, numerical safety, and validation of user functions.

Tests parametrised over `available_losses()` pick up a newly registered loss with no other edit; the closed forms
below (GPO paper, Table 1; shared/reference/gpo.md) are the independent reference the registry is checked against.
"""

import math
import sys
import types
import warnings

import pytest
import torch

from gpo_trl import available_losses, get_loss, register_loss
from gpo_trl.losses import _REGISTRY, measure_convexity

BUILTINS = ["logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"]

# name: (naive formula in float64, f'(0), f''(0), c_f, convex)
REFERENCE = {
    "logistic": (lambda t: torch.log1p(torch.exp(-t)), -0.5, 0.25, 0.25, True),
    "hinge": (lambda t: torch.clamp(1 - t, min=0), -1.0, 0.0, 0.0, True),
    "squared": (lambda t: (t - 1) ** 2, -2.0, 2.0, 0.5, True),
    "exponential": (lambda t: torch.exp(-t), -1.0, 1.0, 0.5, True),
    "truncated_quadratic": (lambda t: torch.clamp(1 - t, min=0) ** 2, -2.0, 2.0, 0.5, True),
    "savage": (lambda t: 1 / (1 + torch.exp(t)) ** 2, -0.25, 0.125, 0.25, False),
}
EXTREMES = torch.tensor([-1e4, -1e3, -100.0, -60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 60.0, 100.0, 1e3, 1e4])
EXP_EXACT_FROM = -20.0  # the exponential loss is exact for t >= -20, tangent line below (see losses.py)


def test_builtins_are_registered_in_order():
    assert available_losses()[: len(BUILTINS)] == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_derivatives_at_zero_match_the_closed_form(name):
    """f'(0), f''(0), c_f = f''(0) / 2|f'(0)| and convexity agree with the paper's table."""
    _, d1, d2, c_f, convex = REFERENCE[name]
    loss = get_loss(name)
    assert loss.d1_at_0 == pytest.approx(d1, abs=1e-12)
    assert loss.d2_at_0 == pytest.approx(d2, abs=1e-12)
    assert loss.c_f == pytest.approx(c_f, abs=1e-12)
    assert loss.convex is convex
    assert measure_convexity(loss.fn) is convex  # the declaration matches a measurement


@pytest.mark.parametrize("name", available_losses())
def test_every_registered_loss_is_a_usable_gpo_loss(name):
    """Any registered f: f'(0) < 0 (unless registered with descends_at_zero=False, DiscoPOP as published) and
    matches a central finite difference; f'' likewise; finite at |t| = 1e4."""
    loss = get_loss(name)
    h = 1e-4
    f = lambda x: loss(torch.tensor([x], dtype=torch.float64)).item()  # noqa: E731
    assert loss.d1_at_0 < 0 or (name == "discopop" and not _REGISTRY[name].descends_at_zero)
    assert loss.d1_at_0 == pytest.approx((f(h) - f(-h)) / (2 * h), abs=1e-6)
    assert loss.d2_at_0 == pytest.approx((f(h) - 2 * f(0.0) + f(-h)) / h**2, abs=1e-3)
    t = torch.tensor([-1e4, 1e4], requires_grad=True)
    (grad,) = torch.autograd.grad(loss(t).sum(), t)
    assert torch.isfinite(loss(t)).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", BUILTINS)
def test_value_and_gradient_match_the_formula_and_autograd(name):
    """On moderate t, f and f' equal the naive formula (float64) and its autograd derivative."""
    formula = REFERENCE[name][0]
    t = torch.linspace(-8, 8, 161, dtype=torch.float64)
    loss = get_loss(name)
    torch.testing.assert_close(loss(t), formula(t), rtol=1e-12, atol=1e-12)
    t_formula = t.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(formula(t_formula).sum(), t_formula)
    torch.testing.assert_close(loss.derivative(t), expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BUILTINS)
def test_finite_at_extreme_margins_and_exact_where_representable(name, dtype):
    """For t in [-1e4, 1e4] the value, its gradient and a batch mean are finite in float32 and bfloat16, and equal
    the float64 formula wherever that value is representable in `dtype` (exponential: for t >= -20, where the
    tangent-line continuation starts, so that extreme margins cannot overflow the backward pass)."""
    loss = get_loss(name)
    t = EXTREMES.to(dtype).requires_grad_(True)
    value = loss(t)
    (grad,) = torch.autograd.grad(value.sum(), t)
    assert value.dtype == dtype
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(grad).all(), grad
    assert torch.isfinite(loss(t.detach().repeat(64)).mean())

    exact = REFERENCE[name][0](t.detach().double())
    representable = exact.abs() < torch.finfo(dtype).max
    if name == "exponential":
        representable &= t.detach().double() >= EXP_EXACT_FROM
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(value.detach().double()[representable], exact.to(dtype).double()[representable],
                               rtol=rtol, atol=1e-30)


# TRL's single-margin losses: closed forms of f'(0) (values are checked against TRL in test_loss_family.py)
TRL_MARGIN_LOSSES = {
    "robust": ({"label_smoothing": 0.2}, -0.5 - 0.2 / 0.6, True),
    "exo_pair": ({"label_smoothing": 0.1}, math.log(0.1 / 0.9) / 4, False),
    "discopop": ({"tau": 0.05}, -0.75 + (1 - math.log(2)) / 0.2, False),
}


@pytest.mark.parametrize("name", list(TRL_MARGIN_LOSSES))
def test_trl_margin_losses_derivative_and_convexity(name):
    kwargs, d1, convex = TRL_MARGIN_LOSSES[name]
    loss = get_loss(name, **kwargs)
    assert loss.d1_at_0 == pytest.approx(d1, rel=1e-6)
    assert loss.convex is convex and measure_convexity(loss.fn, kwargs) is convex


def test_robust_is_logistic_minus_a_linear_term():
    """[(1-e) f(t) - e f(-t)] / (1-2e) with f(-t) = f(t) + t is f(t) - e t / (1-2e): convex, unbounded below."""
    t = torch.linspace(-8, 8, 33, dtype=torch.float64)
    expected = torch.log1p(torch.exp(-t)) - 0.2 * t / 0.6
    torch.testing.assert_close(get_loss("robust", label_smoothing=0.2)(t), expected, rtol=1e-12, atol=1e-12)


def test_discopop_descends_at_zero_only_for_a_larger_tau():
    assert get_loss("discopop").d1_at_0 > 0  # TRL's default tau = 0.05
    assert get_loss("discopop", tau=0.2).d1_at_0 < 0


@pytest.mark.parametrize("name, kwargs, message", [
    ("robust", {"label_smoothing": 0.5}, "0 <= label_smoothing < 0.5"),
    ("exo_pair", {"label_smoothing": 0.0}, "0 < label_smoothing < 0.5"),
    ("discopop", {"tau": 0.0}, "tau > 0"),
])
def test_trl_margin_losses_refuse_bad_kwargs(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name, **kwargs)


def test_exponential_continuation_is_convex_and_c1():
    """Below t = -20 the exponential loss follows its tangent: slope -e^20, value continuous."""
    loss = get_loss("exponential")
    t = torch.tensor([-20.0 - 1e-6, -20.0, -20.0 + 1e-6, -1e3], dtype=torch.float64)
    grads = loss.derivative(t)
    assert grads[0].item() == pytest.approx(-math.exp(20), rel=1e-5)
    assert grads[1].item() == pytest.approx(-math.exp(20), rel=1e-5)
    assert loss(t)[3].item() == pytest.approx(math.exp(20) * (1 + 980), rel=1e-9)
    assert measure_convexity(loss.fn, lo=-200, hi=10)


def test_register_loss_refuses_bad_and_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("logistic")
    with pytest.raises(ValueError, match="lowercase"):
        register_loss("My-Loss")


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(ValueError, match="Unknown GPO loss 'logistc'.*logistic, hinge, squared"):
        get_loss("logistc")


def test_registered_user_loss_with_kwargs():
    """A plain f(t, **kwargs) registered by name; kwargs are bound at get_loss time."""

    @register_loss("test_scaled_hinge")
    def scaled_hinge(t, margin=1.0):
        """max(0, margin - t)"""
        return torch.relu(margin - t)

    try:
        loss = get_loss("test_scaled_hinge", margin=2.0)
        assert loss.formula == "max(0, margin - t)"
        assert loss(torch.tensor([0.0, 3.0])).tolist() == [2.0, 0.0]
        assert loss.d1_at_0 == -1.0
    finally:
        del _REGISTRY["test_scaled_hinge"]


@pytest.fixture
def user_module():
    """A module importable as `user_losses`, holding good and bad loss functions."""
    module = types.ModuleType("user_losses")
    module.smooth = lambda t, scale=1.0: torch.nn.functional.softplus(-t / scale) * scale
    module.raises = lambda t: (_ for _ in ()).throw(RuntimeError("boom"))
    module.wrong_shape = lambda t: t.sum()
    module.not_finite = lambda t: torch.exp(-t) / (t - t)
    module.increasing = lambda t: torch.exp(t)
    module.not_differentiable = lambda t: torch.ones_like(t).round()
    module.nonconvex = lambda t: torch.cos(t) - t
    module.not_callable = 3
    sys.modules["user_losses"] = module
    yield module
    del sys.modules["user_losses"]


def test_import_path_loss(user_module):
    loss = get_loss("user_losses:smooth", scale=2.0)
    assert loss.d1_at_0 == pytest.approx(-0.5)
    assert loss.convex


@pytest.mark.parametrize(
    "attr, message",
    [
        ("raises", "raised RuntimeError on a probe tensor: boom"),
        ("wrong_shape", r"must return a tensor of the input's shape \(11,\); got \(\)"),
        ("not_finite", "returned non-finite values"),
        ("increasing", r"has f'\(0\) = 1, but a GPO loss needs f'\(0\) < 0"),
        ("not_differentiable", "not differentiable with autograd at t = 0"),
        ("not_callable", "is not callable"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_bad_user_loss_is_rejected_with_its_name(user_module, attr, message):
    with pytest.raises(ValueError, match=message) as info:
        get_loss(f"user_losses:{attr}")
    assert "user_losses" in str(info.value)


def test_missing_module_is_named():
    with pytest.raises(ValueError, match="Cannot import module 'no_such_module_xyz'"):
        get_loss("no_such_module_xyz:f")


def test_nonconvex_user_loss_warns_but_is_allowed(user_module):
    with pytest.warns(UserWarning, match="not convex"):
        loss = get_loss("user_losses:nonconvex")
    assert loss.convex is False


def test_builtin_savage_is_nonconvex_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_loss("savage").convex is False
