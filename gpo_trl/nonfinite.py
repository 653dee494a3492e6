"""The non-finite guard: no NaN/inf loss or gradient reaches the weights, and fp16 loss scaling keeps its own say.

Contract (`NonFiniteGuard`, a mixin of `GPOTrainer`):
- Reads: `args.on_nonfinite` (`stop` | `skip`), the loss of each micro-batch (checked in the trainer's
  `_compute_loss` through `all_finite`; the trainer hands a bad one to `_nonfinite`), and the gradients of every trainable
  parameter at the last micro-step of an accumulation window (`training_step`).
- Changes: with `stop`, raises `NonFiniteError` naming the step before the optimizer step (the checkpoints on disk are
  untouched). With `skip`, the window's gradients are zeroed and the coming optimizer step becomes a no-op that reports
  itself skipped (`_drop_window`); `gpo/skipped_batches` counts them. All ranks gather the checks, so they take the
  same branch and DDP never desynchronises.
- fp16 (a GradScaler): gradients that overflow at a loss scale above 1 are the scaler's business under either policy
  (`loss_scale_explains`); `LossScaleCallback` logs `gpo/loss_scale` and `gpo/loss_scale_overflows`.
- Relies on these internals: transformers' `Trainer.training_step` (the mixin wraps it), accelerate's
  `AcceleratedOptimizer` (`step`, the `_is_overflow` flag behind `step_was_skipped`, which makes the Trainer leave the
  LR scheduler alone), `accelerator.scaler` / `sync_gradients` / `distributed_type`, and TRL's `_metrics` store.
"""

from __future__ import annotations

import warnings

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from .errors import NonFiniteError

NONFINITE_POLICIES = ("stop", "skip")
MIN_LOSS_SCALE = 1.0


def all_finite(accelerator, values: list[torch.Tensor]) -> bool:
    """True when every tensor is finite on every process (one small gather, so all ranks take the same branch)."""
    local = torch.tensor([all(bool(torch.isfinite(v).all()) for v in values)], dtype=torch.float32,
                         device=accelerator.device)
    return bool(accelerator.gather(local).min() > 0)


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


class NonFiniteGuard:
    """Mixin over transformers' `Trainer`: `training_step` checks the window's gradients, `_nonfinite` applies
    `on_nonfinite`, `_drop_window` turns the optimizer step into a no-op. The trainer adds a `LossScaleCallback`."""

    # Per-run flags, set on the instance when they change
    _window_poisoned = False  # a micro-batch of this accumulation window had a non-finite loss (on_nonfinite: skip)
    _reported_skip = False  # the optimizer reports its last step as skipped (see _drop_window)
    _loss_was_nonfinite = False  # this micro-batch's loss was not finite (on_nonfinite: skip): report it as such
    _warned_gradient_check_off = False
    _skipped_batches = 0  # windows dropped so far, logged as gpo/skipped_batches

    def training_step(self, *args, **kwargs):
        """TRL's step; at the last micro-step of an accumulation window, check that no NaN/inf gradient is about to
        reach the optimizer, and drop the whole window when it, or any of its micro-batches' losses, was not finite.

        Under fp16 loss scaling the gradients checked are the scaled ones (the Trainer unscales them once, when it
        clips): an overflow the scale can explain is left to GradScaler, which skips the step and lowers the scale
        (see `loss_scale_explains`). A skipped micro-batch returns its loss as non-finite, so transformers'
        `logging_nan_inf_filter` treats it as it treats any NaN loss (by default: replaced in the logged mean)."""
        loss = super().training_step(*args, **kwargs)
        if self._loss_was_nonfinite:  # the zero loss it backpropagated is not its loss
            self._loss_was_nonfinite = False
            loss = torch.full_like(loss, float("nan"))
        if not self.accelerator.sync_gradients:  # mid-accumulation: a NaN stays in the sum until the last micro-step
            return loss
        if not self._window_poisoned and not self._gradients_finite():
            scaler = self.accelerator.scaler
            if not loss_scale_explains(scaler):
                scale = f" (at fp16 loss scale {scaler.get_scale():g}, so not a loss-scale overflow)" if scaler else ""
                self._nonfinite(f"gradients{scale}")
        if self._window_poisoned:
            self._window_poisoned = False
            self._drop_window()
        elif self._reported_skip:  # accelerate rewrites this flag only under AMP loss scaling: clear ours
            self.optimizer._is_overflow = self._reported_skip = False
        return loss

    def _gradients_finite(self) -> bool:
        """True when every gradient is finite on every process; each rank joins the gather, with or without grads.
        Where the gradients are out of reach the check is off: said once, loudly, and never counted as passed."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # the same on every rank: no gather
            self._warn_gradient_check_off(
                "DeepSpeed keeps the gradients in its own (partitioned) buffers and takes its optimizer step inside "
                "backward, before this check could run. With `on_nonfinite: skip` a skipped batch's zero loss still "
                "goes through that step (weight decay and the optimizer's moments move)")
            return True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # One max-norm per tensor (no tensor-sized temporaries): finite iff every element is (NaN propagates). Not the
        # 2-norm: its squares overflow for finite gradients scaled by an fp16 loss scale
        norms = torch._foreach_norm(grads, float("inf")) if grads else []
        finite = all_finite(self.accelerator, [torch.stack(norms)] if grads else [])
        if not grads and any(p.requires_grad for p in self.model.parameters()):
            self._warn_gradient_check_off("no trainable parameter holds a .grad after backward (the gradients are "
                                          "kept elsewhere, as DeepSpeed ZeRO keeps them)")
        return finite

    def _warn_gradient_check_off(self, reason: str):
        if self._warned_gradient_check_off or not self.accelerator.is_main_process:
            return
        self._warned_gradient_check_off = True
        warnings.warn(f"The gradient finiteness check is OFF for this run: {reason}. Only the loss is checked "
                      "(before backward); watch `grad_norm` in the logs.")

    def _nonfinite(self, what: str) -> torch.Tensor:
        """Stop with an error naming the step, or mark the accumulation window for dropping and return a zero loss
        that still reaches every trainable parameter (so DDP's gradient hooks fire on all ranks). All ranks come here
        together: the checks gather."""
        if self.args.on_nonfinite == "stop":
            raise NonFiniteError(nonfinite_message(what, self.state.global_step + 1, self.args.output_dir))
        self._window_poisoned = True
        self._loss_was_nonfinite = what == "loss"
        return sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)

    def _drop_window(self):
        """Make the coming optimizer step a no-op: the weights, the optimizer's state (AdamW's moments, step counts,
        weight decay) and the LR schedule stay exactly as they are. A zero gradient would not do: AdamW would still
        decay the weights and move its moments. The step reports itself skipped through accelerate's
        `step_was_skipped` (as an AMP overflow does), so transformers' Trainer leaves the LR scheduler alone;
        `global_step` still advances."""
        self._skipped_batches += 1
        self._metrics["train"]["gpo/skipped_batches"] = [self._skipped_batches]
        self.model.zero_grad(set_to_none=True)  # the window's earlier micro-batches go too; clipping sees no grads
        optimizer = self.optimizer  # accelerate's AcceleratedOptimizer
        scaler = self.accelerator.scaler

        def skipped_step(closure=None):
            del optimizer.step  # back to the class's step for the next window
            optimizer._is_overflow = True  # read by step_was_skipped
            if scaler is not None and scaler.is_enabled():
                # Clipping has unscaled this window (scaler.unscale_), which only update() closes; the scale stays:
                # a dropped window is not an overflow the scaler should answer by lowering it
                scaler.update(scaler.get_scale())

        optimizer.step = skipped_step
        self._reported_skip = True
