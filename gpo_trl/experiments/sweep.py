"""Sweeps from a config file: a base recipe, a grid over any recipe keys, one `gpo-trl train` run per point.

    # sweep.yaml
    base: ../demo.yaml                  # a recipe; relative paths are relative to this file
    output_dir: runs/sweep-demo         # point i writes to <output_dir>/<point name>/
    grid:                               # the cartesian product of these lists
      gpo_loss: [logistic, exponential]
      beta: [0.05, 0.1, 0.2]
    overrides: {max_steps: 30}          # applied to every point
    launch: [--num_processes, "1"]      # options for the launcher, as for `gpo-trl train`
    plots:                              # PNGs next to the results table
      - {x: beta, y: eval_rewards/accuracies}
      - {x: eval_gpo/offline_reg, y: eval_rewards/accuracies}
    evaluate_generate: generate.yaml    # optional: `gpo-trl evaluate --generate` per point, as gen/* columns
                                        # (gen/judge_mean, gen/kl, gen/win_rate, ...), e.g. for a plot of
                                        # {x: gen/kl, y: gen/judge_mean}

Points run one after another through the same launcher as `gpo-trl train`. A point whose `result.json` exists is
finished and skipped, so an interrupted sweep resumes where it stopped. All points share one reference log-probs
cache, so with `precompute_ref_log_probs: true` the reference pass runs once for the whole sweep. Results go to
`results.jsonl` and `results.csv` (rewritten atomically after every point) and the plots to `plot_<y>_vs_<x>.png`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..guards import write_text_atomic
from ..recipe import ConfigError, parse_args

_KEYS = {"base", "output_dir", "grid", "overrides", "launch", "plots", "evaluate_generate"}


@dataclass
class Sweep:
    base: Path
    output_dir: Path
    grid: dict[str, list]
    overrides: dict = field(default_factory=dict)
    launch: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    evaluate_generate: Path | None = None  # a generation-evaluation file (gpo_trl.generate_eval)

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; every point's full recipe is parsed now, so a typo fails before any run."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read sweep file {path}: {err}") from err
    if not isinstance(spec, dict) or not {"base", "grid", "output_dir"} <= set(spec):
        raise ConfigError(f"Sweep file {path} needs `base`, `output_dir` and `grid` (see `gpo-trl sweep --help`).")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ConfigError(f"Unknown keys {sorted(unknown)} in sweep file {path}; known: {sorted(_KEYS)}.")
    grid = spec["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"`grid` in {path} must map recipe keys to non-empty lists of values.")
    sweep = Sweep(base=(path.parent / spec["base"]).resolve(), output_dir=Path(spec["output_dir"]), grid=grid,
                  overrides=spec.get("overrides") or {}, launch=[str(a) for a in spec.get("launch") or []],
                  plots=spec.get("plots") or [])
    if spec.get("evaluate_generate"):
        from ..generate_eval import load_settings

        sweep.evaluate_generate = (path.parent / spec["evaluate_generate"]).resolve()
        load_settings(str(sweep.evaluate_generate))  # checked now, like the points
    for point in sweep.points():
        try:
            parse_args(["--config", str(sweep.base), *recipe_args(sweep, point, Path("check"))])
        except ConfigError as err:
            raise ConfigError(f"Sweep point {point_name(point)}: {err}") from err
    return sweep


def point_name(point: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items()).replace("/", "_").replace(":", "_")


def recipe_args(sweep: Sweep, point: dict, point_dir: Path) -> list[str]:
    settings = {**sweep.overrides, **point, "output_dir": str(point_dir),
                "ref_logps_cache_dir": str(sweep.output_dir / "ref_logps")}
    return [item for key, value in settings.items() for item in (f"--{key}", _cli_value(value))]


def _cli_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def run_sweep(sweep: Sweep) -> list[dict]:
    """Run the unfinished points, then write the results table and the plots."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    points = sweep.points()
    for index, point in enumerate(points, start=1):
        point_dir = sweep.output_dir / point_name(point)
        if (point_dir / "result.json").is_file():
            print(f"[{index}/{len(points)}] {point_name(point)}: finished earlier, skipped")
            continue
        print(f"[{index}/{len(points)}] {point_name(point)}: running", flush=True)
        command = [sys.executable, "-m", "gpo_trl", "train", "--config", str(sweep.base), *sweep.launch,
                   *recipe_args(sweep, point, point_dir)]
        if subprocess.run(command).returncode != 0:
            raise RuntimeError(f"Sweep point {point_name(point)} failed (see its output above); finished points are "
                               f"kept, rerun `gpo-trl sweep` to resume.")
        result = collect(point, point_dir)
        if sweep.evaluate_generate is not None:
            from ..generate_eval import generation_metrics

            result.update(generation_metrics(sweep.evaluate_generate, point_dir))
        write_text_atomic(point_dir / "result.json", json.dumps(result, indent=2))
        write_tables(sweep)  # current after every point, so an interrupted sweep still has its table
    rows = write_tables(sweep)
    for plot in sweep.plots:
        draw(rows, sweep, plot)
    return rows


def collect(point: dict, point_dir: Path) -> dict:
    """The point's settings plus the run's final metrics (gpo_run.json, written by the recipe)."""
    run = json.loads((point_dir / "gpo_run.json").read_text())
    return {**point, **run["metrics"], "output_dir": str(point_dir)}


def write_tables(sweep: Sweep) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(sweep.output_dir.glob("*/result.json"))]
    write_text_atomic(sweep.output_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep.output_dir / "results.csv", buffer.getvalue())
    return rows


def draw(rows: list[dict], sweep: Sweep, plot: dict) -> Path:
    """y against x, one line per value of the grid's other keys (e.g. per loss), sorted by x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = plot["x"], plot["y"]
    group_keys = [k for k in sweep.grid if k != x]
    figure, axis = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for row in rows:
        if x in row and y in row:
            groups.setdefault(", ".join(f"{k}={row[k]}" for k in group_keys), []).append((row[x], row[y]))
    for label, values in sorted(groups.items()):
        values.sort()
        axis.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=label or None)
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    if x == "beta":
        axis.set_xscale("log")
    if any(groups):
        axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = sweep.output_dir / f"plot_{_slug(y)}_vs_{_slug(x)}.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _slug(text: str) -> str:
    return text.replace("/", "_").replace(" ", "_")
