"""TRL's reference precompute behind the on-disk cache of `gpo_trl.refcache`, with rank 0 deciding for all ranks.

Contract (`CachedReferencePrecompute`, a mixin of `GPOTrainer`):
- Reads: `args.ref_logps_cache_dir` (else `refcache.default_cache_dir()`), the dataset to precompute, TRL's
  `_precompute_model_hash` (set in `DPOTrainer.__init__` before it precomputes), and the batch layout's
  `_padded_collator` (see `gpo_trl.batch_layout`).
- Changes: overrides TRL's `_precompute_ref_logps` (called by `DPOTrainer.__init__` with `precompute_ref_log_probs`
  and again for an evaluation set). A cache hit appends the cached `ref_chosen_logps` / `ref_rejected_logps` columns
  instead of running the reference pass; a miss runs TRL's pass and rank 0 stores the result. Rank 0's view decides
  for every rank (a rank that computed alone would wait in a collective forever); a cache directory that some rank
  cannot see is warned about once and rank 0 broadcasts the values.
- Key and file format live in `gpo_trl.refcache`; this module only makes the cross-rank decisions.
- Relies on these internals: `DPOTrainer._precompute_ref_logps(dataset, name, batch_size)` and
  `_precompute_model_hash` (TRL 1.16), accelerate's `gather` / `broadcast_object_list`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets

from . import refcache
from .fourbit import keep_4bit_layers_differentiable


class CachedReferencePrecompute:
    """Mixin over TRL's `DPOTrainer`: `_precompute_ref_logps` reuses the reference pass across runs."""

    _warned_cache_not_shared = False

    @property
    def _ref_cache_dir(self) -> Path:
        return Path(self.args.ref_logps_cache_dir) if self.args.ref_logps_cache_dir else refcache.default_cache_dir()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute, behind a cache keyed by what the values depend on (see gpo_trl.refcache): a run that
        differs only in beta, the loss or the learning rate reuses the reference pass instead of redoing it."""
        keep_4bit_layers_differentiable(self.model, self.ref_model)  # TRL loaded them: this eval-mode pass comes first
        if not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # a later precompute (evaluate), with packing or aux rewards on
        if self._padded_collator not in (None, self.data_collator):
            return self._with_padded_collator(self._precompute_ref_logps, dataset, name, batch_size)
        path = self._ref_cache_dir / f"{self._shared_cache_key(dataset)}.arrow"
        cached = refcache.load(path, len(dataset))
        visible = self._ranks_with(cached is not None)
        if visible[0]:  # rank 0 decides for everyone: a rank that computed alone would wait in a collective forever
            if not all(visible):
                self._warn_cache_not_shared(path, visible)
                cached = Dataset(broadcast_object_list([cached.data.table if cached is not None else None])[0])
            self.accelerator.print(f"Reference log-probs for {name}: reused {path}")
            return concatenate_datasets([dataset.flatten_indices(), cached], axis=1)
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            refcache.store(dataset, path)
        self.accelerator.wait_for_everyone()
        visible = self._ranks_with(path.is_file())
        if not all(visible):
            self._warn_cache_not_shared(path, visible)
        return dataset

    def _shared_cache_key(self, dataset) -> str:
        """Rank 0's cache key, on every rank: the model hash is rank-dependent (ZeRO-3 shards the weights), as TRL
        notes where it broadcasts its own."""
        key = refcache.cache_key(dataset, self._precompute_model_hash, self.args) if self.accelerator.is_main_process \
            else None
        return broadcast_object_list([key])[0]

    def _ranks_with(self, flag: bool) -> list[bool]:
        """`flag` of every rank, in rank order."""
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return [bool(value) for value in flags.tolist()]

    def _warn_cache_not_shared(self, path, visible: list[bool]):
        if self._warned_cache_not_shared or not self.accelerator.is_main_process:
            return
        self._warned_cache_not_shared = True
        missing = ", ".join(f"rank {rank}" for rank, sees in enumerate(visible) if not sees)
        warnings.warn(f"The reference log-probs cache directory {path.parent} is not shared: {missing} cannot see "
                      f"{path.name}, which rank 0 wrote or read. Rank 0 sends the values to the others, so the run "
                      "is correct; set `ref_logps_cache_dir` to a directory every node sees to skip that.")
