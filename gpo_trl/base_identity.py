"""Which base model an adapter was trained on, recorded at training time and checked by `gpo-trl merge`.

The record (gpo_run.json's `base_model`) holds the base's name or path, the configuration values that fix the
weights' shapes, and a sample of 32 entries of its input embedding, taken before training changes anything. The
embedding is a good fingerprint: LoRA does not train it, 4-bit quantisation does not touch it, and two differently
initialised or differently pre-trained models disagree on it everywhere. The values are compared with a tolerance
that admits a change of dtype (bf16 in training, float32 at merge: relative rounding 2^-8).
"""

from __future__ import annotations

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner")
_ROWS, _COLUMNS = 8, 4
RELATIVE_TOLERANCE = 2e-2


def shape_config(config) -> dict:
    """The configuration values that fix the weights' shapes (those the config has)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: values[key] for key in SHAPE_KEYS if values.get(key) is not None}


def embedding_sample(model) -> list[float] | None:
    """32 entries of the input embedding (8 rows spread over the vocabulary x 4 columns), or None when the weight
    is not held whole by this process (ZeRO-3 / FSDP shards)."""
    import torch

    weight = model.get_input_embeddings().weight
    if weight.ndim != 2 or weight.numel() == 0 or type(weight.data) is not torch.Tensor or weight.is_meta:
        return None
    rows = torch.linspace(0, weight.shape[0] - 1, _ROWS).long()
    columns = torch.linspace(0, weight.shape[1] - 1, _COLUMNS).long()
    with torch.no_grad():
        return weight.detach()[rows][:, columns].float().flatten().cpu().tolist()


def base_identity(model, name_or_path: str) -> dict:
    return {"name_or_path": str(name_or_path), "config": shape_config(model.config),
            "embedding_sample": embedding_sample(model)}


def shape_differences(recorded: dict, config) -> list[str]:
    """`key: trained X, base Y` for each shape value that differs."""
    current = shape_config(config)
    return [f"{key}: trained {recorded[key]}, base {current.get(key)}" for key in recorded
            if current.get(key) != recorded[key]]


def same_weights(recorded: list[float] | None, model) -> bool | None:
    """Whether the base's embedding sample matches the recorded one (None: nothing to compare)."""
    current = embedding_sample(model)
    if recorded is None or current is None or len(recorded) != len(current):
        return None
    scale = max(abs(v) for v in recorded) or 1.0
    return all(abs(a - b) <= RELATIVE_TOLERANCE * (abs(a) + 0.05 * scale) for a, b in zip(recorded, current))
