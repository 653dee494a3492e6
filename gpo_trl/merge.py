"""`gpo-trl merge`: a trained LoRA adapter merged into its base model, checked, saved (and pushed) as a plain model.

1. Inputs are checked before any model loads (the adapter directory, the dtype, OUT, the Hub id).
2. The base model is loaded in the chosen dtype, the adapter on top (PEFT). A QLoRA adapter is merged onto the base
   in that dtype, not onto its 4-bit weights (merging into 4-bit weights would round the update away).
3. Log-probs of a few fixed probe texts are taken with the adapter on the base; PEFT's `merge_and_unload` folds
   the adapter into the weights; the merged model's log-probs must equal the first ones within a tolerance
   (float32: 1e-5 per token), or nothing is written.
   Before that, the base is checked against the one the adapter was trained on (gpo_run.json's `base_model`: the
   shape-defining config values before any weight loads, then a sample of the input embedding):
   `--allow_different_base` merges anyway.
4. The merged model, tokenizer, a model card (the run's GPO settings and the merge) and gpo_merge.json are built in
   a sibling folder and swapped in as a whole (gpo_trl.atomic.replace_dir): a kill at any moment leaves the earlier
   merge or the new one, and the same command then runs again. OUT must be new, empty or an earlier merge's output
   holding only what gpo-trl wrote there; `--overwrite` replaces anything else.
5. With `--push_to_hub`, OUT is pushed like a trained run; a failed push leaves OUT intact and says how to retry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import check_output_dir, fault_point, read_marker, recover, replace_dir
from .errors import BaseMismatchError, ConfigError, MergeError
from .inputs import check_model_source

# Largest accepted |merged - adapter-on-base| per-token log-prob difference. float32: exact up to rounding
# (measured once: 9.5e-7 on the tiny demo model after 6 steps). Half precisions round the merged weights W + BA to
# 8 (bf16) or 11 (fp16) mantissa bits, so the merged model is a slightly different model: measured once 2.2e-3
# (bf16) and 3.9e-4 (fp16) on the tiny model; rounding grows with width and depth, so these bounds are loose. The
# measured value is printed and recorded in OUT/gpo_merge.json.
TOLERANCES = {"float32": 1e-5, "bfloat16": 0.1, "float16": 0.05}

# Probe texts for the check: any text works (the claim is that two computations of the same function agree), these
# cover plain prose, code, digits and punctuation.
PROBES = [
    "How do I keep a sourdough starter alive while I am away for two weeks?",
    "Here are the steps: 1. Feed it. 2. Refrigerate it. 3. Feed it again when you are back.",
    "def add(a, b):\n    return a + b  # 1 + 2 == 3",
    "The quick brown fox jumps over the lazy dog; then it rests, quietly, by the river.",
]


@dataclass
class MergeCheck:
    rows: int
    tokens: int
    max_abs_diff: float
    tolerance: float


def check_inputs(adapter_path: str, output_dir: str, dtype: str, push_to_hub: bool, hub_model_id: str | None,
                 tolerance: float | None = None, overwrite: bool = False, allow_different_base: bool = False) -> dict:
    """Everything that can be wrong before a model loads; returns the adapter's PEFT config."""
    adapter = Path(adapter_path)
    recover(adapter)  # a training run killed while swapping in its final save: its previous output comes back
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_path} holds no adapter_config.json: `--adapter_path` must be the output_dir of a "
                          "LoRA/QLoRA run (a full fine-tune is already a standalone model).")
    if dtype not in TOLERANCES:
        raise ConfigError(f"`--dtype {dtype}` is not supported; choose one of {sorted(TOLERANCES)}.")
    if tolerance is not None and not tolerance > 0:  # `not >` so that NaN is refused too
        raise ConfigError(f"`--tolerance` must be a number > 0, got {tolerance:g}.")
    if Path(output_dir).resolve() == adapter.resolve():
        raise ConfigError("`--output_dir` must differ from `--adapter_path`: the merged model is a separate model.")
    recover(Path(output_dir))
    # an earlier version's merge (its gpo_merge.json, no marker) is ours to replace, as the help says
    legacy = read_marker(Path(output_dir)) is None and (Path(output_dir) / "gpo_merge.json").is_file()
    check_output_dir(Path(output_dir), overwrite=overwrite or legacy, what="`--output_dir`")
    if push_to_hub and not hub_model_id:
        raise ConfigError("`--push_to_hub` needs `--hub_model_id ORG/NAME`.")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except ValueError as err:
        raise ConfigError(f"{adapter / 'adapter_config.json'} is not valid JSON ({err}).") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"Only LoRA adapters can be merged; {adapter_path} holds a {config.get('peft_type')} one.")
    base = config.get("base_model_name_or_path")
    check_model_source(base, f"The adapter's base model (base_model_name_or_path in {adapter / 'adapter_config.json'})")
    recorded = run_record(adapter_path).get("base_model")
    if recorded and not allow_different_base:
        from transformers import AutoConfig

        differences = shape_differences_of(recorded, AutoConfig.from_pretrained(base))
        if differences:
            raise BaseMismatchError(f"The base model {base} does not have the shape of the one {adapter_path} was "
                                    f"trained on ({'; '.join(differences)}): the adapter cannot be merged into it.")
    return config


def shape_differences_of(recorded: dict, config) -> list[str]:
    from .base_identity import shape_differences

    return shape_differences(recorded.get("config", {}), config)


def run_record(adapter_path: str) -> dict:
    """The training run's gpo_run.json (loss, beta, effective beta, datasets, quantization), or {} for another tool's
    adapter."""
    path = Path(adapter_path) / "gpo_run.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): rerun the training, or remove the file to merge "
                          "without the run's record.") from None


def merge_adapter(adapter_path: str, output_dir: str, dtype: str = "float32", tolerance: float | None = None,
                  push_to_hub: bool = False, hub_model_id: str | None = None, private: bool | None = None,
                  log=print, overwrite: bool = False, allow_different_base: bool = False) -> MergeCheck:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_config = check_inputs(adapter_path, output_dir, dtype, push_to_hub, hub_model_id, tolerance, overwrite,
                               allow_different_base)
    record = run_record(adapter_path)
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    base_name = peft_config["base_model_name_or_path"]
    if record.get("quantization"):
        log(f"Note: this adapter was trained on a {record['quantization']} quantised base. It is merged onto "
            f"{base_name} loaded in {dtype}, not onto the quantised weights, so the merged model is the adapter on "
            "the full-precision base (close to, not identical with, the quantised model used in training).")
    tokenizer = AutoTokenizer.from_pretrained(adapter_path if (Path(adapter_path) / "tokenizer_config.json").is_file()
                                              else base_name)
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=getattr(torch, dtype))
    check_same_base(base, record.get("base_model"), base_name, adapter_path, allow_different_base)
    try:
        model = PeftModel.from_pretrained(base, adapter_path)
    except RuntimeError as err:  # an adapter without our record, onto a base of another shape
        if "size mismatch" not in str(err):
            raise
        raise BaseMismatchError(f"The adapter {adapter_path} does not fit the base model {base_name} (another "
                                f"shape: {str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
                                ".") from None
    model.eval()
    batch = probe_batch(tokenizer)
    with torch.no_grad():
        expected = token_log_probs(model, batch)
        merged = model.merge_and_unload()
        got = token_log_probs(merged, batch)
    mask = batch["attention_mask"][:, 1:].bool()
    check = MergeCheck(rows=len(PROBES), tokens=int(mask.sum()),
                       max_abs_diff=float((got - expected).abs()[mask].max()), tolerance=tolerance)
    log(f"Check: merged vs adapter-on-base log-probs on {check.rows} probe texts ({check.tokens} tokens), "
        f"max |difference| = {check.max_abs_diff:.3g} (tolerance {tolerance:g}, {dtype}).")
    if not check.max_abs_diff <= tolerance:  # `not <=` so that NaN fails too
        raise MergeError(f"The merged model's log-probs differ from the adapter's by {check.max_abs_diff:.3g} "
                         f"(> {tolerance:g}): nothing was written to {output_dir}. A half-precision merge rounds the "
                         "weights; merge in float32 (`--dtype float32`) or raise `--tolerance` if that is expected.")
    card = model_card(adapter_path, base_name, dtype, check, record, hub_model_id)
    save_atomically(merged, tokenizer, card, check, dtype, adapter_path, Path(output_dir), overwrite)
    log(f"Merged model written to {output_dir}")
    if push_to_hub:
        from .hub import push_output_dir

        url = push_output_dir(output_dir, hub_model_id, private=private)
        log(f"Pushed {output_dir} to {url}")
    return check


def probe_batch(tokenizer):
    """The probe texts right-padded by hand (the saved tokenizer's padding settings stay as they were)."""
    import torch

    encoded = [tokenizer(text)["input_ids"] for text in PROBES]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_log_probs(model, batch):
    """log p(token_t | tokens_<t) for every position t >= 1, in float32."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


def check_same_base(base, recorded: dict | None, base_name: str, adapter_path: str, allow: bool):
    """The loaded base must be the model the adapter was trained on (its embedding sample, see base_identity)."""
    from .base_identity import same_weights

    if allow or not recorded or same_weights(recorded.get("embedding_sample"), base) is not False:
        return
    raise BaseMismatchError(f"The base model {base_name} is not the model {adapter_path} was trained on (trained on "
                            f"{recorded.get('name_or_path')}; their input embeddings differ): merging would give a "
                            "model nobody trained. Point the adapter at its base, or pass `--allow_different_base`.")


def save_atomically(model, tokenizer, card: str, check: MergeCheck, dtype: str, adapter_path: str, output_dir: Path,
                    overwrite: bool = False):
    """Build the whole output in a sibling folder, then swap it in (gpo_trl.atomic.replace_dir): an interrupted save
    leaves the previous output or the new one, never half a model."""
    with replace_dir(output_dir, "merge", overwrite=overwrite, what="`--output_dir`") as staging:
        model.save_pretrained(staging)
        fault_point("saved model")
        tokenizer.save_pretrained(staging)
        fault_point("saved tokenizer")
        (staging / "README.md").write_text(card)
        record = {"adapter_path": str(adapter_path), "dtype": dtype, "check": check.__dict__}
        (staging / "gpo_merge.json").write_text(json.dumps(record, indent=2))


def model_card(adapter_path: str, base_name: str, dtype: str, check: MergeCheck, record: dict,
               hub_model_id: str | None) -> str:
    from .losses import get_loss

    lines = ["---", f"base_model: {base_name}", "library_name: transformers", "tags: [gpo, trl, peft-merged]", "---",
             "", f"# {hub_model_id or Path(adapter_path).name} (merged)", "",
             f"`{base_name}` with the GPO-trained LoRA adapter `{adapter_path}` merged into its weights: a standalone "
             "model that loads without PEFT.", "", "## GPO training", ""]
    if record:
        try:
            loss = get_loss(record["gpo_loss"])
            formula = f", f(t) = `{loss.formula}` (c_f = {loss.c_f:g})"
        except Exception:  # a custom loss that is not importable here: its name is what was recorded
            formula = ""
        datasets = record.get("datasets")
        lines += [f"- Datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
                  f"- GPO loss: `{record['gpo_loss']}`{formula}",
                  f"- beta = {record['beta']:g}, effective beta = {record['effective_beta']:g}",
                  f"- Steps: {record.get('steps')}; quantisation in training: {record.get('quantization') or 'none'}"]
        metrics = {k: v for k, v in record.get("metrics", {}).items() if k.startswith(("eval_loss", "eval_rewards/"))}
        if metrics:
            lines += ["", "| final metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in metrics.items())]
    else:
        lines.append(f"- No gpo_run.json in `{adapter_path}`: the training settings were not recorded.")
    lines += ["", "## Merge", "",
              f"- PEFT `merge_and_unload` onto the base loaded in {dtype}"
              + (f" (the adapter was trained on a {record['quantization']} base; merged onto the {dtype} weights)"
                 if record.get("quantization") else ""),
              f"- Checked: per-token log-probs of the merged model vs the adapter on the base, {check.rows} probe "
              f"texts ({check.tokens} tokens): max |difference| {check.max_abs_diff:.3g}, "
              f"tolerance {check.tolerance:g}",
              "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{hub_model_id or "path/to/this/folder"}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{hub_model_id or "path/to/this/folder"}")', "```", ""]
    return "\n".join(lines)
