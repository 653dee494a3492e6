"""Sampling completions from a policy, and the log-probabilities of what was sampled.

Used by `gpo-trl iterate` (on-policy pairs) and `gpo-trl evaluate --generate`. Prompts come from any `datasets:`
source (only the prompt column is read). Generation is batched with left padding and the KV cache through
transformers' `generate`, or through vLLM when it is installed and asked for (`generation_backend: vllm`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass, field, fields

import torch
from transformers import GenerationConfig

from ..data import DataError, PreferenceSource, explicit_prompt, make_source
from ..recipe import ConfigError

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationSettings:
    """How completions are sampled: the `generation:` block of an iterate or evaluate file."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # prompts per `generate` call (each with samples_per_prompt completions)
    # Other logits processors, off unless named here (e.g. {repetition_penalty: 1.3}); a model's generation_config
    # never turns one on, since samples from another distribution bias the KL estimate and change what is trained
    processors: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"`generation.max_new_tokens` must be an integer >= 1, got {self.max_new_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"`generation.temperature` must be > 0 (sampling), got {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"`generation.top_p` must be in (0, 1], got {self.top_p!r}.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"`generation.batch_size` must be an integer >= 1, got {self.batch_size!r}.")
        if not isinstance(self.processors, dict):
            raise ConfigError(f"`generation.processors` must be a mapping of generate() settings, e.g. "
                              f"{{repetition_penalty: 1.3}}; got {self.processors!r}.")
        check_keys(self.processors, sorted(PROCESSOR_SETTINGS), "`generation.processors`")

    @property
    def distortions(self) -> list[str]:
        """The settings that make samples leave the model's own distribution (temperature != 1, a nucleus cut, any
        processor turned on); the KL estimate from samples is unbiased only when this is empty."""
        named = ["temperature"] if not math.isclose(self.temperature, 1.0) else []
        named += ["top_p"] if self.top_p != 1 else []
        return named + [k for k, v in self.processors.items() if v != PROCESSOR_SETTINGS[k]]

    @property
    def samples_the_model(self) -> bool:
        return not self.distortions

    def generate_kwargs(self) -> dict:
        """Every distribution-changing setting of `generate`, explicitly: neutral unless turned on here."""
        return {**PROCESSOR_SETTINGS, **self.processors, "do_sample": True, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "max_new_tokens": self.max_new_tokens}


# The generate() settings that change the sampled distribution, at their neutral values (transformers'
# GenerationConfig). `top_k: 0` is no cut (transformers' own default is 50).
PROCESSOR_SETTINGS = {
    "top_k": 0, "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": None, "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "guidance_scale": None,
}
# What a generation_config keeps: the special tokens and the cache (nothing that changes the distribution)
_KEPT_FROM_MODEL = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "cache_implementation")


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

    from ..data import _builder_for
    from ..inputs import check_data_files

    check_data_files(source.data_files, f"{source.label}: `prompts`")
    dataset = load_dataset(source.path or _builder_for(source.data_files), name=source.name, split=source.split,
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
    if not prompts:
        raise DataError(f"{source.label}: no prompts (0 rows).")
    return prompts


def training_prompt_ids(tokenizer, prompt) -> list[int]:
    """The prompt's ids as TRL's DPOTrainer tokenises a prompt for training (its own helper): special tokens such
    as BOS included, a conversation through the chat template with the generation prompt. Sampling continues
    exactly these ids, so the pair trains on the context the completion was sampled in."""
    from trl.data_utils import _tokenize

    extra = {"add_generation_prompt": True} if isinstance(prompt, list) else {}
    return list(_tokenize(tokenizer, prompt, **extra)["input_ids"])


# --- Sampling ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled: through the EOS token when the model stopped, without one when cut
    stopped: bool | None = None  # the model ended the completion itself (False: cut at max_new_tokens)


def stop_ids(model, tokenizer) -> set[int]:
    """The ids generate stops at: the generation_config's EOS id(s) (Llama 3 lists several) and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def shipped_processors(model) -> dict:
    """The distribution-changing settings the model's generation_config turns on (sampling switches them off);
    top_k is left out: transformers' default of 50 is what most configs carry without meaning it."""
    config = model.generation_config
    return {k: getattr(config, k) for k, neutral in PROCESSOR_SETTINGS.items()
            if getattr(config, k, None) not in (None, neutral) and k != "top_k"}


@contextlib.contextmanager
def own_distribution(model):
    """Sample from the model's own distribution: while inside, the model's generation_config keeps only its special
    tokens. transformers fills every setting generate is not given from it, so a shipped `repetition_penalty` (or
    any other processor) would otherwise apply. Yields the processors the model's config had turned on."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    switched_off = shipped_processors(model)
    target.generation_config = GenerationConfig(**{k: getattr(saved, k) for k in _KEPT_FROM_MODEL
                                                   if getattr(saved, k, None) is not None})
    try:
        yield switched_off
    finally:
        target.generation_config = saved


def sample_completions(model, tokenizer, prompts: list, n: int, settings: GenerationSettings, seed: int,
                       desc: str = "Sampling") -> list[Sample]:
    """n completions per prompt with transformers' generate (left padding, KV cache), in batches of prompts.

    Each prompt is tokenised as training tokenises it (`training_prompt_ids`), and only the settings in `settings`
    shape the distribution (`own_distribution`). Batch b is sampled under seed + b, so two models sampled with the
    same seed and batches share their random numbers (the comparison in `evaluate --generate` is paired).
    """
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    prompt_ids = [training_prompt_ids(tokenizer, p) for p in prompts]
    samples = []
    was_training = model.training
    model.eval()
    with own_distribution(model):
        for batch_number, start in enumerate(tqdm(range(0, len(prompts), settings.batch_size), desc=desc,
                                                  unit="batch")):
            batch = prompt_ids[start:start + settings.batch_size]
            input_ids, attention = left_padded(batch, pad_id)
            torch.manual_seed(seed + batch_number)
            with torch.no_grad():
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                        num_return_sequences=n, use_cache=True, pad_token_id=pad_id,
                                        **settings.generate_kwargs())
            for row, sequence in enumerate(output):
                i = row // n
                completion_ids, stopped = _until_stop(sequence[input_ids.shape[1]:].tolist(), stops)
                samples.append(Sample(start + i, row % n, tokenizer.decode(completion_ids, skip_special_tokens=True),
                                      batch[i], completion_ids, stopped))
    model.train(was_training)
    return samples


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the sequences aligned on the right: generate appends on the right."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        attention[row, width - len(sequence):] = 1
    return input_ids, attention


def _until_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """(the sampled tokens through the first stop token, whether there was one); generate pads finished rows after
    it. A row cut at max_new_tokens has no stop token and no padding."""
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position + 1], True
    return ids, False


def sample_with_vllm(model_path: str, tokenizer, prompts: list, n: int, settings: GenerationSettings,
                     seed: int) -> list[Sample]:
    """The same samples through vLLM (a merged, full model directory), from the same prompt ids. Explicit
    SamplingParams do not take the model's generation_config defaults. Not exercised by the CPU test suite."""
    from vllm import LLM, SamplingParams

    unsupported = sorted(set(settings.processors) - set(VLLM_PROCESSORS))
    if unsupported:
        raise ConfigError(f"`generation.processors` {unsupported} are not passed to vLLM; it takes "
                          f"{list(VLLM_PROCESSORS)}. Use `generation_backend: transformers`.")
    llm = LLM(model=model_path, seed=seed)
    chosen = {k: v for k, v in settings.processors.items() if v is not None}
    params = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, seed=seed, **{**VLLM_PROCESSORS, **chosen})
    prompt_ids = [training_prompt_ids(tokenizer, p) for p in prompts]
    samples = []
    for i, result in enumerate(llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)):
        for j, completion in enumerate(result.outputs):
            ids, stopped = list(completion.token_ids), completion.finish_reason == "stop"
            if stopped and (not ids or ids[-1] != tokenizer.eos_token_id):  # vLLM may leave the EOS id out
                ids.append(tokenizer.eos_token_id)
            samples.append(Sample(i, j, completion.text, prompt_ids[i], ids, stopped))
    del llm
    return samples


VLLM_PROCESSORS = {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0}  # vLLM's neutral values


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
