"""Keeping long runs safe: non-finite losses and gradients, preemption signals, and which checkpoint to trust.

- Non-finite loss or gradients, and fp16 loss scaling: see `gpo_trl.nonfinite` (the guard the trainer mixes in;
  its names are re-exported here, their old home). By default the run stops before the optimizer applies them,
  with an error naming the step; with `on_nonfinite: skip` the accumulation window is dropped and counted in
  `gpo/skipped_batches`.
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
from .nonfinite import (  # noqa: F401  (their old home; gpo_trl.nonfinite holds the guard)
    NONFINITE_POLICIES, NonFiniteError, all_finite, nonfinite_message)


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
