"""Precomputed reference log-probs as an artifact on disk, reused by every run that shares them.

TRL caches them too, but under the prepared dataset's fingerprint, which hashes the whole training config (the
`max_length` filter closes over it): a run that changes only `beta` or the learning rate, such as every point of a
sweep, recomputes the full reference pass. The key here holds exactly what the values depend on:

- the tokenised pairs (a hash of the prompt/chosen/rejected token ids, not of the settings that produced them);
- the reference model's weights (TRL's `hash_module` of the reference, computed at init);
- how the collator truncates (`max_length`, `truncation_mode`) and the precision of the pass (`bf16`, `fp16`);
- `FORMAT`, raised when the values a given key would hold change: 2 since 4-bit layers stay on their float32
  training kernel for the reference pass (gpo_trl.fourbit.keep_4bit_layers_differentiable); format-1 entries of a
  4-bit model on an AVX512-BF16 CPU were computed in bfloat16 and are not reused.

A cache file whose row count does not match is treated as stale and recomputed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from datasets import Dataset

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
FORMAT = 2
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def default_cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "gpo_trl_ref_logps"


def cache_key(dataset: Dataset, model_hash, args) -> str:
    """sha256 over the token-id buffers, the reference weights' hash, the truncation/precision settings and FORMAT."""
    digest = hashlib.sha256()
    table = dataset.data.table
    if dataset._indices is not None:  # a selected/shuffled view: hash the rows in their current order
        table = dataset.with_format("arrow")[:]
    for column in _TOKEN_COLUMNS:
        for chunk in table.column(column).chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    settings = (FORMAT, model_hash, args.max_length, args.truncation_mode, bool(args.bf16), bool(args.fp16),
                len(dataset))
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:32]


def load(path: Path, rows: int) -> Dataset | None:
    """The cached columns, or None when absent or stale (wrong row count, unreadable)."""
    if not path.is_file():
        return None
    try:
        cached = Dataset.from_file(str(path))
    except Exception:  # a truncated or foreign file: recompute rather than trust it
        return None
    if len(cached) != rows or set(cached.column_names) != set(COLUMNS):
        return None
    return cached


def store(dataset: Dataset, path: Path):
    """Write the reference columns to `path` atomically (temporary name, then rename): Arrow stream format, as the
    datasets library writes its own cache files."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table = dataset.select_columns(list(COLUMNS)).flatten_indices().data.table
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
