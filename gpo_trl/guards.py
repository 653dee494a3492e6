"""Keeping long runs safe: non-finite losses and gradients, preemption signals, and which checkpoint to trust.

- Non-finite loss or gradients: by default the run stops before the optimizer applies them, with an error naming
  the step; the checkpoints on disk are untouched. With `on_nonfinite: skip` the accumulation window is dropped (no
  optimizer step, no LR-schedule step) and counted in `gpo/skipped_batches`. All processes agree on the decision, so DDP never desynchronises.
- fp16 loss scaling (a GradScaler): gradients that overflow at a loss scale above 1 are the scaler's business, under
  either policy: it skips the step and halves the scale (`gpo/loss_scale_overflows`, `gpo/loss_scale`). At a scale of
  1 the scaled gradients are the true ones, so non-finite gradients there follow `on_nonfinite`
  (see `loss_scale_explains`).
- SIGTERM / SIGINT (a preempted or cancelled job): the current step finishes, a checkpoint is saved, training stops,
  and the recipe exits with a message that says how to resume.
- Small result files (metrics, run records, sweep tables, demo data) are written with `write_text_atomic`
  (gpo_trl.atomic, which also replaces multi-file outputs as a whole).
- `resume_from_checkpoint: last` picks the newest *complete* checkpoint: one whose `trainer_state.json`, the last
  file transformers writes, exists. A checkpoint cut short by a crash is never resumed from.
"""

from __future__ import annotations

import os
import re
import signal

import torch
from transformers import TrainerCallback

from .atomic import write_text_atomic  # noqa: F401  (its old home; gpo_trl.atomic holds the write helpers)

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN or inf; raised before the optimizer step that would apply them."""


def all_finite(accelerator, values: list[torch.Tensor]) -> bool:
    """True when every tensor is finite on every process (one small gather, so all ranks take the same branch)."""
    local = torch.tensor([all(bool(torch.isfinite(v).all()) for v in values)], dtype=torch.float32,
                         device=accelerator.device)
    return bool(accelerator.gather(local).min() > 0)


MIN_LOSS_SCALE = 1.0


def loss_scale_explains(scaler) -> bool:
    """Whether fp16 loss scaling can account for non-finite gradients after a finite loss: only while the scale is
    above 1. Scaled gradients overflow where the true ones need not, and GradScaler answers by skipping the step and
    halving the scale; at a scale of 1 (or below) the scaled gradients are no larger than the true ones, so an inf or
    NaN there is in the gradients themselves (torch's `GradScaler.update` warns that a scale below 1 means something
    is wrong). A persistent fault thus costs at most log2(initial scale) + 1 skipped steps before `on_nonfinite`
    applies (17 at GradScaler's default 2**16)."""
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() > MIN_LOSS_SCALE


def nonfinite_message(what: str, step: int, output_dir: str) -> str:
    return (
        f"Non-finite {what} at training step {step}: stopped before the optimizer step, so no NaN/inf reached the "
        f"weights, and the checkpoints in {output_dir} are intact. Common causes: a learning rate or beta too large, "
        f"a custom loss that overflows, a corrupt row. Resume from the last checkpoint with a lower learning rate, or "
        f"set `on_nonfinite: skip` to drop such batches (they are counted in gpo/skipped_batches)."
    )


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGINT: finish the step, save a checkpoint, stop. The trainer reads `.signal` afterwards."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signal = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass

    def on_step_end(self, args, state, control, **kwargs):
        received = torch.tensor([float(self.signal is not None)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # one rank may get the signal first: all stop together
            received = self.accelerator.gather(received).max()
        if received.item() > 0:
            self.signal = self.signal or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class LossScaleCallback(TrainerCallback):
    """Under fp16 loss scaling, log the scale after each optimizer step (`gpo/loss_scale`) and how many steps the
    scaler has skipped for an overflow (`gpo/loss_scale_overflows`, cumulative). An overflow is read from the scaler
    itself: GradScaler lowers its scale only when it skips a step for non-finite gradients."""

    def __init__(self, accelerator, metrics: dict):
        self.accelerator = accelerator
        self.metrics = metrics  # the trainer's train metrics (TRL's `_metrics["train"]`), logged and cleared by it
        self.overflows = 0
        self._scale_before: float | None = None

    def _scale(self) -> float | None:
        scaler = self.accelerator.scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def on_step_begin(self, args, state, control, **kwargs):
        self._scale_before = self._scale()

    def _overflowed(self) -> bool:
        scale = self._scale()
        return scale is not None and self._scale_before is not None and scale < self._scale_before

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._overflowed() and optimizer is not None:
            # GradScaler skipped this step. A fused optimizer (transformers' default AdamW) is still called and skips
            # inside its kernel, which accelerate's `step_was_skipped` does not see: say it, so that the Trainer
            # leaves the LR schedule alone, as it does for an unfused optimizer
            optimizer._is_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        scale = self._scale()
        if scale is None or self._scale_before is None:
            return
        self.overflows += self._overflowed()
        self.metrics["gpo/loss_scale"] = [scale]
        self.metrics["gpo/loss_scale_overflows"] = [self.overflows]


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N directory in `output_dir` that holds trainer_state.json, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None
