"""A controlled study in the style of Gao et al. 2023, small enough for a CPU: does every GPO loss trace the same
gold-reward-vs-KL curve, at a best beta that the c_f calibration predicts?

    python -m gpo_trl.experiments.study --config configs/studies/gold_reward.yaml --out docs/study

The task is synthetic but nothing is faked:

1. A programmatic *gold reward* scores token sequences (`gold_reward`): it likes "good" tokens and echoes of the
   prompt, and dislikes repeats, junk tokens and lengths far from a target. The terms pull against each other, so
   pushing one feature too far (e.g. repeating a good token) costs reward.
2. A tiny Llama is *pre-trained* on a synthetic corpus that does not maximise that reward (`make_corpus`), so the base
   LM samples diverse, mediocre completions. Its diversity is measured and reported.
3. Preference pairs: two completions sampled from the base LM per prompt, labelled by Bradley-Terry on the gold reward
   (P(y1 > y2) = sigmoid(r1 - r2), a seeded coin flip).
4. Every loss x beta (and again with `beta_calibration`) is trained with the real `GPOTrainer` (full fine-tuning,
   reference log-probs precomputed once and shared through the trainer's cache). Each policy then samples on
   held-out prompts: mean gold reward, win rate against the base LM, and KL(pi || pi_ref) estimated from the policy's
   own samples (mean of log pi(y|x) - log pi_ref(y|x), sequence level, exact temperature-1 sampling so the estimator
   is unbiased). The offline regulariser 1/2 E_mu[rho^2] is taken from the trainer's `eval_gpo/offline_reg` on
   held-out pairs from the same data distribution mu.

Outputs in --out: results.jsonl / results.csv (one row per loss x beta x calibrated), summary.json (base LM,
diversity, timings), tables.md (best beta per loss vs the c_f prediction), and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..guards import write_text_atomic
from ..losses import available_losses, get_loss
from ..recipe import ConfigError

# --- Configuration ----------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """Every key of a study YAML file. An unknown key is an error (the project's rule: nothing silently ignored)."""

    seed: int = 0
    threads: int = 2  # torch intra-op threads; fixed so that runs are reproducible and comparable in time
    # The task and the base LM
    vocab: int = 32  # content tokens w0..w{vocab-1}
    prompt_length: int = 4
    max_new_tokens: int = 12
    hidden_size: int = 64
    layers: int = 2
    corpus_size: int = 8000
    base_steps: int = 800
    base_batch_size: int = 64
    base_learning_rate: float = 3e-3
    # Preference data and evaluation
    train_pairs: int = 512
    eval_pairs: int = 128
    heldout_prompts: int = 64
    samples_per_prompt: int = 8
    # The GPO grid
    losses: list[str] = field(default_factory=available_losses)
    betas: list[float] = field(default_factory=lambda: [0.025, 0.05, 0.1, 0.2, 0.4])
    calibration: str | None = "logistic"  # the reference loss of the calibrated arm; null skips that arm
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-3


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read study file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"Study file {path} must be a YAML mapping of `key: value` lines.")
    fields = {f.name: f.type for f in dataclasses.fields(StudyConfig)}
    for key, value in spec.items():
        if key not in fields:
            raise ConfigError(f"Unknown key {key!r} in study file {path}; known keys: {', '.join(fields)}.")
        if not _has_type(value, fields[key]):
            raise ConfigError(f"`{key}` in study file {path} must be {fields[key]}, got {value!r}.")
        if fields[key] == "int" and key != "seed" and value < 1:
            raise ConfigError(f"`{key}` in study file {path} must be >= 1, got {value!r}.")
    config = StudyConfig(**spec)
    unknown_losses = [name for name in config.losses if name not in available_losses()]
    if unknown_losses:
        raise ConfigError(f"Unknown losses {unknown_losses} in {path}; available: {', '.join(available_losses())}.")
    if not config.betas or any(not b > 0 for b in config.betas):
        raise ConfigError(f"`betas` in {path} must be a non-empty list of numbers > 0, got {config.betas!r}.")
    if "logistic" not in config.losses:
        raise ConfigError(f"`losses` in {path} must include logistic: the c_f predictions are relative to it.")
    if config.calibration is not None and config.calibration not in available_losses():
        raise ConfigError(f"`calibration: {config.calibration}` in {path} is not a registered loss.")
    return config


def _has_type(value, annotation: str) -> bool:
    """The YAML value matches the field's annotation (ints are fine where floats are expected; bools never are)."""
    if isinstance(value, bool):
        return False
    expected = {"int": int, "float": (int, float), "list[str]": list, "list[float]": list,
                "str | None": (str, type(None))}
    return isinstance(value, expected[annotation])


# --- The task: vocabulary, gold reward, corpus --------------------------------------------------------------------
# Token ids: 0 = EOS, 1 = PAD, 2 = ":" (ends every prompt), 3.. = content tokens w0, w1, ...
EOS, PAD, SEP, FIRST_WORD = 0, 1, 2, 3
GOOD_EVERY = 4  # w0, w4, w8, ... are "good": a quarter of the vocabulary
TARGET_LENGTH = 6
# Gold reward weights. The best completions (about 6-8 distinct good words, echoing the prompt's good words) score
# about 7; the base LM's samples average about -0.6 (sd 2.1, see summary.json): room to improve and to overshoot.
W_GOOD, W_ECHO, W_REPEAT, W_LENGTH, W_JUNK = 1.0, 0.5, 1.0, 0.5, 2.0


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the study's symbols: text "w3 w17 w0 w9 :" <-> ids, one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": EOS, "<|pad|>": PAD, ":": SEP, **{f"w{i}": FIRST_WORD + i for i in range(vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


def body(completion: list[int]) -> list[int]:
    """The completion's tokens before its first EOS."""
    return completion[: completion.index(EOS)] if EOS in completion else list(completion)


def gold_reward(prompt: list[int], completion: list[int]) -> float:
    """Good tokens and prompt echoes add; repeats, junk (PAD/":" in a completion) and distance from the target length
    subtract. Repeating one good token buys +1 and costs -1, so the reward cannot be farmed by repetition."""
    tokens = body(completion)
    words = [t for t in tokens if t >= FIRST_WORD]
    good = sum((t - FIRST_WORD) % GOOD_EVERY == 0 for t in words)
    echo = sum(t in prompt for t in words)
    repeats = len(words) - len(set(words))
    junk = len(tokens) - len(words)
    length_gap = abs(len(tokens) - TARGET_LENGTH)
    return W_GOOD * good + W_ECHO * echo - W_REPEAT * repeats - W_JUNK * junk - W_LENGTH * length_gap


def random_prompts(n: int, config: StudyConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, prompt_length + 1): distinct content tokens, then the ":" separator."""
    words = torch.rand(n, config.vocab, generator=generator).argsort(dim=1)[:, : config.prompt_length] + FIRST_WORD
    return torch.cat([words, torch.full((n, 1), SEP)], dim=1)


def make_corpus(config: StudyConfig, generator: torch.Generator) -> list[list[int]]:
    """The "human" text the base LM imitates: lengths 2..max_new_tokens, tokens from a Zipf law whose ranking ignores
    the gold reward, with some copying from the prompt and some immediate repeats. Mediocre by design."""
    zipf = 1.0 / torch.arange(1, config.vocab + 1, dtype=torch.float) ** 0.8
    ranking = torch.randperm(config.vocab, generator=torch.Generator().manual_seed(1234))  # fixed: part of the task
    unigram = torch.empty(config.vocab).scatter_(0, ranking, zipf / zipf.sum())
    prompts = random_prompts(config.corpus_size, config, generator)
    sequences = []
    for prompt in prompts.tolist():
        length = int(torch.randint(2, config.max_new_tokens + 1, (1,), generator=generator))
        completion: list[int] = []
        for _ in range(length):
            u = float(torch.rand(1, generator=generator))
            if u < 0.2:  # echo a prompt word
                completion.append(prompt[int(torch.randint(config.prompt_length, (1,), generator=generator))])
            elif u < 0.35 and completion:  # repeat the previous word
                completion.append(completion[-1])
            else:
                completion.append(FIRST_WORD + int(torch.multinomial(unigram, 1, generator=generator)))
        sequences.append(prompt + completion + [EOS])
    return sequences


# --- The base LM ----------------------------------------------------------------------------------------------------


def build_model(config: StudyConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(model_config)


def pretrain(model, corpus: list[list[int]], config: StudyConfig, generator: torch.Generator) -> list[float]:
    """Plain next-token training on the completions (the prompts are uniform noise, nothing to learn there)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / config.base_steps)
    prompt_len = config.prompt_length + 1
    width = max(len(s) for s in corpus)
    ids = torch.full((len(corpus), width), PAD)
    for i, sequence in enumerate(corpus):
        ids[i, : len(sequence)] = torch.tensor(sequence)
    labels = ids.masked_fill(ids == PAD, -100)
    labels[:, :prompt_len] = -100
    losses = []
    model.train()
    for _ in range(config.base_steps):
        batch = torch.randint(len(corpus), (config.base_batch_size,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=(ids[batch] != PAD).long(), labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


# --- Sampling and scoring -------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Exact temperature-1 ancestral sampling over the full vocabulary (no top-k/top-p, so the KL estimate below is
    unbiased), with a KV cache. Every prompt has the same length, so no padding is involved. Tokens after the first
    EOS are set to PAD; the completion includes its EOS."""
    model.eval()
    out = model(input_ids=prompts, use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        next_token = torch.multinomial(probs, 1, generator=generator)
        tokens.append(next_token)
        out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
    completions = torch.cat(tokens, dim=1)
    return completions.masked_fill(~completion_mask(completions), PAD)


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """True up to and including the first EOS (all True when the sample hit max_new_tokens)."""
    is_eos = (completions == EOS).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


@torch.no_grad()
def sequence_logprobs(model, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log p(y|x) summed over the completion's tokens (EOS included), one value per row, in float64."""
    ids = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=ids).logits[:, prompts.size(1) - 1 : -1].double()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    return (logps * completion_mask(completions)).sum(dim=1)


def sample_in_batches(model, prompts, config: StudyConfig, generator, batch: int = 512) -> torch.Tensor:
    return torch.cat([sample(model, prompts[i : i + batch], config.max_new_tokens, generator)
                      for i in range(0, len(prompts), batch)])


def rewards(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    values = [gold_reward(p, c) for p, c in zip(prompts.tolist(), completions.tolist())]
    return torch.tensor(values, dtype=torch.float64)


def diversity(prompts: torch.Tensor, completions: torch.Tensor) -> dict:
    """How varied the samples are: distinct completions per prompt, mean length, and the empirical unigram entropy."""
    per_prompt: dict[tuple, set] = {}
    for p, c in zip(prompts.tolist(), completions.tolist()):
        per_prompt.setdefault(tuple(p), set()).add(tuple(body(c)))
    counts = per_prompt.values()
    samples_per_prompt = len(prompts) / len(per_prompt)
    tokens = torch.tensor([t for c in completions.tolist() for t in body(c)] or [EOS])
    freq = torch.bincount(tokens).double()
    freq = freq[freq > 0] / freq.sum()
    return {"distinct_per_prompt": sum(len(s) for s in counts) / len(per_prompt) / samples_per_prompt,
            "mean_length": float(completion_mask(completions).sum(dim=1).double().mean()) - 1,
            "unigram_entropy": float(-(freq * freq.log()).sum())}


def evaluate_policy(policy, reference, prompts, base_rewards, config: StudyConfig, seed: int) -> dict:
    """Gold reward, win rate against the base LM's samples on the same prompts, and KL(pi || ref) from pi's samples."""
    generator = torch.Generator().manual_seed(seed)
    completions = sample_in_batches(policy, prompts, config, generator)
    gold = rewards(prompts, completions)
    log_ratio = sequence_logprobs(policy, prompts, completions) - sequence_logprobs(reference, prompts, completions)
    n = len(gold)
    wins = (gold > base_rewards).double() + 0.5 * (gold == base_rewards).double()
    return {"gold_reward": gold.mean().item(), "gold_reward_se": (gold.std() / math.sqrt(n)).item(),
            "win_rate": wins.mean().item(), "kl": log_ratio.mean().item(),
            "kl_se": (log_ratio.std() / math.sqrt(n)).item(), **diversity(prompts, completions)}


# --- Preference data ------------------------------------------------------------------------------------------------


def to_text(ids: list[int]) -> str:
    words = {EOS: "<|endoftext|>", PAD: "<|pad|>", SEP: ":"}
    return " ".join(words.get(t, f"w{t - FIRST_WORD}") for t in ids)


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
    stats = {"pairs": len(rows), "dropped_identical": ties,
             "label_agrees_with_gold": float(((r1 > r2) == first_wins)[r1 != r2].double().mean())}
    return rows, stats


# --- One GPO run --------------------------------------------------------------------------------------------------


def train_policy(loss: str, beta: float, calibrated: bool, data: dict, config: StudyConfig, work: Path):
    """The real GPOTrainer, full fine-tuning from the base LM. The reference log-probs are precomputed; the trainer's
    cache (keyed by data and weights) makes every run after the first reuse them."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from .. import GPOConfig, GPOTrainer

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
    """The trainer's own answer on whether `loss` can be calibrated (hinge, c_f = 0, cannot): None, or its error."""
    from .. import GPOConfig

    try:
        GPOConfig(output_dir="unused", gpo_loss=loss, beta=0.1, beta_calibration=config.calibration, use_cpu=True,
                  report_to=[])
    except ValueError as err:
        if "c_f" not in str(err):  # any other refusal is a bug in the study, not a finding
            raise
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


@torch.no_grad()
def token_entropy(model, prompts, completions) -> float:
    """Mean entropy (nats) of the next-token distribution over the sampled completions' positions."""
    ids = torch.cat([prompts, completions], dim=1)
    logps = torch.log_softmax(model(input_ids=ids).logits[:, prompts.size(1) - 1 : -1].double(), dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    mask = completion_mask(completions)
    return (entropy * mask).sum().item() / mask.sum().item()


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


# --- Tables and plots ---------------------------------------------------------------------------------------------


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
        values = {loss: _interpolate(branch, kl) for loss, branch in curves.items()}
        values = {loss: v for loss, v in values.items() if v is not None}
        if len(values) > 1:
            table[str(kl)] = {**values, "spread": max(values.values()) - min(values.values())}
    return table


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
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


# --- Command line -------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="gpo-trl study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study file (configs/studies/*.yaml)")
    parser.add_argument("--out", required=True, help="where results, tables and plots are written")
    parser.add_argument("--seed", type=int, help="overrides the file's seed")
    parser.add_argument("--replot", action="store_true",
                        help="redraw tables and plots from the results already in --out, without training")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(args.config)
    if args.seed is not None:
        config.seed = args.seed
    if args.replot:
        out = Path(args.out)
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        write_outputs(rows, json.loads((out / "summary.json").read_text()), config, out)
        return {"rows": rows}
    _quiet()
    result = run_study(config, Path(args.out))
    print(f"{len(result['rows'])} runs in {result['summary']['seconds']:.0f}s; results in {args.out}")
    return result


def _quiet():
    """Per-run library chatter (progress bars, dataset maps) would bury the study's own log lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
