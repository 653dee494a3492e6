"""The controlled study's iterative arm: does sampling fresh pairs from the current policy and labelling them with the
gold reward (iterative, on-policy GPO) reach more gold reward at the same KL than training once on the base LM's
pairs (offline)?

    python -m gpo_trl.experiments.study_iterative --config configs/studies/iterative.yaml --out docs/study_iterative

Built on gpo_trl.experiments.study (its task, base LM, samplers, gold reward and evaluation are imported, not copied):
one `prepare` gives the base LM, the offline Bradley-Terry pairs and the held-out prompts. Per loss and beta:

- offline: the study's own point (`run_point`): GPOTrainer on the base LM's `train_pairs` pairs;
- iterative: `rounds` rounds, each on `train_pairs / rounds` fresh prompts with two samples from the current policy,
  labelled by the offline arm's own rule (`study.preference_pairs`: Bradley-Terry on the gold reward with a seeded
  coin; identical completions make no pair), trained with GPOTrainer from the current policy against the base LM as
  the reference (iterate's `reference: initial`), with the offline arm's epochs, batch size and learning rate. Same
  number of prompts as offline, so the two arms see the same number of pairs (minus identical ones), labelled alike:
  the arms differ only in where the samples come from.

Every round's policy is evaluated like the offline points (gold reward, win rate, KL(pi || base) from its own
samples, same evaluation seed). Outputs in --out: results.jsonl / results.csv (one row per arm x loss x beta x round),
summary.json, tables.md and gold_reward_vs_kl_iterative.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..online.generation import check_keys
from ..atomic import write_text_atomic
from ..losses import available_losses
from ..recipe import ConfigError
from . import study


@dataclass
class IterativeConfig:
    study: str = "gold_reward.yaml"  # the study file (relative to this file): task, base LM, data, training
    losses: list[str] = field(default_factory=lambda: ["logistic", "squared"])
    betas: list[float] = field(default_factory=lambda: [0.025, 0.1, 0.4])
    rounds: int = 4
    samples_per_prompt: int = 2  # the offline arm's pairs are two samples per prompt; the labelling rule needs two
    seed: int | None = None  # overrides the study file's seed


def load_config(path: str | Path) -> tuple[IterativeConfig, study.StudyConfig]:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read iterative study file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"Iterative study file {path} must be a YAML mapping.")
    check_keys(spec, [f for f in IterativeConfig.__dataclass_fields__], f"iterative study file {path}")
    config = IterativeConfig(**spec)
    unknown = [name for name in config.losses if name not in available_losses()]
    if unknown:
        raise ConfigError(f"Unknown losses {unknown} in {path}; available: {', '.join(available_losses())}.")
    if not config.betas or any(not (isinstance(b, (int, float)) and b > 0) for b in config.betas):
        raise ConfigError(f"`betas` in {path} must be a non-empty list of numbers > 0.")
    if not (isinstance(config.rounds, int) and config.rounds >= 1):
        raise ConfigError(f"`rounds` in {path} must be an integer >= 1.")
    if config.samples_per_prompt != 2:
        raise ConfigError(f"`samples_per_prompt` in {path} must be 2: both arms label a pair of two samples by the "
                          f"same rule (Bradley-Terry on the gold reward), got {config.samples_per_prompt!r}.")
    study_config = study.load_config(path.parent / config.study)
    if config.seed is not None:
        study_config.seed = config.seed
    return config, study_config


# --- One iterative run ------------------------------------------------------------------------------------------


def on_policy_pairs(policy, n_prompts: int, cfg: study.StudyConfig, generator: torch.Generator
                    ) -> tuple[list[dict], dict]:
    """Fresh prompts, two samples each from the policy, labelled as the offline arm labels the base LM's samples
    (`study.preference_pairs`), so that the arms differ only in the sampling policy."""
    rows, stats = study.preference_pairs(policy, n_prompts, cfg, generator)
    return rows, {"pairs": stats["pairs"], "ties": stats["dropped_identical"], "sampled_gold": stats["sampled_gold"],
                  "label_agrees_with_gold": stats["label_agrees_with_gold"]}


def train_round(loss: str, beta: float, start: Path, rows: list[dict], data: dict, cfg: study.StudyConfig,
                work: Path, name: str):
    """The study's training settings (train_policy's), starting from `start`, against the base LM as the reference
    (a fresh frozen copy per trainer)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback

    from .. import GPOConfig, GPOTrainer

    args = GPOConfig(
        output_dir=str(work / "runs" / name), gpo_loss=loss, beta=beta, precompute_ref_log_probs=True,
        ref_logps_cache_dir=str(work / "ref_logps"), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=128, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant", max_length=64, seed=cfg.seed, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    reference = AutoModelForCausalLM.from_pretrained(work / "base").eval()
    trainer = GPOTrainer(model=str(start), ref_model=reference, args=args, processing_class=data["tokenizer"],
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(data["eval"]))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    metrics = trainer.evaluate()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return trainer.model.eval(), {"offline_reg": metrics["eval_gpo/offline_reg"], "eval_loss": metrics["eval_loss"],
                                  "steps": trainer.state.global_step}


def run_iterative(loss: str, beta: float, config: IterativeConfig, data: dict, cfg: study.StudyConfig,
                  work: Path) -> list[dict]:
    """`rounds` rounds from the base LM; one row per round, each with the study's evaluation of that round's policy."""
    generator = torch.Generator().manual_seed(cfg.seed + 7)  # the same prompts and dice for every loss and beta
    policy, start = data["base_model"], work / "base"
    per_round = cfg.train_pairs // config.rounds
    rows = []
    for k in range(1, config.rounds + 1):
        began = time.perf_counter()
        pairs, stats = on_policy_pairs(policy, per_round, cfg, generator)
        name = f"{loss}-beta{beta}-round{k}"
        policy, metrics = train_round(loss, beta, start, pairs, data, cfg, work, name)
        start = work / "iterative" / name
        policy.save_pretrained(start)
        evaluation = study.evaluate_policy(policy, data["base_model"], data["heldout"], data["base_rewards"], cfg,
                                           seed=cfg.seed + 1)
        rows.append({"arm": "iterative", "loss": loss, "beta": beta, "round": k, **stats, **metrics, **evaluation,
                     "seconds": time.perf_counter() - began})
    return rows


# --- The study --------------------------------------------------------------------------------------------------


def run(config: IterativeConfig, cfg: study.StudyConfig, out: Path, log=print) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpo-study-iterative-"))
    began = time.perf_counter()
    try:
        data = study.prepare(cfg, work)
        log(f"base LM: gold reward {data['base']['gold_reward']:.3f}")
        rows = []
        for loss in config.losses:
            for beta in config.betas:
                offline = study.run_point(loss, beta, False, data, cfg, work)
                rows.append({"arm": "offline", "round": 0, **offline})
                log(f"offline {loss} beta={beta}: gold {offline['gold_reward']:.3f} KL {offline['kl']:.3f}")
                for row in run_iterative(loss, beta, config, data, cfg, work):
                    rows.append(row)
                    log(f"iterative {loss} beta={beta} round {row['round']}: gold {row['gold_reward']:.3f} "
                        f"KL {row['kl']:.3f} ({row['pairs']} pairs, {row['ties']} ties)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"config": asdict(config), "study": asdict(cfg), "base": data["base"],
               "seconds": time.perf_counter() - began}
    write_outputs(rows, summary, out)
    return rows


def write_outputs(rows: list[dict], summary: dict, out: Path):
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "tables.md", markdown_table(rows))
    plot(rows, summary, out / "gold_reward_vs_kl_iterative.png")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| loss | beta | arm | round | gold reward | KL | pairs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['beta']:g} | {r['arm']} | {r['round']} | {r['gold_reward']:.3f} "
                     f"| {r['kl']:.3f} | {r.get('pairs', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    colors = {"logistic": "tab:blue", "squared": "tab:orange"}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        color = colors.get(loss, None)
        offline = sorted((r["kl"], r["gold_reward"]) for r in rows if r["loss"] == loss and r["arm"] == "offline")
        axis.plot(*zip(*offline), marker="o", color=color, label=f"{loss} offline (over beta)")
        for beta in dict.fromkeys(r["beta"] for r in rows if r["loss"] == loss):
            trajectory = [(r["kl"], r["gold_reward"]) for r in rows
                          if r["loss"] == loss and r["arm"] == "iterative" and r["beta"] == beta]
            axis.plot(*zip(*trajectory), marker="^", linestyle="--", color=color, alpha=0.7,
                      label=f"{loss} iterative (rounds)" if beta == rows[0]["beta"] else None)
    axis.axhline(summary["base"]["gold_reward"], color="grey", linewidth=0.8, label="base LM")
    axis.set_xlabel("KL(pi || base), nats (from the policy's samples)")
    axis.set_ylabel("gold reward (held-out prompts)")
    axis.set_xlim(left=0)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- Across seeds ------------------------------------------------------------------------------------------------


def matched_kl_gaps(rows: list[dict], base_gold: float | None = None) -> list[dict]:
    """Each iterative policy against the offline curve of its loss (the offline points over beta, plus the base LM at
    KL 0 when given, sorted by KL and interpolated linearly): gold(iterative) - gold(offline at the same KL). Points
    beyond the curve's largest KL get no gap (no extrapolation)."""
    gaps = []
    for r in rows:
        if r["arm"] != "iterative":
            continue
        curve = sorted([(o["kl"], o["gold_reward"]) for o in rows if o["arm"] == "offline" and o["loss"] == r["loss"]]
                       + ([(0.0, base_gold)] if base_gold is not None else []))
        at = study.interpolate(curve, r["kl"])
        gaps.append({"loss": r["loss"], "beta": r["beta"], "round": r["round"], "kl": r["kl"],
                     "gold": r["gold_reward"], "offline_gold_at_kl": at, "gap": None if at is None else r["gold_reward"] - at})
    return gaps


def across_seeds(directories: list[Path]) -> str:
    """Markdown: per loss x beta, offline and final-round iterative gold and KL (mean and sd over seeds), and the
    matched-KL gaps of every iterative round."""
    runs = {d: [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()] for d in directories}
    last = max(r["round"] for rows in runs.values() for r in rows)

    def stat(values):
        present = [v for v in values if v is not None]
        if not present:
            return "n/a"
        if len(present) == 1:
            return f"{present[0]:.2f} (1 seed)"
        text = f"{statistics.fmean(present):.2f} ± {statistics.stdev(present):.2f}"
        return text + (f" ({len(present)} seeds)" if len(present) < len(values) else "")

    first = next(iter(runs.values()))
    keys = list(dict.fromkeys((r["loss"], r["beta"]) for r in first))
    lines = [f"Seeds: {len(runs)} ({', '.join(d.name for d in directories)}); mean ± sd over seeds.", "",
             f"| loss | beta | offline gold | offline KL | iterative gold (round {last}) | iterative KL (round {last}) |",
             "|---|---|---|---|---|---|"]
    for loss, beta in keys:
        pick = lambda arm, rnd, key: [r[key] for rows in runs.values() for r in rows  # noqa: E731
                                      if (r["loss"], r["beta"], r["arm"], r["round"]) == (loss, beta, arm, rnd)]
        lines.append(f"| {loss} | {beta:g} | {stat(pick('offline', 0, 'gold_reward'))} | {stat(pick('offline', 0, 'kl'))} "
                     f"| {stat(pick('iterative', last, 'gold_reward'))} | {stat(pick('iterative', last, 'kl'))} |")
    lines += ["", "Gold reward of each iterative round minus the offline curve's gold at the same KL (same loss, "
              "same seed, the base LM as the curve's KL-0 point; n/a: beyond the offline curve's largest KL):", "",
              "| loss | beta | round | gap per seed | mean gap |", "|---|---|---|---|---|"]
    gaps = {d: matched_kl_gaps(rows, json.loads((d / "summary.json").read_text())["base"]["gold_reward"])
            for d, rows in runs.items()}
    for index, g in enumerate(next(iter(gaps.values()))):
        per_seed = [gaps[d][index]["gap"] for d in directories]
        shown = ", ".join("n/a" if v is None else f"{v:+.2f}" for v in per_seed)
        lines.append(f"| {g['loss']} | {g['beta']:g} | {g['round']} | {shown} | {stat(per_seed)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the iterative study file")
    parser.add_argument("--out", required=True, help="output folder (with --across: where summary.md goes)")
    parser.add_argument("--seed", type=int, help="overrides the seed")
    parser.add_argument("--across", nargs="+", help="finished runs' folders: write their across-seed summary.md")
    args = parser.parse_args(argv)
    if args.across:
        text = across_seeds([Path(d) for d in args.across])
        write_text_atomic(Path(args.out) / "summary.md", text)
        print(text)
        return []
    if not args.config:
        parser.error("--config is required (or --across)")
    config, cfg = load_config(args.config)
    if args.seed is not None:
        cfg.seed = config.seed = args.seed
    return run(config, cfg, Path(args.out))


if __name__ == "__main__":
    main()
