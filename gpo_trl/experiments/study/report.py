"""What a study writes: results.jsonl/csv, summary.json, tables.md (best beta per loss vs the c_f prediction,
gold reward at matched KL, every run) and the PNG plots. Also used by `--replot`."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import torch

from ...atomic import write_text_atomic
from ...losses import available_losses, get_loss
from .config import StudyConfig


def write_outputs(rows: list[dict], summary: dict, config: StudyConfig, out: Path):
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    summary["best_beta"] = best_beta_table(rows, config)
    summary["offline_reg_kl_spearman"] = offline_reg_kl_agreement(rows)
    summary["gold_at_matched_kl"] = gold_at_matched_kl(rows)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "tables.md", markdown_tables(summary["best_beta"], rows, config))
    plot_reward_vs_kl(rows, summary, out / "gold_reward_vs_kl.png")
    plot_vs_beta(rows, summary, out / "gold_reward_vs_beta.png")
    plot_offline_reg_vs_kl(rows, out / "offline_reg_vs_kl.png")


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no ties expected among these real-valued measurements)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        return [order.index(i) for i in range(len(values))]

    rx, ry = torch.tensor(ranks(x), dtype=torch.float64), torch.tensor(ranks(y), dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def offline_reg_kl_agreement(rows: list[dict]) -> dict:
    """Do the offline regulariser (on held-out pairs) and the sampled KL order the raw-beta runs the same way? Per
    loss (along its beta grid) and over all runs together (across losses too)."""
    ok = [r for r in rows if r["status"] == "ok" and not r["calibrated"]]
    agreement = {}
    for loss in dict.fromkeys(r["loss"] for r in ok):
        group = [r for r in ok if r["loss"] == loss]
        if len(group) > 2:
            agreement[loss] = spearman([r["offline_reg"] for r in group], [r["kl"] for r in group])
    if len(ok) > 2:
        agreement["all"] = spearman([r["offline_reg"] for r in ok], [r["kl"] for r in ok])
    return agreement


def gold_at_matched_kl(rows: list[dict], kls=(2.0, 3.0, 4.0, 5.0, 6.0)) -> dict:
    """How similar are the losses' gold-vs-KL curves? Each raw-beta curve's rising branch (beta from the largest down
    to the best one) interpolated linearly at common KL values; the spread across losses is max - min."""
    curves = {}
    for loss, group in _by_loss(rows, False).items():
        best = max(group, key=lambda r: r["gold_reward"])["beta"]
        branch = sorted((r["kl"], r["gold_reward"]) for r in group if r["beta"] >= best)
        curves[loss] = branch
    table = {}
    for kl in kls:
        values = {loss: interpolate(branch, kl) for loss, branch in curves.items()}
        values = {loss: v for loss, v in values.items() if v is not None}
        if len(values) > 1:
            table[str(kl)] = {**values, "spread": max(values.values()) - min(values.values())}
    return table


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None  # outside the branch: no extrapolation


def best_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(argmax on the grid, a refined estimate): the vertex of a parabola in log(beta) through the best grid point
    and its two neighbours, kept inside them; the argmax itself at the edge of the grid."""
    points = sorted(points)
    i = max(range(len(points)), key=lambda j: points[j][1])
    grid_best = points[i][0]
    if i == 0 or i == len(points) - 1:
        return grid_best, grid_best
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(b), r) for b, r in points[i - 1 : i + 2]]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denominator
    vertex = -b / (2 * a) if a < 0 else x1
    return grid_best, math.exp(min(max(vertex, x0), x2))


def best_beta_table(rows: list[dict], config: StudyConfig) -> list[dict]:
    """Per loss and arm: the best nominal beta (by gold reward), and the beta the c_f rule predicts from logistic's.

    Uncalibrated, the prediction is beta_f* = beta_logistic* x c_logistic / c_f. Calibrated, every loss runs at
    logistic's regularisation strength for the nominal beta, so the prediction is beta_logistic* itself."""
    table = []
    c_logistic = get_loss("logistic").c_f
    for calibrated in sorted({r["calibrated"] for r in rows}):
        ok = [r for r in rows if r["calibrated"] == calibrated and r["status"] == "ok"]
        logistic = best_beta([(r["beta"], r["gold_reward"]) for r in ok if r["loss"] == "logistic"])
        for loss in config.losses:
            points = [(r["beta"], r["gold_reward"]) for r in ok if r["loss"] == loss]
            c_f = get_loss(loss).c_f
            entry = {"loss": loss, "calibrated": calibrated, "c_f": c_f}
            if not points:
                table.append({**entry, "status": "refused: c_f = 0"})
                continue
            grid_best, refined = best_beta(points)
            best_row = max((r for r in ok if r["loss"] == loss), key=lambda r: r["gold_reward"])
            if calibrated:
                predicted = (logistic[0], logistic[1])
            elif c_f > 0:
                predicted = (logistic[0] * c_logistic / c_f, logistic[1] * c_logistic / c_f)
            else:
                predicted = (None, None)
            table.append({**entry, "status": "ok", "best_beta": grid_best, "best_beta_refined": refined,
                          "predicted": predicted[0], "predicted_refined": predicted[1],
                          "best_gold_reward": best_row["gold_reward"],
                          "best_gold_reward_se": best_row["gold_reward_se"],
                          "kl_at_best": best_row["kl"], "win_rate_at_best": best_row["win_rate"]})
    return table


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def markdown_tables(table: list[dict], rows: list[dict], config: StudyConfig) -> str:
    lines = []
    for calibrated in sorted({t["calibrated"] for t in table}):
        title = (f"Calibrated (`beta_calibration: {config.calibration}`): best nominal beta per loss; the c_f rule "
                 f"predicts logistic's best beta for every loss" if calibrated else
                 "Uncalibrated: best beta per loss vs the c_f prediction beta_logistic* x c_logistic / c_f")
        lines += [f"### {title}", "",
                  "| loss | c_f | best beta (grid) | predicted (grid) | best beta (refined) | predicted (refined) | "
                  "gold reward at best | KL at best | win rate at best |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in (t for t in table if t["calibrated"] == calibrated):
            if t["status"] != "ok":
                lines.append(f"| {t['loss']} | {_fmt(t['c_f'])} | {t['status']}: the trainer refuses "
                             f"`beta_calibration` for it | | | | | | |")
                continue
            predicted = _fmt(t["predicted"]) if t["predicted"] is not None else "n/a (c_f = 0)"
            predicted_refined = _fmt(t["predicted_refined"]) if t["predicted_refined"] is not None else "n/a"
            lines.append(f"| {t['loss']} | {_fmt(t['c_f'])} | {_fmt(t['best_beta'])} | {predicted} | "
                         f"{_fmt(t['best_beta_refined'])} | {predicted_refined} | "
                         f"{t['best_gold_reward']:.3f} ± {t['best_gold_reward_se']:.3f} | {t['kl_at_best']:.2f} | "
                         f"{t['win_rate_at_best']:.3f} |")
        lines.append("")
    matched = gold_at_matched_kl(rows)
    if matched:
        losses = [loss for loss in config.losses if any(loss in v for v in matched.values())]
        lines += ["### Gold reward at matched KL (raw beta, rising branch interpolated; '-' = outside the branch)", "",
                  "| KL | " + " | ".join(losses) + " | spread |", "|---" * (len(losses) + 2) + "|"]
        for kl, values in matched.items():
            cells = [f"{values[loss]:.2f}" if loss in values else "-" for loss in losses]
            lines.append(f"| {kl} | " + " | ".join(cells) + f" | {values['spread']:.2f} |")
        lines.append("")
    lines += ["### Every run", "", "| loss | calibrated | beta | effective beta | gold reward | KL | offline reg "
              "(held-out pairs) | win rate | eval accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['calibrated']} | {r['beta']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['loss']} | {r['calibrated']} | {r['beta']} | {r['beta_effective']:.4g} | "
                     f"{r['gold_reward']:.3f} | {r['kl']:.2f} | {r['offline_reg']:.3g} | {r['win_rate']:.3f} | "
                     f"{r['eval_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path):
    plt = _pyplot()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def _color(loss: str) -> str:
    """One colour per loss in every panel, whichever losses a panel has (the calibrated one has no hinge)."""
    names = available_losses()
    return f"C{names.index(loss) % 10}" if loss in names else "black"


def _by_loss(rows, calibrated):
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["calibrated"] == calibrated and r["status"] == "ok":
            groups.setdefault(r["loss"], []).append(r)
    return {loss: sorted(group, key=lambda r: r["beta"]) for loss, group in groups.items()}


def plot_reward_vs_kl(rows: list[dict], summary: dict, path: Path):
    """Gao et al.'s picture: gold reward against KL, one curve per loss, from the base LM (KL 0) through the betas
    from largest (least movement) to smallest."""
    plt = _pyplot()
    arms = sorted({r["calibrated"] for r in rows})
    base = summary["base"]["gold_reward"]
    figure, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4.5), sharey=True, sharex=True, squeeze=False)
    for axis, calibrated in zip(axes[0], arms):
        for loss, group in _by_loss(rows, calibrated).items():
            group = group[::-1]
            axis.errorbar([0.0] + [r["kl"] for r in group], [base] + [r["gold_reward"] for r in group],
                          yerr=[0.0] + [r["gold_reward_se"] for r in group], marker="o", ms=3, capsize=2,
                          elinewidth=0.8, lw=1.2, label=loss, color=_color(loss))
        axis.scatter([0.0], [base], marker="*", s=120, color="black", zorder=5, label="base LM")
        axis.set_xlabel("KL(pi || pi_ref), nats (from the policy's samples)")
        axis.set_title("calibrated beta (nominal beta to logistic)" if calibrated else "raw beta")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold reward (held-out prompts)")
    axes[0][0].legend(fontsize=7)
    _save(figure, path)


def plot_vs_beta(rows: list[dict], summary: dict, path: Path):
    plt = _pyplot()
    arms = sorted({r["calibrated"] for r in rows})
    figure, axes = plt.subplots(2, len(arms), figsize=(6 * len(arms), 7), sharex=True, squeeze=False)
    for column, calibrated in enumerate(arms):
        for loss, group in _by_loss(rows, calibrated).items():
            betas = [r["beta"] for r in group]
            axes[0][column].errorbar(betas, [r["gold_reward"] for r in group],
                                     yerr=[r["gold_reward_se"] for r in group],
                                     marker="o", ms=4, capsize=2, label=loss, color=_color(loss))
            axes[1][column].plot(betas, [max(r["kl"], 1e-3) for r in group], marker="o", ms=4, color=_color(loss))
        axes[0][column].axhline(summary["base"]["gold_reward"], color="grey", ls="--", lw=1, label="base LM")
        axes[0][column].set_title("calibrated: nominal beta" if calibrated else "raw beta")
        axes[1][column].set_yscale("log")
        axes[1][column].set_xlabel("beta (nominal)")
        for axis in axes[:, column]:
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold reward")
    axes[1][0].set_ylabel("KL(pi || pi_ref)")
    axes[0][0].legend(fontsize=7)
    _save(figure, path)


def plot_offline_reg_vs_kl(rows: list[dict], path: Path):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for loss, group in _by_loss(rows, False).items():
        axis.scatter([r["offline_reg"] for r in group], [max(r["kl"], 1e-3) for r in group], label=loss, s=18,
                     color=_color(loss))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("offline regulariser 1/2 E_mu[rho^2] (held-out pairs)")
    axis.set_ylabel("KL(pi || pi_ref) (policy samples)")
    axis.set_title("raw-beta runs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    _save(figure, path)
