"""The bandit toy (gpo_trl.experiments.bandit): the offline regulariser 1/2 E_mu[rho^2] and KL(pi || pi_ref) can
disagree when mu does not cover every arm."""

import math

from gpo_trl.experiments.bandit import main, run


def test_same_offline_regulariser_growing_kl():
    """Shifting the logits of the 3 covered arms (of 32) together keeps every margin, so the offline regulariser does
    not move (up to float32 rounding), while KL grows monotonically towards log(32 / 3) = 2.37 nats."""
    result = run()
    regs = [p["offline_reg"] for p in result["family"]]
    kls = [p["kl"] for p in result["family"]]
    assert max(regs) - min(regs) < 1e-5 * max(regs)
    assert all(b > a for a, b in zip(kls, kls[1:]))
    assert kls[0] < 0.01 and 2.0 < kls[-1] < math.log(32 / 3)


def test_trained_policies_regularise_more_at_higher_beta():
    trained = run()["trained"]
    assert [p["beta"] for p in trained] == sorted(p["beta"] for p in trained)
    regs = [p["offline_reg"] for p in trained]
    assert all(b < a for a, b in zip(regs, regs[1:]))


def test_command_writes_plot_and_json(tmp_path):
    main(["--out", str(tmp_path)])
    assert (tmp_path / "bandit.png").read_bytes()[:4] == b"\x89PNG"
    assert "family" in (tmp_path / "bandit.json").read_text()
