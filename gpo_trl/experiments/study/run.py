"""The study's runs: preference pairs from the base LM, one real GPOTrainer run per grid point, and the loop."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ...losses import get_loss
from .config import StudyConfig
from .measure import diversity, evaluate_policy, rewards, sample_in_batches, token_entropy
from .report import write_outputs
from .task import PAD, body, build_model, build_tokenizer, make_corpus, pretrain, random_prompts, to_text


# --- Preference data ------------------------------------------------------------------------------------------------


def preference_pairs(base, n: int, config: StudyConfig, generator: torch.Generator) -> tuple[list[dict], dict]:
    """Two base-LM samples per fresh prompt, labelled by Bradley-Terry on the gold reward with a seeded coin. Pairs
    with identical completions carry no preference (rho is 0 whatever the policy) and are dropped."""
    prompts = random_prompts(n, config, generator)
    first = sample_in_batches(base, prompts, config, generator)
    second = sample_in_batches(base, prompts, config, generator)
    r1, r2 = rewards(prompts, first), rewards(prompts, second)
    first_wins = torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(r1 - r2)
    rows, ties = [], 0
    for i in range(n):
        y1, y2 = body(first[i].tolist()), body(second[i].tolist())
        if y1 == y2:
            ties += 1
            continue
        chosen, rejected = (y1, y2) if first_wins[i] else (y2, y1)
        # Completions start with a space so that prompt + completion tokenises as the two token lists joined;
        # TRL appends the EOS itself.
        rows.append({"prompt": to_text(prompts[i].tolist()), "chosen": " " + to_text(chosen),
                     "rejected": " " + to_text(rejected)})
    stats = {"pairs": len(rows), "dropped_identical": ties, "sampled_gold": float(torch.cat([r1, r2]).mean()),
             "label_agrees_with_gold": float(((r1 > r2) == first_wins)[r1 != r2].double().mean())}
    return rows, stats


# --- One GPO run --------------------------------------------------------------------------------------------------


def train_policy(loss: str, beta: float, calibrated: bool, data: dict, config: StudyConfig, work: Path):
    """The real GPOTrainer, full fine-tuning from the base LM. The reference log-probs are precomputed; the trainer's
    cache (keyed by data and weights) makes every run after the first reuse them."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from ... import GPOConfig, GPOTrainer

    name = f"{loss}-beta{beta}-{'cal' if calibrated else 'raw'}"
    args = GPOConfig(
        output_dir=str(work / "runs" / name), gpo_loss=loss, beta=beta,
        beta_calibration=config.calibration if calibrated else None,
        precompute_ref_log_probs=True, ref_logps_cache_dir=str(work / "ref_logps"),
        num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=128,
        learning_rate=config.learning_rate, lr_scheduler_type="constant", max_length=64, seed=config.seed,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GPOTrainer(model=str(work / "base"), args=args, processing_class=data["tokenizer"],
                         train_dataset=Dataset.from_list(data["train"]), eval_dataset=Dataset.from_list(data["eval"]))
    trainer.remove_callback(PrinterCallback)  # logging_steps=1 feeds the offline-regulariser average, not stdout
    trainer.train()
    metrics = trainer.evaluate()
    logged = [entry for entry in trainer.state.log_history if "gpo/offline_reg" in entry]
    last = logged[-max(1, len(logged) // 10):]  # the last tenth of training, so one noisy batch does not decide
    shutil.rmtree(args.output_dir, ignore_errors=True)  # nothing was saved, but keep the work dir small
    return trainer.model.eval(), {
        "beta_effective": float(trainer.beta), "steps": trainer.state.global_step,
        "offline_reg": metrics["eval_gpo/offline_reg"], "margin": metrics["eval_gpo/margin"],
        "eval_loss": metrics["eval_loss"], "eval_accuracy": metrics["eval_rewards/accuracies"],
        "train_offline_reg": sum(e["gpo/offline_reg"] for e in last) / len(last),
    }


def calibration_refusal(loss: str, config: StudyConfig) -> str | None:
    """The trainer's own answer on whether `loss` can be calibrated (hinge, c_f = 0, cannot): None, or its error.
    Only that refusal is a finding; any other error from GPOConfig is a bug in the study and propagates."""
    from ... import CalibrationError, GPOConfig

    try:
        GPOConfig(output_dir="unused", gpo_loss=loss, beta=0.1, beta_calibration=config.calibration, use_cpu=True,
                  report_to=[])
    except CalibrationError as err:
        return str(err)
    return None


# --- The study ----------------------------------------------------------------------------------------------------


def prepare(config: StudyConfig, work: Path) -> dict:
    """Pre-train the base LM, measure it, and make the train / eval preference pairs and the held-out prompts."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.vocab)
    model = build_model(config, tokenizer)
    corpus = make_corpus(config, generator)
    start = time.perf_counter()
    curve = pretrain(model, corpus, config, generator)
    pretrain_seconds = time.perf_counter() - start
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")

    train, train_stats = preference_pairs(model, config.train_pairs, config, generator)
    evaluation, _ = preference_pairs(model, config.eval_pairs, config, generator)
    heldout = random_prompts(config.heldout_prompts, config, generator).repeat_interleave(config.samples_per_prompt, 0)
    base_completions = sample_in_batches(model, heldout, config, generator)
    base_rewards = rewards(heldout, base_completions)
    prompt_len = config.prompt_length + 1
    corpus_prompts = torch.tensor([s[:prompt_len] for s in corpus[:2000]])
    corpus_completions = [s[prompt_len:] for s in corpus[:2000]]
    width = config.max_new_tokens + 1
    corpus_completions = torch.tensor([c + [PAD] * (width - len(c)) for c in corpus_completions])
    base = {
        "pretrain_loss_first": curve[0], "pretrain_loss_last": sum(curve[-50:]) / len(curve[-50:]),
        "pretrain_seconds": pretrain_seconds,
        "gold_reward": base_rewards.mean().item(), "gold_reward_sd": base_rewards.std().item(),
        "corpus_gold_reward": rewards(corpus_prompts, corpus_completions).mean().item(),
        "mean_token_entropy": token_entropy(model, heldout, base_completions),
        "samples": [to_text(c) for c in base_completions[:4].tolist()],
        **diversity(heldout, base_completions), **{f"pairs_{k}": v for k, v in train_stats.items()},
        "corpus_diversity": diversity(corpus_prompts, corpus_completions),
    }
    return {"tokenizer": tokenizer, "base_model": model, "train": train, "eval": evaluation, "heldout": heldout,
            "base_rewards": base_rewards, "base": base}


def grid(config: StudyConfig) -> list[tuple[str, float, bool]]:
    arms = [False] + ([True] if config.calibration else [])
    return [(loss, beta, calibrated) for calibrated in arms for loss in config.losses for beta in config.betas]


def run_study(config: StudyConfig, out: Path, work: Path | None = None, log=print) -> dict:
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="gpo-study-")) if own_work else work
    start = time.perf_counter()
    try:
        data = prepare(config, work)
        log(f"base LM: gold reward {data['base']['gold_reward']:.3f}, distinct completions per prompt "
            f"{data['base']['distinct_per_prompt']:.2f}, token entropy {data['base']['mean_token_entropy']:.2f} nats")
        rows = []
        points = grid(config)
        for index, (loss, beta, calibrated) in enumerate(points, start=1):
            rows.append(run_point(loss, beta, calibrated, data, config, work))
            row = rows[-1]
            log(f"[{index}/{len(points)}] {loss} beta={beta} calibrated={calibrated}: " + (
                f"gold {row['gold_reward']:.3f}  KL {row['kl']:.3f}  offline reg {row['offline_reg']:.3f}  "
                f"({row['seconds']:.1f}s)" if row["status"] == "ok" else row["status"]))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"config": dataclasses.asdict(config), "base": data["base"], "seconds": time.perf_counter() - start,
               "threads": torch.get_num_threads(), "c_f": {name: get_loss(name).c_f for name in config.losses}}
    write_outputs(rows, summary, config, out)
    return {"rows": rows, "summary": summary}


def run_point(loss: str, beta: float, calibrated: bool, data: dict, config: StudyConfig, work: Path) -> dict:
    row = {"loss": loss, "beta": beta, "calibrated": calibrated, "c_f": get_loss(loss).c_f}
    refusal = calibration_refusal(loss, config) if calibrated else None
    if refusal is not None:  # hinge: c_f = 0, the trainer refuses to calibrate it; recorded, not trained
        return {**row, "status": "refused: c_f = 0", "error": refusal.splitlines()[0]}
    start = time.perf_counter()
    policy, metrics = train_policy(loss, beta, calibrated, data, config, work)
    # The same evaluation seed for every policy: differences between rows come from the policies, not the dice
    evaluation = evaluate_policy(policy, data["base_model"], data["heldout"], data["base_rewards"], config,
                                 seed=config.seed + 1)
    return {**row, "status": "ok", **metrics, **evaluation, "seconds": time.perf_counter() - start}
