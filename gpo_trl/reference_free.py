"""Reference-free training (`gpo_reference: none`): keep TRL from loading or keeping a reference it will not use.

Contract:
- `reference_free_load(model)`: a context manager around `DPOTrainer.__init__`. Reads the `model` argument (a path
  or a module). Changes, for the duration of the block only, TRL's `create_model_from_path` as `dpo_trainer` sees it:
  the policy load (when `model` is a path) goes through, the reference load is answered with None, which TRL treats
  as "no reference model". Restored on exit, also on error.
- `drop_reference_adapter(model)`: after `__init__`, deletes the frozen `ref` adapter TRL copies from a loaded PEFT
  adapter (a reference, never used reference-free).
- Relies on these internals: TRL 1.16 loads through `trl.trainer.dpo_trainer.create_model_from_path` twice at most,
  in this order: the policy (only when `model` is a path), then the reference; and names its adapter copy `ref`.
The reference log-probs themselves are taken as 0 by the trainer (`GPOTrainer._reference_logps`).
"""

from __future__ import annotations

import contextlib

from trl.trainer import dpo_trainer as trl_dpo_trainer


@contextlib.contextmanager
def reference_free_load(model):
    """Keep TRL's __init__ from loading a reference copy of the policy (it does so without PEFT or a precompute)."""
    load = trl_dpo_trainer.create_model_from_path
    policy_loads = [model] if isinstance(model, str) else []

    def load_policy_only(path, **kwargs):
        if policy_loads:
            policy_loads.pop()
            return load(path, **kwargs)
        return None

    trl_dpo_trainer.create_model_from_path = load_policy_only
    try:
        yield
    finally:
        trl_dpo_trainer.create_model_from_path = load


def drop_reference_adapter(model):
    """Delete TRL's frozen copy of a loaded adapter (`ref`): reference-free training never reads it."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
