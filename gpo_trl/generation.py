"""Sampling completions from a policy, and the log-probabilities of what was sampled.

Used by `gpo-trl iterate` (on-policy pairs) and `gpo-trl evaluate --generate`. Prompts come from any `datasets:`
source (only the prompt column is read). Generation is batched with left padding and the KV cache through
transformers' `generate`, or through vLLM when it is installed and asked for (`generation_backend: vllm`).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields

import torch

from .data import DataError, PreferenceSource, explicit_prompt, make_source
from .recipe import ConfigError

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationSettings:
    """How completions are sampled: the `generation:` block of an iterate or evaluate file."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # prompts per `generate` call (each with samples_per_prompt completions)

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"`generation.max_new_tokens` must be an integer >= 1, got {self.max_new_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"`generation.temperature` must be > 0 (sampling), got {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"`generation.top_p` must be in (0, 1], got {self.top_p!r}.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"`generation.batch_size` must be an integer >= 1, got {self.batch_size!r}.")

    @property
    def samples_the_model(self) -> bool:
        """True when samples follow the model's own distribution (temperature 1, no nucleus cut), the condition for
        the KL estimate from samples to be unbiased."""
        return math.isclose(self.temperature, 1.0) and self.top_p == 1


def check_keys(mapping: dict, known: list[str], where: str):
    """Unknown keys are errors with a suggestion (as in recipes and `datasets:` entries)."""
    import difflib

    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {sorted(known)}."
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint}")


def make_generation(mapping: dict | None) -> GenerationSettings:
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"`generation` must be a mapping of {[f.name for f in fields(GenerationSettings)]}.")
    check_keys(mapping, [f.name for f in fields(GenerationSettings)], "`generation`")
    return GenerationSettings(**mapping)


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ConfigError(f"`generation_backend` must be one of {list(BACKENDS)}, got {backend!r}.")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("`generation_backend: vllm` was asked for, but vLLM is not installed. Install it with "
                          "`pip install vllm` (GPU only), or use `generation_backend: transformers`.")


# --- Prompts ----------------------------------------------------------------------------------------------------


def make_prompt_source(mapping) -> PreferenceSource:
    if not isinstance(mapping, dict):
        raise ConfigError("`prompts` must be a `datasets:` entry, e.g. {path: json, data_files: prompts.jsonl}.")
    try:
        return make_source(mapping)
    except DataError as err:
        raise ConfigError(f"`prompts`: {err}") from err


def load_prompts(source: PreferenceSource, max_prompts: int | None = None) -> list:
    """The distinct prompts of a source, in order (preference data repeats a prompt once per pair). A source without
    a prompt column but with chosen/rejected gets its prompts extracted as for training."""
    from datasets import load_dataset

    from .data import _builder_for
    from .reach import check_data_files

    path = source.path or _builder_for(source.data_files)
    check_data_files(source.data_files)  # a missing file: one line naming it, not datasets' traceback
    dataset = load_dataset(path, name=source.name, split=source.split,
                           revision=source.revision, data_dir=source.data_dir, data_files=source.data_files)
    if source.column_map:
        dataset = dataset.rename_columns(source.column_map)
    if "prompt" not in dataset.column_names:
        if not {"chosen", "rejected"} <= set(dataset.column_names):
            raise DataError(f"{source.label}: no 'prompt' column (columns: {dataset.column_names}). Map yours with "
                            "`column_map`, e.g. {question: prompt}.")
        dataset = dataset.map(explicit_prompt)
    prompts, seen = [], set()
    for index, prompt in enumerate(dataset["prompt"]):
        if not (isinstance(prompt, str) and prompt.strip()) and not isinstance(prompt, list):
            raise DataError(f"{source.label}, row {index}, column 'prompt': expected text or a message list, got "
                            f"{prompt!r:.40}.")
        key = repr(prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
        if max_prompts is not None and len(prompts) == max_prompts:
            break
    return prompts


def prompt_text(tokenizer, prompt) -> str:
    """The text the model continues: a string prompt as it is, a conversation through the chat template."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


# --- Sampling ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled, including the EOS token when the model stopped by itself


def sample_completions(model, tokenizer, prompts: list, n: int, settings: GenerationSettings, seed: int,
                       desc: str = "Sampling") -> list[Sample]:
    """n completions per prompt with transformers' generate (left padding, KV cache), in batches of prompts.

    Batch b is sampled under seed + b, so two models sampled with the same seed and batches share their random
    numbers (the comparison in `evaluate --generate` is paired, not only matched in distribution).
    """
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # generation appends on the right, so the prompts are aligned on the right
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    samples = []
    starts = range(0, len(prompts), settings.batch_size)
    was_training = model.training
    model.eval()
    for batch_number, start in enumerate(tqdm(starts, desc=desc, unit="batch")):
        batch = prompts[start:start + settings.batch_size]
        encoded = tokenizer([prompt_text(tokenizer, p) for p in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
        torch.manual_seed(seed + batch_number)
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=True, temperature=float(settings.temperature),
                                    top_p=float(settings.top_p), top_k=0, max_new_tokens=settings.max_new_tokens,
                                    num_return_sequences=n, use_cache=True, pad_token_id=pad_id)
        width = encoded["input_ids"].shape[1]
        for row, sequence in enumerate(output):
            i = row // n
            prompt_ids = encoded["input_ids"][i][encoded["attention_mask"][i].bool()].tolist()
            completion_ids = _until_eos(sequence[width:].tolist(), tokenizer.eos_token_id, pad_id)
            samples.append(Sample(start + i, row % n, tokenizer.decode(completion_ids, skip_special_tokens=True),
                                  prompt_ids, completion_ids))
    model.train(was_training)
    return samples


def _until_eos(ids: list[int], eos_id: int | None, pad_id: int) -> list[int]:
    """The sampled tokens up to and including the first EOS; generate pads finished rows after it."""
    if eos_id is not None and eos_id in ids:
        return ids[:ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def sample_with_vllm(model_path: str, tokenizer, prompts: list, n: int, settings: GenerationSettings,
                     seed: int) -> list[Sample]:
    """The same samples through vLLM (a merged, full model directory). Not exercised by the CPU test suite."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, seed=seed)
    texts = [prompt_text(tokenizer, p) for p in prompts]
    samples = []
    for i, result in enumerate(llm.generate(texts, params)):
        prompt_ids = list(result.prompt_token_ids)
        for j, completion in enumerate(result.outputs):
            samples.append(Sample(i, j, completion.text, prompt_ids, list(completion.token_ids)))
    del llm
    return samples


# --- Log-probabilities of sampled completions -------------------------------------------------------------------


def completion_logprobs(model, samples: list[Sample], batch_size: int = 16) -> list[float]:
    """log p(completion | prompt) under `model` (untempered), summed over the completion tokens, in batches."""
    device = next(model.parameters()).device
    totals = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        sequences = [s.prompt_ids + s.completion_ids for s in batch]
        width = max(len(s) for s in sequences)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):  # right padding: positions stay those of an unpadded forward
            input_ids[row, :len(sequence)] = torch.tensor(sequence)
            attention[row, :len(sequence)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
        for row, s in enumerate(batch):
            first = len(s.prompt_ids) - 1  # the logit at position t predicts token t + 1
            totals.append(logps[row, first:first + len(s.completion_ids)].sum().item())
    return totals
