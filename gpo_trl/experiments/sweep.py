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
      - {x: eval_gpo/offline_reg, y: eval_logps/chosen, xscale: log}   # also: yscale, caption
                                        # axes are labelled in words and units (gpo_trl/experiments/labels.py),
                                        # the results.csv column in small print; the caption says what to look for
    evaluate_generate: generate.yaml    # optional: `gpo-trl evaluate --generate` per point, as gen/* columns
                                        # (gen/judge_mean, gen/kl, gen/win_rate, ...), e.g. for a plot of
                                        # {x: gen/kl, y: gen/judge_mean}

Points run one after another through the same launcher as `gpo-trl train`. A point whose `result.json` exists is
finished and skipped, so an interrupted sweep resumes where it stopped. All points share one reference log-probs
cache, so with `precompute_ref_log_probs: true` the reference pass runs once for the whole sweep. Results go to
`results.jsonl` and `results.csv` (rewritten atomically after every point) and the plots to `plot_<y>_vs_<x>.png`.

On a SLURM cluster: `--emit-slurm DIR` writes a job array of the unfinished points (one task each, running
`--point INDEX`), and `--collect` rebuilds the table and plots from the points' outputs (see
gpo_trl/experiments/slurm_array.py).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import DataError
from .labels import caption, describe
from ..recipe import ConfigError, parse_args, read_yaml_file

_KEYS = {"base", "output_dir", "grid", "overrides", "launch", "plots", "evaluate_generate"}


@dataclass
class Sweep:
    base: Path
    output_dir: Path
    grid: dict[str, list]
    overrides: dict = field(default_factory=dict)
    launch: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    evaluate_generate: Path | None = None  # a generation-evaluation file (gpo_trl.online.generate_eval)

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; every point's full recipe is parsed now, so a typo fails before any run."""
    path = Path(path)
    spec = read_yaml_file(path, "sweep file")
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
    check_plots(sweep.plots, path)
    if spec.get("evaluate_generate"):
        from ..online.generate_eval import load_settings

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


def point_command(sweep: Sweep, point: dict, resume: bool = False) -> list[str]:
    """The `gpo-trl train` command of one point. `resume`: continue from the point's last complete checkpoint (a
    requeued cluster task); placed before the point's settings so that an explicit override still wins."""
    resume_args = ["--resume_from_checkpoint", "last"] if resume else []
    return [sys.executable, "-m", "gpo_trl", "train", "--config", str(sweep.base), *sweep.launch, *resume_args,
            *recipe_args(sweep, point, sweep.output_dir / point_name(point))]


def finished(sweep: Sweep, point: dict) -> bool:
    return (sweep.output_dir / point_name(point) / "result.json").is_file()


def run_point(sweep: Sweep, point: dict, resume: bool = False) -> int:
    """Train one point (unless finished) and mark it finished with result.json; returns the training's exit code."""
    point_dir = sweep.output_dir / point_name(point)
    code = subprocess.run(point_command(sweep, point, resume=resume)).returncode
    if code == 0:
        mark_finished(sweep, point, point_dir)
    return code


def mark_finished(sweep: Sweep, point: dict, point_dir: Path):
    """result.json: the point's settings, its final metrics and, with `evaluate_generate`, the gen/* columns."""
    result = collect(point, point_dir)
    if sweep.evaluate_generate is not None:
        from ..online.generate_eval import generation_metrics

        result.update(generation_metrics(sweep.evaluate_generate, point_dir))
    write_text_atomic(point_dir / "result.json", json.dumps(result, indent=2))


def run_sweep(sweep: Sweep) -> list[dict]:
    """Run the unfinished points, then write the results table and the plots."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    points = sweep.points()
    for index, point in enumerate(points, start=1):
        if finished(sweep, point):
            print(f"[{index}/{len(points)}] {point_name(point)}: finished earlier, skipped")
            continue
        print(f"[{index}/{len(points)}] {point_name(point)}: running", flush=True)
        if run_point(sweep, point) != 0:
            raise RuntimeError(f"Sweep point {point_name(point)} failed (see its output above); finished points are "
                               f"kept, rerun `gpo-trl sweep` to resume.")
        write_tables(sweep)  # current after every point, so an interrupted sweep still has its table
    return tabulate_and_plot(sweep)


def tabulate_and_plot(sweep: Sweep) -> list[dict]:
    rows = write_tables(sweep)
    for plot in sweep.plots:
        draw(rows, sweep, plot)
    return rows


def collect_points(sweep: Sweep) -> tuple[list[dict], list[str]]:
    """`gpo-trl sweep --collect`: the table and plots rebuilt from the points' outputs (e.g. after a SLURM array).
    A point whose run finished (gpo_run.json) but was not marked (no result.json) is marked now. Returns the rows
    and the names of the points without a finished run."""
    missing = []
    for point in sweep.points():
        point_dir = sweep.output_dir / point_name(point)
        if not finished(sweep, point) and (point_dir / "gpo_run.json").is_file():
            mark_finished(sweep, point, point_dir)
        if not finished(sweep, point):
            missing.append(point_name(point))
    return tabulate_and_plot(sweep), missing


def collect(point: dict, point_dir: Path) -> dict:
    """The point's settings plus the run's final metrics (gpo_run.json, written by the recipe)."""
    path = point_dir / "gpo_run.json"
    try:
        metrics = json.loads(path.read_text())["metrics"]
        if not isinstance(metrics, dict):
            raise TypeError("`metrics` is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a finished run's record ({type(err).__name__}: {err}); rerun the point with "
                        f"`gpo-trl sweep --config ... --point INDEX`, or delete {point_dir} to start it over.") from None
    return {**point, **metrics, "output_dir": str(point_dir)}


def read_result(path: Path) -> dict:
    try:
        row = json.loads(path.read_text())
        if not isinstance(row, dict):
            raise TypeError("not a mapping")
        return row
    except (ValueError, TypeError) as err:
        raise DataError(f"{path} is not a point's result ({type(err).__name__}: {err}); delete it and run "
                        f"`gpo-trl sweep --config ... --collect` again to rebuild it from the point's gpo_run.json.") \
            from None


def write_tables(sweep: Sweep) -> list[dict]:
    rows = [read_result(p) for p in sorted(sweep.output_dir.glob("*/result.json"))]
    write_text_atomic(sweep.output_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep.output_dir / "results.csv", buffer.getvalue())
    return rows


_PLOT_KEYS = {"x", "y", "xscale", "yscale", "caption"}
_MARKERS = "osD^vP*Xh<>"


def check_plots(plots, path: Path):
    if not isinstance(plots, list) or not all(isinstance(p, dict) and {"x", "y"} <= set(p) for p in plots):
        raise ConfigError(f"`plots` in {path} must be a list of mappings with `x` and `y` (and optionally `xscale`, "
                          "`yscale`: linear or log).")
    for plot in plots:
        if set(plot) - _PLOT_KEYS or plot.get("xscale", "linear") not in ("linear", "log") \
                or plot.get("yscale", "linear") not in ("linear", "log"):
            raise ConfigError(f"Plot {plot} in {path}: keys are {sorted(_PLOT_KEYS)}, scales `linear` or `log`.")


def draw(rows: list[dict], sweep: Sweep, plot: dict) -> Path:
    """Write `plot_<y>_vs_<x>.png` (atomically) into the sweep's output_dir."""
    import matplotlib.pyplot as plt

    figure = plot_figure(rows, sweep, plot)
    path = sweep.output_dir / f"plot_{_slug(plot['y'])}_vs_{_slug(plot['x'])}.png"
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format="png")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def plot_figure(rows: list[dict], sweep: Sweep, plot: dict):
    """y against x. Colour: the loss (or the grid's first key); marker: the combination of the remaining keys.
    x a grid key: one line per colour/marker combination, ticks at the grid values. x a metric: one point per run,
    the points of one colour joined in grid order, so each loss traces a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    x, y = plot["x"], plot["y"]
    keys = [k for k in sweep.grid if k != x]
    colour_key = "gpo_loss" if "gpo_loss" in keys else (keys[0] if keys else None)
    marker_keys = [k for k in keys if k != colour_key]
    colours = {v: f"C{i}" for i, v in enumerate(sweep.grid.get(colour_key, [None]))}
    markers = _marker_styles(sweep, marker_keys)
    order = {tuple(p.values()): i for i, p in enumerate(sweep.points())}
    usable = sorted((r for r in rows if x in r and y in r), key=lambda r: order.get(tuple(r[k] for k in sweep.grid), 0))
    figure, axis = plt.subplots(figsize=(6.4, 4.6))
    by_x_grid = x in sweep.grid
    series: dict[tuple, list] = {}
    for row in usable:
        marker_value = tuple(row.get(k) for k in marker_keys)
        group = (row.get(colour_key), marker_value) if by_x_grid else (row.get(colour_key),)
        series.setdefault(group, []).append(row)
    for group, members in series.items():
        colour = colours.get(group[0], "C0")
        points = sorted(members, key=lambda r: r[x]) if by_x_grid else members
        axis.plot([r[x] for r in points], [r[y] for r in points], color=colour, alpha=0.9 if by_x_grid else 0.35,
                  linewidth=1.5 if by_x_grid else 1.0, zorder=1)
        for row in points:
            axis.scatter(row[x], row[y], color=colour, marker=markers[tuple(row.get(k) for k in marker_keys)],
                         s=40, zorder=2, edgecolors="white", linewidths=0.5)
    xscale = plot.get("xscale", "log" if x == "beta" else "linear")
    axis.set_xscale(xscale)
    axis.set_yscale(plot.get("yscale", "linear"))
    if by_x_grid and all(isinstance(v, (int, float)) for v in sweep.grid[x]):
        # ticks at the grid values only: a log axis would otherwise label minor ticks that run into each other
        axis.xaxis.set_major_locator(FixedLocator(sorted(sweep.grid[x])))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels([f"{v:g}" for v in sorted(sweep.grid[x])])
    handles = [Line2D([], [], color=c, marker="o", linestyle="-", label=f"{colour_key}={v}")
               for v, c in colours.items() if v is not None and any(g[0] == v for g in series)]
    if len(markers) > 1:
        handles += [Line2D([], [], color="0.4", marker=m, linestyle="none", label=_label(marker_keys, v))
                    for v, m in markers.items()]
    if handles:
        axis.legend(handles=handles, fontsize=8, ncol=2 if len(handles) > 6 else 1)
    label_axes(figure, axis, x, y, plot.get("caption") or caption(x, y, colour_key))
    axis.grid(alpha=0.3)
    return figure


def label_axes(figure, axis, x: str, y: str, caption_text: str):
    """Axes in words with their unit, the results.csv column under each in small print, a caption at the bottom."""
    import textwrap

    x_label, y_label = describe(x), describe(y)
    axis.set_xlabel(textwrap.fill(x_label.axis_text(), 70))
    axis.set_ylabel(textwrap.fill(y_label.axis_text(), 36))
    axis.set_title(textwrap.fill(f"{y_label.words[:1].upper()}{y_label.words[1:]} vs {x_label.words}", 75),
                   fontsize=10)
    small = dict(fontsize=7, color="0.35", textcoords="offset points", annotation_clip=False)
    if x_label.words != x:
        axis.annotate(x, xy=(0.5, 0), xycoords=axis.xaxis.label, xytext=(0, -1), ha="center", va="top", **small)
    if y_label.words != y:
        axis.annotate(y, xy=(0, 0.5), xycoords=axis.yaxis.label, xytext=(-1, 0), ha="right", va="center",
                      rotation=90, **small)
    figure.text(0.01, 0.01, "\n".join(textwrap.wrap(caption_text, 110)), fontsize=7.5, ha="left", va="bottom",
                color="0.2")
    lines = 1 + len(caption_text) // 110
    figure.tight_layout(rect=(0, 0.035 * lines + 0.03, 1, 1))


def _marker_styles(sweep: Sweep, marker_keys: list[str]) -> dict[tuple, str]:
    values = list(dict.fromkeys(tuple(p[k] for k in marker_keys) for p in sweep.points()))
    return {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(values)}


def _label(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values))


def _slug(text: str) -> str:
    return text.replace("/", "_").replace(" ", "_")
