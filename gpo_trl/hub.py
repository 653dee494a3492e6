"""The Hub side of a run: the GPO section of the model card, and pushing a finished run (again).

Pushing goes through `huggingface_hub.HfApi` (as `Trainer.push_to_hub` does). A failed push never touches the local
output: the error says what failed and the exact command that retries it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PushError

_KEY_HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                        "gradient_accumulation_steps", "max_length", "lr_scheduler_type", "warmup_steps", "seed",
                        "precompute_ref_log_probs", "gpo_length_normalize", "gpo_reference", "gpo_margin", "sft_coef",
                        "beta_calibration", "aux_coef",
                        "aux_rewards")


def model_card_section(trainer, datasets: list[str] | None) -> str:
    """Markdown appended to TRL's model card: the GPO loss, beta, hyperparameters, final metrics, how to load."""
    args, loss = trainer.args, trainer.gpo_loss
    base_model = _base_model(trainer)
    lines = ["", "## GPO training", "",
             f"- Base model: `{base_model}`",
             f"- Datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
             f"- GPO loss: `{loss.name}`, f(t) = `{loss.formula}` (f'(0) = {loss.d1_at_0:g}, f''(0) = {loss.d2_at_0:g}, "
             f"c_f = {loss.c_f:g})" + (f", kwargs `{json.dumps(loss.kwargs)}`" if loss.kwargs else ""),
             *([f"- TRL `loss_type` {args.loss_type}, `loss_weights` {args.loss_weights}: "
                f"{trainer.loss_plan.describe()}"] if args.loss_type != ["sigmoid"] or args.loss_weights else []),
             f"- beta = {args.beta:g}, effective beta = {trainer.beta:g}",
             "- Reference: " + ("none (reference-free: the margin uses the policy's log-probs alone; no reference "
                                "model was loaded and no reference pass ran)" if args.gpo_reference == "none" else
                                "the reference model (log-ratios against it)"),
             "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {key} | {getattr(getattr(args, key), 'value', getattr(args, key))} |" for key in _KEY_HYPERPARAMETERS]
    peft_config = _peft_config(trainer)
    if peft_config is not None:
        targets = peft_config.target_modules
        targets = sorted({t.split(".")[-1] for t in targets}) if isinstance(targets, (set, list)) else targets
        lines.append(f"| LoRA | r={peft_config.r}, alpha={peft_config.lora_alpha}, targets={targets} |")
    if getattr(trainer.model, "is_loaded_in_4bit", False) or getattr(trainer.model, "is_loaded_in_8bit", False):
        lines.append("| quantization | " + ("4-bit" if getattr(trainer.model, "is_loaded_in_4bit", False) else "8-bit") + " |")
    metrics = final_metrics(trainer.state.log_history)
    if metrics:
        lines += ["", "Final metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items()]
    if peft_config is not None:
        repo = trainer.args.hub_model_id or args.output_dir
        lines += ["", "Load the adapter with PEFT:", "", "```python",
                  "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```"]
    return "\n".join(lines) + "\n"


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last training loss and the last evaluation's loss, reward accuracy/margin and gpo/ diagnostics."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("train_loss", "loss") or key.startswith(("eval_loss", "eval_rewards/", "eval_gpo/")):
                metrics[key] = value
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _base_model(trainer) -> str:
    config = trainer.accelerator.unwrap_model(trainer.model).config
    return getattr(config, "_name_or_path", None) or "unknown"


def _peft_config(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return getattr(model, "peft_config", {}).get("default")


def push_output_dir(output_dir: str, hub_model_id: str, private: bool | None = None, token: str | None = None,
                    revision: str | None = None) -> str:
    """Upload a finished run's files (not its checkpoints) to `hub_model_id`; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(output_dir)
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise PushError(f"{output_dir} holds no adapter_config.json or config.json: is it a finished run's output_dir?")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(hub_model_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), revision=revision,
                          ignore_patterns=["_*", "checkpoint-*", "checkpoint-*/**", ".gpo-*"],
                          commit_message="Upload GPO-trained model with gpo_trl")
    except Exception as err:  # network, auth, offline mode, rate limits: all leave the local files alone
        raise push_failure(output_dir, hub_model_id, err) from err
    return repo.url if hasattr(repo, "url") else str(repo)


def push_failure(output_dir: str, hub_model_id: str, err: Exception) -> PushError:
    return PushError(
        f"Push to the Hub repo {hub_model_id!r} failed: {type(err).__name__}: {err}\n"
        f"Nothing local was changed: the run is intact in {output_dir}.\n"
        f"Fix the cause (network, `hf auth login`, repo permissions), then retry with:\n"
        f"  gpo-trl push --output_dir {output_dir} --hub_model_id {hub_model_id}"
    )
