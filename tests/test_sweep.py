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
    # With `evaluate_generate:` each point is also sampled against its base (gpo_trl.online.generate_eval)
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows["test"]))
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump({
        "prompts": {"data_files": str(tmp_path / "held_out.jsonl")}, "max_prompts": 4,
        "generation": {"max_new_tokens": 8}, "judge": {"aux": "length", "weight": -1}}))
    # Two points (each a `gpo-trl train` process): a string key and a numeric one; grids of many points without
    # training are in the tests below
    path = write_sweep(tmp_path, grid={"gpo_loss": ["hinge"], "beta": [0.1, 0.5]},
                       evaluate_generate=str(tmp_path / "generate.yaml"), plots=[
        {"x": "beta", "y": "eval_rewards/accuracies"}, {"x": "eval_gpo/offline_reg", "y": "eval_loss"},
        {"x": "gen/kl", "y": "gen/judge_mean"}])
    assert cli(["sweep", "--config", str(path)]) == 0
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["gpo_loss"], r["beta"]) for r in rows) == [("hinge", 0.1), ("hinge", 0.5)]
    assert all(0 <= r["eval_rewards/accuracies"] <= 1 and "eval_gpo/offline_reg" in r for r in rows)
    for row in rows:  # the gen/* columns are the point's generation summary
        summary = json.loads((Path(row["output_dir"]) / "generate_eval" / "summary.json").read_text())
        assert summary["samples"] == 4 and {k: row[f"gen/{k}"] for k in ("judge_mean", "win_rate", "kl")} == {
            k: summary[k] for k in ("judge_mean", "win_rate", "kl")}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
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
    assert log.count("finished earlier, skipped") == 1 and "gpo_loss=hinge,beta=0.5: running" in log
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_plots_tick_at_the_grid_values_and_colour_by_loss(tmp_path):
    """Drawn from a synthetic table (no training): a beta axis labels the three grid values and no minor ticks; with
    a metric on x there is one curve per loss (3 lines, not one per point), one marker per beta, one legend entry
    per loss and per beta."""
    from gpo_trl.experiments.sweep import plot_figure

    sweep = load_sweep(str(write_sweep(tmp_path, grid={"gpo_loss": ["logistic", "squared", "hinge"],
                                                       "beta": [0.02, 0.1, 0.5]})))
    rows = [{"gpo_loss": loss, "beta": beta, "eval_gpo/margin": 10 * i + j, "eval_gpo/offline_reg": (10 * i + j) ** 2}
            for i, loss in enumerate(sweep.grid["gpo_loss"]) for j, beta in enumerate(sweep.grid["beta"])]
    axis = plot_figure(rows, sweep, {"x": "beta", "y": "eval_gpo/margin"}).axes[0]
    assert axis.get_xscale() == "log" and list(axis.get_xticks()) == [0.02, 0.1, 0.5]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0.02", "0.1", "0.5"]
    assert not axis.xaxis.get_minorticklocs().size
    assert len(axis.get_lines()) == 3

    axis = plot_figure(rows, sweep, {"x": "eval_gpo/offline_reg", "y": "eval_gpo/margin"}).axes[0]
    assert len(axis.get_lines()) == 3  # one per loss
    assert len({c.get_paths()[0].vertices.tobytes() for c in axis.collections}) == 3  # 3 marker shapes
    assert [t.get_text() for t in axis.get_legend().get_texts()] == [
        "gpo_loss=logistic", "gpo_loss=squared", "gpo_loss=hinge", "beta=0.02", "beta=0.1", "beta=0.5"]
    colours = {loss: line.get_color() for loss, line in zip(sweep.grid["gpo_loss"], axis.get_lines())}
    assert len(set(colours.values())) == 3
    with pytest.raises(ConfigError, match="scales `linear` or `log`"):
        load_sweep(str(write_sweep(tmp_path, plots=[{"x": "beta", "y": "eval_loss", "yscale": "symlog"}])))


def test_plot_axes_are_in_words_with_units_and_a_caption(tmp_path):
    """Axes say what they measure and in which unit; the raw results.csv column is under each axis in small
    print; a caption line says what to look for; an unknown column is its own label; `caption:` overrides."""
    from gpo_trl.experiments.labels import describe
    from gpo_trl.experiments.sweep import plot_figure

    sweep = load_sweep(str(write_sweep(tmp_path)))
    rows = [{"gpo_loss": loss, "beta": beta, "eval_gpo/offline_reg": i + 1.0, "eval_logps/chosen": -50.0 - i,
             "my_metric": float(i)} for i, (loss, beta) in enumerate([("logistic", 0.1), ("logistic", 0.5),
                                                                      ("hinge", 0.1), ("hinge", 0.5)])]
    figure = plot_figure(rows, sweep, {"x": "eval_gpo/offline_reg", "y": "eval_logps/chosen"})
    axis = figure.axes[0]
    assert axis.get_xlabel() == "held-out offline regulariser ½E[ρ²] (nats²)"
    assert axis.get_ylabel().replace("\n", " ") == "held-out log-likelihood of chosen answers (nats per answer)"
    small = {t.get_text(): t.get_fontsize() for t in axis.texts}
    assert set(small) == {"eval_gpo/offline_reg", "eval_logps/chosen"} and max(small.values()) < 8
    caption = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert caption.startswith("Each point is one run, coloured by gpo_loss.") and "over-optimisation" in caption
    assert axis.get_title().startswith("Held-out log-likelihood of chosen answers vs")

    figure = plot_figure(rows, sweep, {"x": "beta", "y": "my_metric", "caption": "Flat is good."})
    axis = figure.axes[0]
    assert axis.get_xlabel() == "β, regularisation strength" and axis.get_ylabel() == "my_metric"
    assert [t.get_text() for t in axis.texts] == ["beta"]  # my_metric is its own label: no small print twice
    assert [t.get_text() for t in figure.texts] == ["Flat is good."]
    assert describe("before_eval_rewards/accuracies").words.startswith("held-out, before training: reward accuracy")
    assert describe("gen/kl").unit == "nats per sample" and describe("eval_gpo/margin").unit == "nats"


def fake_run_record(point_dir, loss, beta):
    """A point's gpo_run.json, in the layout the recipe writes (write_run_record), without training."""
    point_dir.mkdir(parents=True)
    metrics = {"eval_loss": 0.5 * beta, "eval_gpo/margin": 10 / beta, "eval_gpo/offline_reg": 50 / beta ** 2,
               "eval_rewards/accuracies": 1.0}
    (point_dir / "gpo_run.json").write_text(json.dumps({"gpo_loss": loss, "beta": beta, "effective_beta": beta,
                                                        "steps": 3, "metrics": metrics}))


def test_emit_slurm_writes_one_array_task_per_unfinished_point(tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path)
    sweep = load_sweep(str(path))
    finished_dir = tmp_path / "sweep" / "gpo_loss=hinge,beta=0.1"  # point 2 in grid order
    fake_run_record(finished_dir, "hinge", 0.1)
    (finished_dir / "result.json").write_text("{}")
    assert cli(["sweep", "--config", str(path), "--emit-slurm", str(tmp_path / "slurm")]) == 0
    script = (tmp_path / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0,1,3\n" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=B:TERM@300" in script and f"cd {tmp_path}\n" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "sweep.sbatch")]).returncode == 0

    rows = [line.split("\t") for line in (tmp_path / "slurm" / "points.tsv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["0", "gpo_loss=logistic,beta=0.1"], ["1", "gpo_loss=logistic,beta=0.5"],
                                     ["3", "gpo_loss=hinge,beta=0.5"]]
    for index, name, command in rows:
        args = command.split()
        value = {key: args[i + 1] for i, key in enumerate(args) if key.startswith("--")}
        assert args[:2] == ["gpo-trl", "train"] and value["--config"] == str(REPO / "configs" / "demo.yaml")
        assert value["--output_dir"] == str(tmp_path / "sweep" / name)
        assert value["--ref_logps_cache_dir"] == str(tmp_path / "sweep" / "ref_logps")  # one cache for all points
        assert value["--resume_from_checkpoint"] == "last" and value["--max_steps"] == "3"
        point = sweep.points()[int(index)]
        assert (value["--gpo_loss"], float(value["--beta"])) == (point["gpo_loss"], point["beta"])

    # The task itself: the script runs `gpo-trl sweep --config S --point $SLURM_ARRAY_TASK_ID` (gpo-trl stubbed)
    stub = tmp_path / "gpo-trl-stub"
    stub.write_text(f"#!/bin/bash\nexec {sys.executable} -c 'import sys; print(sys.argv[1:])' \"$@\"\n")
    stub.chmod(0o755)
    env = {**os.environ, "GPO_TRL": str(stub), "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77"}
    result = subprocess.run(["bash", str(tmp_path / "slurm" / "sweep.sbatch")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == str(["sweep", "--config", str(path), "--point", "3"])

    assert "#SBATCH --gpus" not in script  # the demo recipe sets use_cpu: no GPU asked for
    capsys.readouterr()
    edited = tmp_path / "slurm" / "sweep.sbatch"
    edited.write_text(script + "# edited by hand\n")
    assert cli(["sweep", "--config", str(path), "--emit-slurm", str(tmp_path / "slurm")]) == 2  # kept
    assert f"{edited} exists; it was not overwritten. Pass --overwrite" in capsys.readouterr().err
    assert edited.read_text().endswith("# edited by hand\n")
    assert cli(["sweep", "--config", str(path), "--emit-slurm", str(tmp_path / "slurm"), "--overwrite"]) == 0
    assert edited.read_text() == script
    assert "--gpus-per-node=1" in emit_gpu_request(path)

    capsys.readouterr()
    assert cli(["sweep", "--config", str(path), "--point", "2"]) == 0  # finished meanwhile: nothing runs
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert cli(["sweep", "--config", str(path), "--point", "4"]) == 2
    assert "`--point 4` is out of range: the sweep has 4 points (0-3)" in capsys.readouterr().err


def emit_gpu_request(path) -> str:
    """The GPU line the array script gets when the recipe trains on a GPU (use_cpu false)."""
    from gpo_trl.experiments.slurm_array import _gpu_request

    sweep = load_sweep(str(path))
    sweep.overrides = {**sweep.overrides, "use_cpu": False}
    return _gpu_request(sweep)


def test_collect_rebuilds_the_table_and_plots_from_point_outputs(tmp_path, capsys):
    path = write_sweep(tmp_path)
    sweep = load_sweep(str(path))
    for point in sweep.points()[:3]:  # three runs finished on the cluster, the fourth did not
        fake_run_record(tmp_path / "sweep" / ",".join(f"{k}={v}" for k, v in point.items()), point["gpo_loss"],
                        point["beta"])
    assert cli(["sweep", "--config", str(path), "--collect"]) == 0
    out = capsys.readouterr().out
    assert "3 points in" in out and "not finished: gpo_loss=hinge,beta=0.5" in out
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["gpo_loss"], float(r["beta"]), float(r["eval_gpo/margin"])) for r in rows) == [
        ("hinge", 0.1, 100.0), ("logistic", 0.1, 100.0), ("logistic", 0.5, 20.0)]
    for name in ("plot_eval_rewards_accuracies_vs_beta.png", "plot_eval_loss_vs_eval_gpo_offline_reg.png"):
        assert (tmp_path / "sweep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep" / "gpo_loss=hinge,beta=0.1" / "result.json").is_file()
