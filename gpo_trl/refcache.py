"""Precomputed reference log-probs as an artifact on disk, reused by every run that shares them.

TRL caches them too, but under the prepared dataset's fingerprint, which hashes the whole training config (the
`max_length` filter closes over it): a run that changes only `beta` or the learning rate, such as every point of a
sweep, recomputes the full reference pass. The key here holds exactly what the values depend on:

- the tokenised pairs (a hash of the prompt/chosen/rejected token ids of the rows the dataset holds, not of the
  settings that produced them; see `token_digest`);
- the reference model's weights (TRL's `hash_module` of the reference, computed at init);
- how the collator truncates (`max_length`, `truncation_mode`) and the precision of the pass (`bf16`, `fp16`);
- LD-DPO's `ld_alpha`, which weights the tokens past the shorter completion of each pair;
- `FORMAT`, raised when the values a given key would hold change: 2 since 4-bit layers stay on their float32
  training kernel for the reference pass (gpo_trl.fourbit.keep_4bit_layers_differentiable); format-1 entries of a
  4-bit model on an AVX512-BF16 CPU were computed in bfloat16 and are not reused.

A cache file whose row count does not match is treated as stale and recomputed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from datasets import Dataset

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
FORMAT = 2
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def default_cache_dir() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "gpo_trl_ref_logps"


def cache_key(dataset: Dataset, model_hash, args) -> str:
    """sha256 over the token ids of the dataset's rows, the reference weights' hash, the truncation/precision
    settings and FORMAT."""
    settings = (FORMAT, token_digest(dataset), model_hash, args.max_length, args.truncation_mode, bool(args.bf16),
                bool(args.fp16), len(dataset))
    if getattr(args, "ld_alpha", None) is not None:  # LD-DPO weights the reference's tail tokens
        settings += (("ld_alpha", args.ld_alpha),)
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:32]


def token_digest(dataset: Dataset, batch_rows: int = 10_000) -> str:
    """sha256 of the token ids the dataset's rows hold, in their current order: per column, the row lengths and the
    ids, each read as a numpy view of exactly the rows in view. Not the Arrow buffers: a zero-copy slice
    (`select(range(...))`, `shard`, `train_test_split`) shares its parent's buffers, so hashing them gave every slice
    of a table the same key. One pass over the ids, with no copy for a table (int64 ids, as Arrow holds them); an
    index mapping (shuffle, select of a list) is resolved one batch of rows at a time, so memory stays bounded. How
    the rows are chunked does not matter: each column's lengths and ids go into their own running hashes."""
    digests = {(column, part): hashlib.sha256() for column in _TOKEN_COLUMNS for part in ("lengths", "ids")}
    for column in _TOKEN_COLUMNS:
        for chunk in _column_in_row_order(dataset, column, batch_rows):
            lengths = chunk.value_lengths().fill_null(-1)  # a missing list is not an empty one
            digests[column, "lengths"].update(_int64(lengths))
            digests[column, "ids"].update(_int64(chunk.flatten()))  # flatten() keeps to the slice
    return hashlib.sha256(b"".join(d.digest() for d in digests.values())).hexdigest()


def _column_in_row_order(dataset: Dataset, column: str, batch_rows: int):
    """The Arrow chunks of `column` over the dataset's rows, in order. `dataset.data` holds the rows in view (a slice
    of the parent table for a zero-copy select); an index mapping on top is taken a batch at a time (Arrow's take:
    `Dataset.iter` resolves it row by row, 20x slower)."""
    import pyarrow.compute as pc

    values = dataset.data.table.column(column)
    if dataset._indices is None:
        yield from values.chunks
        return
    indices = dataset._indices.column(0)
    for start in range(0, len(indices), batch_rows):
        yield from pc.take(values, indices.slice(start, batch_rows)).chunks


def _int64(array) -> np.ndarray:
    return np.ascontiguousarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)


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
