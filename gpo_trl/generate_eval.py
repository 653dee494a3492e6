"""Evaluation by generation: `gpo-trl evaluate --generate` and `gpo-trl evaluate --compare`.

    # generate.yaml
    model: runs/demo/assets/tiny-llama   # the base model = the reference (default: the adapter's base model)
    prompts: {path: json, data_files: held_out.jsonl}   # any `datasets:` source; only the prompts are used
    max_prompts: 64
    samples_per_prompt: 2
    generation: {max_new_tokens: 64, temperature: 1.0, top_p: 1.0, batch_size: 16}
    judge: {aux: length, weight: -1}     # as in `gpo-trl iterate` (gpo_trl.judges)
    bootstrap_samples: 1000
    seed: 0

On the prompts, the base model and the trained policy (a LoRA adapter directory, or a full model) are sampled with
the same seeds and batches, both are scored by the judge, and the report gives:

- judge score mean of each, with a percentile bootstrap 95% interval (over samples);
- win rate of the policy over the base: sample j of a prompt against the base's sample j, ties counted apart;
- mean completion length (tokens and words);
- KL(policy || reference) estimated from the policy's own samples: the mean over samples of
  sum_t [log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t)]. The estimate is unbiased when the samples follow the
  policy's distribution (temperature 1, top_p 1); with other settings it is reported with `kl_from_tempered: true`.

Every sample goes to `samples.jsonl`, the summary to `summary.json` (default folder: <adapter>/generate_eval).
`--compare DIR1 DIR2 ...` evaluates several policies (e.g. a sweep's points) and prints one table.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .auxiliary import as_text
from .data import PreferenceSource
from .generation import (GenerationSettings, check_keys, completion_logprobs, load_prompts, make_generation,
                         make_prompt_source, sample_completions)
from .guards import write_text_atomic
from .judges import Judge, make_judge, score_samples
from .recipe import ConfigError, read_yaml_file

_KEYS = ["model", "prompts", "max_prompts", "samples_per_prompt", "generation", "judge", "bootstrap_samples", "seed"]


@dataclass
class GenerateEval:
    prompts: PreferenceSource
    judge: Judge
    model: str | None = None
    max_prompts: int | None = None
    samples_per_prompt: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    bootstrap_samples: int = 1000
    seed: int = 0
    spec: dict = field(default_factory=dict, repr=False)  # the file's content, recorded in the summary


def load_settings(path: str) -> GenerateEval:
    path = Path(path)
    spec = read_yaml_file(path, "generation-evaluation file")
    if not isinstance(spec, dict) or not {"prompts", "judge"} <= set(spec):
        raise ConfigError(f"Generation-evaluation file {path} needs `prompts` and `judge` (see `gpo-trl evaluate "
                          "--generate --help`).")
    check_keys(spec, _KEYS, f"generation-evaluation file {path}")
    settings = GenerateEval(prompts=make_prompt_source(spec["prompts"]), judge=make_judge(spec["judge"]),
                            model=spec.get("model"), max_prompts=spec.get("max_prompts"),
                            samples_per_prompt=spec.get("samples_per_prompt", 1),
                            generation=make_generation(spec.get("generation")),
                            bootstrap_samples=spec.get("bootstrap_samples", 1000), seed=spec.get("seed", 0), spec=spec)
    for name, least in (("samples_per_prompt", 1), ("bootstrap_samples", 1), ("seed", 0)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"`{name}` must be an integer >= {least}, got {value!r}.")
    return settings


# --- One policy -------------------------------------------------------------------------------------------------


def load_models(policy_dir: str, base: str | None):
    """(policy, reference context, tokenizer, base path). An adapter is evaluated against its base with the adapter
    disabled (one model in memory); a full model against `base`, loaded separately."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_config = Path(policy_dir) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = base or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), policy_dir)
        model = model.to(device).eval()
        return model, model, model.disable_adapter, AutoTokenizer.from_pretrained(policy_dir), base
    if not (Path(policy_dir) / "config.json").is_file():
        raise ConfigError(f"{policy_dir} holds neither adapter_config.json nor config.json: is it a trained run's "
                          "output_dir?")
    if base is None:
        raise ConfigError(f"{policy_dir} is a full model: set `model:` (the base model, the reference) in the "
                          "generation-evaluation file.")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype="auto").to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(device).eval()
    return policy, reference, contextlib.nullcontext, AutoTokenizer.from_pretrained(policy_dir), base


def evaluate_generation(policy_dir: str, settings: GenerateEval, out: Path | None = None) -> dict:
    """Sample, score and compare one policy with its base; writes samples.jsonl and summary.json to `out`."""
    out = Path(out or Path(policy_dir) / "generate_eval")
    prompts = load_prompts(settings.prompts, settings.max_prompts)
    policy, reference, reference_mode, tokenizer, base = load_models(policy_dir, settings.model)
    n, seed = settings.samples_per_prompt, settings.seed
    with reference_mode():
        base_samples = sample_completions(reference, tokenizer, prompts, n, settings.generation, seed,
                                          desc="Sampling the base")
    policy_samples = sample_completions(policy, tokenizer, prompts, n, settings.generation, seed,
                                        desc="Sampling the policy")
    texts = [as_text(p) for p in prompts]
    device = next(policy.parameters()).device
    base_scores = score_samples(settings.judge, texts, base_samples, device=device)
    policy_scores = score_samples(settings.judge, texts, policy_samples, device=device)
    policy_logps = completion_logprobs(policy, policy_samples, settings.generation.batch_size)
    with reference_mode():
        reference_logps = completion_logprobs(reference, policy_samples, settings.generation.batch_size)
    log_ratios = [p - r for p, r in zip(policy_logps, reference_logps)]

    rows = [sample_row("base", s, prompts, score) for s, score in zip(base_samples, base_scores)]
    rows += [{**sample_row("policy", s, prompts, score), "logp_policy": lp, "logp_reference": lr}
             for s, score, lp, lr in zip(policy_samples, policy_scores, policy_logps, reference_logps)]
    summary = summarize(policy_dir, base, settings, base_samples, base_scores, policy_samples, policy_scores,
                        log_ratios)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def sample_row(model: str, sample, prompts, score: float) -> dict:
    return {"model": model, "prompt_index": sample.prompt_index, "sample_index": sample.sample_index,
            "prompt": prompts[sample.prompt_index], "completion": sample.completion, "score": score,
            "prompt_ids": sample.prompt_ids, "completion_ids": sample.completion_ids}


def summarize(policy_dir, base, settings: GenerateEval, base_samples, base_scores, policy_samples, policy_scores,
              log_ratios) -> dict:
    base_by_key = {(s.prompt_index, s.sample_index): score for s, score in zip(base_samples, base_scores)}
    opponents = [base_by_key[(s.prompt_index, s.sample_index)] for s in policy_samples]
    outcomes = [(score > other) - (score < other) for score, other in zip(policy_scores, opponents)]
    count = len(outcomes)
    boot = lambda values: bootstrap_ci(values, settings.bootstrap_samples, settings.seed)  # noqa: E731
    return {
        "policy": str(policy_dir), "base": str(base), "samples": count, "judge": settings.judge.describe(),
        "judge_mean": statistics.fmean(policy_scores), "judge_ci95": boot(policy_scores),
        "base_judge_mean": statistics.fmean(base_scores), "base_judge_ci95": boot(base_scores),
        "win_rate": outcomes.count(1) / count, "tie_rate": outcomes.count(0) / count,
        "loss_rate": outcomes.count(-1) / count,
        "mean_tokens": statistics.fmean(len(s.completion_ids) for s in policy_samples),
        "base_mean_tokens": statistics.fmean(len(s.completion_ids) for s in base_samples),
        "mean_words": statistics.fmean(len(s.completion.split()) for s in policy_samples),
        "base_mean_words": statistics.fmean(len(s.completion.split()) for s in base_samples),
        "kl": statistics.fmean(log_ratios), "kl_ci95": boot(log_ratios),
        "kl_from_tempered": not settings.generation.samples_the_model,
        "settings": {**settings.spec, "generation": asdict(settings.generation)},
    }


def bootstrap_ci(values: list[float], resamples: int, seed: int) -> list[float]:
    """Percentile bootstrap 95% interval of the mean (resampling the values with replacement)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def generation_metrics(settings_path, policy_dir) -> dict:
    """A sweep point's generation metrics as gen/* columns (`evaluate_generate:` in a sweep file)."""
    summary = evaluate_generation(str(policy_dir), load_settings(str(settings_path)))
    keys = ("judge_mean", "base_judge_mean", "win_rate", "tie_rate", "mean_tokens", "mean_words", "kl")
    return {**{f"gen/{key}": summary[key] for key in keys}, "gen/judge_ci95_low": summary["judge_ci95"][0],
            "gen/judge_ci95_high": summary["judge_ci95"][1]}


# --- The table and the command ----------------------------------------------------------------------------------

_COLUMNS = [("policy", "policy"), ("judge", "judge_mean"), ("95% CI", "judge_ci95"), ("base", "base_judge_mean"),
            ("win", "win_rate"), ("tie", "tie_rate"), ("tokens", "mean_tokens"), ("base tokens", "base_mean_tokens"),
            ("KL", "kl")]


def format_table(summaries: list[dict]) -> str:
    def cell(summary, key):
        value = summary[key]
        if isinstance(value, list):
            return f"[{value[0]:.3g}, {value[1]:.3g}]"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [[label for label, _ in _COLUMNS]] + [[cell(s, key) for _, key in _COLUMNS] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ["win/tie: share of samples where the policy's score is above/equal to the base's sample with the same "
             "seed; KL = mean over the policy's samples of sum_t log pi/ref."]
    if any(s["kl_from_tempered"] for s in summaries):
        notes.append("KL from tempered/top-p samples: not an unbiased estimate of KL(pi || ref).")
    return "\n".join(lines + notes)


def main(argv: list[str]) -> int:
    from .cli import generate_eval_parser  # the parser lives with the command line, which builds it without torch

    args = generate_eval_parser().parse_args(argv)
    if args.generate == args.compare:
        raise ConfigError("Use `--generate --adapter_path DIR` or `--compare DIR1 DIR2 ...`, not both.")
    settings = load_settings(args.config)
    if args.generate:
        if not args.adapter_path or args.policies:
            raise ConfigError("`--generate` evaluates one policy: give `--adapter_path DIR` (and no other paths).")
        summaries = [evaluate_generation(args.adapter_path, settings, args.out)]
        where = Path(args.out or Path(args.adapter_path) / "generate_eval")
    else:
        policies = args.policies + ([args.adapter_path] if args.adapter_path else [])
        if not policies:
            raise ConfigError("`--compare` needs the policies to compare: `--compare DIR1 DIR2 ...`.")
        summaries = [evaluate_generation(p, settings) for p in policies]
        where = Path(args.out or "generate_compare")
        where.mkdir(parents=True, exist_ok=True)
        write_text_atomic(where / "compare.json", json.dumps(summaries, indent=2))
    print(format_table(summaries))
    print(f"Samples and summaries written to {where if args.generate else ', '.join(s['policy'] for s in summaries)}"
          + ("" if args.generate else f"; table in {where / 'compare.json'}"))
    return 0
