"""One code path under test and its timed step: the unit every part races.

A `Contender` is `trl` (DPOTrainer's own `training_step` and `_compute_loss`, called on the instance: GPOConfig keeps
TRL's `loss_type: sigmoid`), `gpo` (GPOTrainer's, with a given loss), or `floor` (one forward+backward of the policy
alone on the padded batch: fused LM head, no reference pass, no loss), on a trainer, with a collator (the batch
layout), an attention kernel and GPOConfig fields of its own. Several contenders share ONE trainer instance, so the
model weights, the optimizer and the batches are the same and nothing but the code differs.

What a timed step covers is what the Trainer does per batch: collate the rows, then `training_step` (forward,
reference pass unless precomputed, loss, metrics, backward), between CUDA synchronisations; the optimizer step
follows, untimed. Recorded per step: wall and process CPU time, collate time, the real tokens as TRL counts them
(prompt + completion per sequence, so every layout is credited with the same work), the batch's cells and its
non-padding cells, and the model forwards (policy and reference, counted by a hook on the input embeddings).
Relies on trainer internals: `_prepare_inputs`, `_padded_collator`, `_attn_implementation`, `gpo_loss`,
`_compute_loss`, `create_optimizer`.
"""

from __future__ import annotations

import contextlib
import time
import types

import torch
from trl import DPOTrainer

from gpo_trl import GPOTrainer, get_loss
from gpo_trl.packing import is_packed, pair_units, sequence_units


def synchronize():
    """Wait for queued CUDA kernels, so a wall-clock interval covers the work it launched."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_attention(trainer, attention: str | None):
    """Switch the attention kernels of the trainer's models in place (same weights): transformers'
    `set_attn_implementation`, on the base model under PEFT, and on a separate reference model."""
    if attention is None or trainer._attn_implementation == attention:
        return
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(attention)
    trainer._attn_implementation = attention


class Contender:
    """One code path that takes a timed step on given rows: `trl` (DPOTrainer's training_step and _compute_loss),
    `gpo` (GPOTrainer's, with `loss`), or `floor`; on a trainer, with a collator (the batch layout)."""

    def __init__(self, name: str, trainer, kind: str = "gpo", loss: str | None = None, collator=None,
                 grouped: bool = False, attention: str | None = None, config: dict | None = None):
        self.name, self.trainer, self.kind, self.grouped, self.attention = name, trainer, kind, grouped, attention
        self.loss = get_loss(loss) if loss else None
        self.collator = collator or trainer.data_collator
        self.config = config or {}  # GPOConfig fields set on the shared trainer for this contender's steps only
        self.times, self.cpu_times, self.collate_times, self.tokens, self.cells, self.filled = [], [], [], [], [], []
        self.forwards = []  # model forwards (policy and reference) per recorded step
        if trainer.optimizer is None:
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step

    def step(self, indices: list[int], record: bool):
        trainer = self.trainer
        if self.loss is not None:
            trainer.gpo_loss = self.loss
        set_attention(trainer, self.attention)
        with config_fields(trainer.args, self.config), counted_forwards(trainer) as forwards:
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            batch = self.collator([trainer.train_dataset[i] for i in indices])
            collated = time.perf_counter()
            if self.kind == "floor":
                batch = trainer._prepare_inputs(batch)
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=labels, use_cache=False, fused_lm_head=True)
                out.log_probs.sum().backward()
            elif self.kind == "trl":
                with trl_code_path(trainer):
                    DPOTrainer.training_step(trainer, trainer.model, batch)
            else:
                trainer.training_step(trainer.model, batch)
            synchronize()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if self.kind != "floor":
            trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
        if record:
            self.times.append(elapsed)
            self.forwards.append(forwards[0])
            self.cpu_times.append(cpu)
            self.collate_times.append(collated - start)
            self.tokens.append(int(batch["sequence_lengths" if is_packed(batch) else "attention_mask"].sum()))
            self.cells.append(batch["input_ids"].numel())
            self.filled.append(self.tokens[-1] if not is_packed(batch) else self._filled_cells(indices))

    def _filled_cells(self, indices: list[int]) -> int:
        """Non-padding cells of a packed batch: the lengths of its units (a shared prompt counts once)."""
        padded = self.trainer._padded_collator([self.trainer.train_dataset[i] for i in indices])
        units = pair_units(padded) if self.collator.prefix_sharing else sequence_units(padded)
        return sum(len(unit) for unit in units)


@contextlib.contextmanager
def config_fields(config, fields: dict):
    """Set these config fields for the block (the contender's variant of the shared trainer), then restore them."""
    saved = {name: getattr(config, name) for name in fields}
    for name, value in fields.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@contextlib.contextmanager
def counted_forwards(trainer):
    """Count the transformer forwards in the block, policy and reference alike: every one embeds its input ids once,
    so a hook on the input embeddings of the policy and of a separate reference model sees each pass exactly once
    (under LoRA the disabled-adapter reference pass runs the policy's own embeddings)."""
    count = [0]
    embeddings = {id(m.get_input_embeddings()): m.get_input_embeddings()
                  for m in (trainer.model, trainer.ref_model) if m is not None}

    def hook(*_):
        count[0] += 1

    handles = [module.register_forward_hook(hook) for module in embeddings.values()]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def trl_code_path(trainer):
    """Run TRL's DPOTrainer._compute_loss on this trainer instance (GPOConfig keeps TRL's loss_type: sigmoid)."""
    if isinstance(trainer, GPOTrainer):
        trainer._compute_loss = types.MethodType(DPOTrainer._compute_loss, trainer)
    try:
        yield
    finally:
        trainer.__dict__.pop("_compute_loss", None)
