"""The controlled study (gpo_trl.experiments.study), on its smoke config: a pre-trained tiny base LM, BT-labelled
pairs, every built-in loss trained with the real GPOTrainer in both arms (raw and calibrated beta), sampled and
scored. The smoke study checks the machinery end to end; the claims themselves are read in docs/results.md."""

import json
import math

import pytest
import yaml

from conftest import REPO
from gpo_trl.cli import main as cli_main
from gpo_trl.experiments.study import StudyConfig, calibration_refusal, gold_reward, load_config, main
from gpo_trl.recipe import ConfigError

SMOKE = REPO / "configs" / "studies" / "smoke.yaml"
OUTPUTS = ["results.jsonl", "results.csv", "summary.json", "tables.md", "gold_reward_vs_kl.png",
           "gold_reward_vs_beta.png", "offline_reg_vs_kl.png"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke study, then, through `gpo-trl study` in another output dir, the same study with the same seed cut
    to logistic and hinge at beta 0.1: its base LM, pairs and runs must come out exactly as in the full study."""
    first, second = tmp_path_factory.mktemp("study1"), tmp_path_factory.mktemp("study2")
    main(["--config", str(SMOKE), "--out", str(first)])
    subset = second / "smoke_subset.yaml"
    subset.write_text(yaml.safe_dump(yaml.safe_load(SMOKE.read_text()) | {"losses": ["logistic", "hinge"],
                                                                          "betas": [0.1]}))
    assert cli_main(["study", "--config", str(subset), "--out", str(second / "out")]) == 0
    return first, second / "out"


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def without_timings(value):
    """Wall-clock fields differ between runs; everything else must not."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_smoke_study_writes_every_output(smoke_runs):
    out, _ = smoke_runs
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[4:]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(rows_of(out))
    tables = (out / "tables.md").read_text()
    assert all(f"| {loss} |" in tables for loss in load_config(SMOKE).losses)


@pytest.mark.slow
def test_every_loss_in_both_arms_and_hinge_calibration_is_refused(smoke_runs):
    rows = rows_of(smoke_runs[0])
    config = load_config(SMOKE)
    assert {(r["loss"], r["beta"], r["calibrated"]) for r in rows} == {
        (loss, beta, calibrated)
        for loss in config.losses for beta in config.betas for calibrated in (False, True)}
    for row in rows:
        if row["loss"] == "hinge" and row["calibrated"]:
            assert row["status"] == "refused: c_f = 0" and "c_f" in row["error"]
        else:
            assert row["status"] == "ok", row


@pytest.mark.slow
def test_numbers_are_finite_and_kl_is_positive(smoke_runs):
    """KL(pi || ref) >= 0 up to the estimator's noise, and clearly > 0: every policy moved away from the reference."""
    trained = [r for r in rows_of(smoke_runs[0]) if r["status"] == "ok"]
    for row in trained:
        for key in ("gold_reward", "gold_reward_se", "kl", "kl_se", "offline_reg", "train_offline_reg", "win_rate",
                    "eval_loss", "beta_effective"):
            assert math.isfinite(row[key]), (key, row)
        assert row["kl"] > 3 * row["kl_se"] > 0, row
        assert 0 <= row["win_rate"] <= 1 and row["offline_reg"] > 0
    summary = json.loads((smoke_runs[0] / "summary.json").read_text())
    # Trained policies beat the base LM on the gold reward (the preference data carries the signal)
    assert all(r["gold_reward"] > summary["base"]["gold_reward"] for r in trained)


@pytest.mark.slow
def test_base_lm_is_diverse_and_pairs_follow_the_gold_reward(smoke_runs):
    base = json.loads((smoke_runs[0] / "summary.json").read_text())["base"]
    assert base["distinct_per_prompt"] > 0.9  # 8 samples per prompt are (almost) all different
    assert base["mean_token_entropy"] > 1.5  # nats per token: far from greedy
    assert 0.6 < base["pairs_label_agrees_with_gold"] < 1.0  # BT labels: informative, but noisy
    assert base["pairs_pairs"] + base["pairs_dropped_identical"] == load_config(SMOKE).train_pairs


@pytest.mark.slow
def test_calibration_is_exactly_a_change_of_beta(smoke_runs):
    """The trainer uses only the effective beta: a loss with c_f = 1/2 calibrated to logistic (c = 1/4) at 0.1 runs
    at 0.05 and must reproduce the raw run at 0.05 number for number; logistic and savage are their own calibration."""
    rows = {(r["loss"], r["beta"], r["calibrated"]): r for r in rows_of(smoke_runs[0])}
    for loss in ("squared", "exponential", "truncated_quadratic"):
        calibrated, raw = rows[(loss, 0.1, True)], rows[(loss, 0.05, False)]
        assert calibrated["beta_effective"] == raw["beta_effective"] == 0.05
        assert without_timings(calibrated) | {"calibrated": False, "beta": 0.05} == without_timings(raw)
    for loss in ("logistic", "savage"):
        calibrated, raw = without_timings(rows[(loss, 0.1, True)]), without_timings(rows[(loss, 0.1, False)])
        assert calibrated | {"calibrated": False} == raw


@pytest.mark.slow
def test_same_seed_same_numbers(smoke_runs):
    """Each run depends on the seed and its own settings only, not on the other runs of the study."""
    first, second = smoke_runs
    subset = without_timings(rows_of(second))
    assert {(r["loss"], r["beta"], r["calibrated"]) for r in subset} == {
        (loss, 0.1, calibrated) for loss in ("logistic", "hinge") for calibrated in (False, True)}
    full = {(r["loss"], r["beta"], r["calibrated"]): r for r in without_timings(rows_of(first))}
    assert subset == [full[(r["loss"], r["beta"], r["calibrated"])] for r in subset]
    bases = [without_timings(json.loads((out / "summary.json").read_text()))["base"] for out in smoke_runs]
    assert bases[0] == bases[1]


def test_unknown_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(SMOKE.read_text() + "beta_grid: [0.1]\n")
    with pytest.raises(ConfigError, match="Unknown key 'beta_grid'"):
        load_config(config)
    assert cli_main(["study", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "beta_grid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_unknown_loss_is_an_error(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("losses: [logistic, hingee]\n")
    with pytest.raises(ConfigError, match="hingee"):
        load_config(config)


def test_gold_reward_terms():
    """Ids: 0 EOS, 3 + i = w_i; w0, w4, ... are good. Repeating a good word gains nothing; echoes and length count."""
    prompt = [3 + 1, 3 + 2, 3 + 5, 3 + 6, 2]
    six_distinct_good = [3 + 0, 3 + 4, 3 + 8, 3 + 12, 3 + 16, 3 + 20, 0]
    assert gold_reward(prompt, six_distinct_good) == 6.0
    repeated = [3 + 0] * 6 + [0]
    assert gold_reward(prompt, repeated) == 1.0  # 6 good - 5 repeats
    echo = [3 + 1, 3 + 2, 3 + 5, 3 + 6, 3 + 9, 3 + 10, 0]
    assert gold_reward(prompt, echo) == 2.0  # 4 echoes x 0.5
    assert gold_reward(prompt, [0]) == -3.0  # empty: 6 tokens from the target length
    assert gold_reward(prompt, [1, 1, 0]) == -2 * 2.0 - 4 * 0.5  # two junk (PAD) tokens, 4 from the target length
    assert gold_reward(prompt, six_distinct_good[:-1] + [3 + 24]) == 6.5  # no EOS: 7 good, one over the target


@pytest.mark.parametrize("line, message", [("betas: 0.1", "`betas`"), ("epochs: two", "`epochs`"),
                                           ("train_pairs: 0", ">= 1"), ("calibration: logistik", "logistik")])
def test_bad_values_are_errors_naming_the_key(tmp_path, line, message):
    config = tmp_path / "study.yaml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_calibration_refusal_is_caught_by_type_and_other_errors_propagate():
    """The study records hinge's CalibrationError as a finding; any other GPOConfig error is a bug and raises."""
    assert "undefined with 'hinge'" in calibration_refusal("hinge", StudyConfig(calibration="logistic"))
    assert calibration_refusal("squared", StudyConfig(calibration="logistic")) is None
    with pytest.raises(ValueError, match="not a registered loss"):
        calibration_refusal("squared", StudyConfig(calibration="nope"))
