"""`gpo-trl sweep`: a grid of real training runs from one file, resumable, with a results table and plots."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from gpo_trl.cli import main as cli
from gpo_trl.experiments.sweep import load_sweep, run_sweep
from gpo_trl.recipe import ConfigError


def write_sweep(tmp_path, **changes):
    spec = {"base": str(REPO / "configs" / "demo.yaml"), "output_dir": str(tmp_path / "sweep"),
            "grid": {"gpo_loss": ["logistic", "hinge"], "beta": [0.1, 0.5]},
            "overrides": {"max_steps": 3, "eval_before_training": False, "precompute_ref_log_probs": True,
                          "model_name_or_path": str(tmp_path / "m"), "dataset_name": str(tmp_path / "d"),
                          "disable_tqdm": True},
            "plots": [{"x": "beta", "y": "eval_rewards/accuracies"}, {"x": "eval_gpo/offline_reg", "y": "eval_loss"}]}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_every_point_is_checked_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, grid={"gpo_loss": ["logistic", "logistc"]})
    with pytest.raises(ConfigError, match="Sweep point gpo_loss=logistc: Unknown GPO loss 'logistc'"):
        load_sweep(str(path))
    with pytest.raises(ConfigError, match="Unknown key 'bta'"):
        load_sweep(str(write_sweep(tmp_path, grid={"bta": [0.1]})))
    with pytest.raises(ConfigError, match=r"Unknown keys \['plot'\] in sweep file"):
        load_sweep(str(write_sweep(tmp_path, plot=[])))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_runs_resumes_and_tabulates(tmp_path, capsys, demo_rows):
    # With `evaluate_generate:` each point is also sampled against its base (gpo_trl.generate_eval)
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows["test"]))
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump({
        "prompts": {"data_files": str(tmp_path / "held_out.jsonl")}, "max_prompts": 4,
        "generation": {"max_new_tokens": 8}, "judge": {"aux": "length", "weight": -1}}))
    path = write_sweep(tmp_path, evaluate_generate=str(tmp_path / "generate.yaml"), plots=[
        {"x": "beta", "y": "eval_rewards/accuracies"}, {"x": "eval_gpo/offline_reg", "y": "eval_loss"},
        {"x": "gen/kl", "y": "gen/judge_mean"}])
    assert cli(["sweep", "--config", str(path)]) == 0
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["gpo_loss"], r["beta"]) for r in rows) == [("hinge", 0.1), ("hinge", 0.5), ("logistic", 0.1),
                                                               ("logistic", 0.5)]
    assert all(0 <= r["eval_rewards/accuracies"] <= 1 and "eval_gpo/offline_reg" in r for r in rows)
    for row in rows:  # the gen/* columns are the point's generation summary
        summary = json.loads((Path(row["output_dir"]) / "generate_eval" / "summary.json").read_text())
        assert summary["samples"] == 4 and {k: row[f"gen/{k}"] for k in ("judge_mean", "win_rate", "kl")} == {
            k: summary[k] for k in ("judge_mean", "win_rate", "kl")}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for name in ("plot_eval_rewards_accuracies_vs_beta.png", "plot_eval_loss_vs_eval_gpo_offline_reg.png",
                 "plot_gen_judge_mean_vs_gen_kl.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The reference pass ran once for the whole sweep: one cached file per split
    assert len(list((out / "ref_logps").glob("*.arrow"))) == 2

    # An interrupted sweep: one point lost its result; a rerun runs that point only
    (out / "gpo_loss=hinge,beta=0.5" / "result.json").unlink()
    capsys.readouterr()
    assert cli(["sweep", "--config", str(path)]) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, skipped") == 3 and "gpo_loss=hinge,beta=0.5: running" in log
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
