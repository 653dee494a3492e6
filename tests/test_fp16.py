"""fp16 mixed precision: a real `torch.amp.GradScaler` through accelerate's fp16 path, on the CPU.

accelerate builds the scaler (and turns on fp16 autocast) only off the CPU, so `wire_grad_scaler` hands it one the way
`Accelerator.__init__` does on a GPU: `accelerator.scaler` (backward scales the loss with it), `native_amp` (fp16
autocast, and `unscale_gradients`, which the Trainer's clipping calls), and through `prepare` in `train()` the
`AcceleratedOptimizer`, whose step runs `scaler.step` and `scaler.update`. Nothing is mocked: every scaling, overflow
check, skip and scale update below is GradScaler's own.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from conftest import cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.guards import NonFiniteError
from test_reliability import EXACT, Snapshots, assert_identical, lora


class _NativeAmpAfterPrepare(TrainerCallback):
    """fp32 compute with a GradScaler: unscaling on, but the model's forward prepared without fp16 autocast."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_train_begin(self, args, state, control, **kwargs):
        self.accelerator.native_amp = True


def wire_grad_scaler(trainer, init_scale: float, autocast: bool = True) -> torch.amp.GradScaler:
    """Give `trainer` (fp16=True, not yet trained) accelerate's fp16 path with a real CPU GradScaler. autocast=False
    keeps the compute in float32, where a huge scale need not overflow."""
    accelerator = trainer.accelerator
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # what accelerate does on the CPU
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.scaler = scaler
    if autocast:
        accelerator.native_amp = True  # before prepare: the forward gets fp16 autocast
    else:
        trainer.add_callback(_NativeAmpAfterPrepare(accelerator))
    return scaler


class InitialWeights(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fp16_trainer(tiny_models, zen_rows, tmp_path, loss="logistic", accumulation=1, callbacks=(), **kwargs):
    """AdamW (transformers' default: fused) with weight decay and a linear schedule, the same 4 pairs every step."""
    args = GPOConfig(output_dir=str(tmp_path), gpo_loss=loss, **cpu_args(
        **{"max_steps": 6, "fp16": True, "weight_decay": 0.1, "lr_scheduler_type": "linear",
           "per_device_train_batch_size": 4 // accumulation, "gradient_accumulation_steps": accumulation, **kwargs}))
    return GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=Dataset.from_list(zen_rows[:4]),
                      peft_config=lora(), callbacks=list(callbacks))


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_finite_gradients_at_a_huge_scale_train_exactly_as_at_scale_1(tiny_models, zen_rows, tmp_path):
    """Scale 2**100 in float32 compute: the scaled gradients are finite (the squares in their 2-norm would not be),
    so nothing is skipped or stopped, and as the scale is a power of two the run matches the same run at scale 1 (the
    true gradients) bit for bit."""
    plain = fp16_trainer(tiny_models, zen_rows, tmp_path / "plain")
    wire_grad_scaler(plain, 1.0, autocast=False)
    plain.train()
    scaled = fp16_trainer(tiny_models, zen_rows, tmp_path / "scaled")
    scaler = wire_grad_scaler(scaled, 2.0**100, autocast=False)
    scaled.train()
    assert scaled.optimizer.scaler is scaler  # wired into the optimizer's step at prepare
    logs = logged_steps(scaled)
    assert [e["loss"] for e in logs] == [e["loss"] for e in logged_steps(plain)]
    assert_identical(weights(plain), weights(scaled))
    assert [e["gpo/loss_scale"] for e in logs] == [2.0**100] * 6 and logs[-1]["gpo/loss_scale_overflows"] == 0
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("init_scale, autocast, accumulation, beta, optim", [
    (2.0**126, False, 1, 1.0, "adamw_torch"),  # float32 compute: gradients of a few units overflow at 2**126
    (2.0**24, True, 2, 0.1, "adamw_torch_fused"),  # fp16 autocast: its backward overflows at 65504; accumulation
], ids=["fp32-2^126", "fp16-autocast-2^24-accumulated"])
def test_an_overflow_is_skipped_and_the_scale_halved(policy, init_scale, autocast, accumulation, beta, optim,
                                                     tiny_models, zen_rows, tmp_path):
    """Under `stop` and `skip` alike: GradScaler skips the overflowing steps (weights, AdamW state and LR schedule
    bit-identical), halves the scale once per skipped step, and training then goes on with the loss falling. AdamW
    unfused (GradScaler does not call its step) and fused (transformers' default: called, it skips in its kernel)."""
    start, snapshots = InitialWeights(), Snapshots()
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path, on_nonfinite=policy, beta=beta, accumulation=accumulation,
                           callbacks=[start, snapshots], max_steps=8, optim=optim)
    scaler = wire_grad_scaler(trainer, init_scale, autocast=autocast)
    trainer.train()
    logs = logged_steps(trainer)
    after = [w for w, _, _ in snapshots.steps]
    moments = [m for _, m, _ in snapshots.steps]
    schedules = [s for _, _, s in snapshots.steps]
    # Which steps changed nothing, read from the weights alone
    skipped = [all(torch.equal(before[n], now[n]) for n in now) for before, now in zip([start.weights, *after], after)]
    overflows = skipped.index(False)
    assert overflows >= 2 and not any(skipped[overflows:])  # a real overflow, then every step updates
    for step in range(1, overflows):
        assert_identical(moments[step - 1], moments[step])
        assert schedules[step] == schedules[0]
    assert scaler.get_scale() == init_scale / 2**overflows
    assert [e["gpo/loss_scale"] for e in logs] == [init_scale / 2 ** min(i + 1, overflows) for i in range(8)]
    assert [e["gpo/loss_scale_overflows"] for e in logs] == [min(i + 1, overflows) for i in range(8)]
    assert [e["learning_rate"] for e in logs[: overflows + 1]] == [logs[0]["learning_rate"]] * (overflows + 1)
    assert "gpo/skipped_batches" not in logs[-1]  # not a dropped batch: GradScaler's skip
    losses = [e["loss"] for e in logs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[overflows] - 0.05
    assert trainer.state.global_step == 8


def recording_loss(t):
    """softplus(-t) (the sigmoid loss) with the exact poisoning of test_reliability.exactly_poisoned, recording each
    training micro-batch's loss as computed here, before anything the trainer does with it."""
    if t.numel() in (2, 4):
        micro_batch = EXACT["calls"] // 2
        first_call = EXACT["calls"] % 2 == 0  # the second is the gpo/push derivative
        EXACT["calls"] += 1
        if micro_batch in EXACT["poisoned"]:
            return t * float("nan")
        if first_call:
            EXACT["losses"].append(torch.nn.functional.softplus(-t.detach()).mean().item())
    return torch.nn.functional.softplus(-t)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_nan_loss_under_fp16_follows_on_nonfinite(accumulation, tiny_models, zen_rows, tmp_path):
    """A NaN loss is not an overflow (the loss comes before any scaling): `stop` stops naming the step; `skip` drops
    the window without touching the scale, and the steps after it train (no `unscale_() has already been called`)."""
    poisoned = {1} if accumulation == 1 else {3}  # step 2 (its second micro-batch under accumulation)
    EXACT.update(calls=0, poisoned=poisoned, losses=[])
    stopping = fp16_trainer(tiny_models, zen_rows, tmp_path / "stop", loss="test_fp16:recording_loss",
                            accumulation=accumulation)
    wire_grad_scaler(stopping, 2.0**16)
    with pytest.raises(NonFiniteError, match="Non-finite loss at training step 2"):
        stopping.train()

    EXACT.update(calls=0, poisoned=poisoned, losses=[])
    snapshots = Snapshots()
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path / "skip", loss="test_fp16:recording_loss",
                           accumulation=accumulation, on_nonfinite="skip", callbacks=[snapshots])
    scaler = wire_grad_scaler(trainer, 2.0**16)
    trainer.train()
    (weights_1, moments_1, schedule_1), (weights_2, moments_2, schedule_2) = snapshots.steps[:2]
    assert_identical(weights_1, weights_2)
    assert_identical(moments_1, moments_2)
    assert schedule_1 == schedule_2
    logs = logged_steps(trainer)
    assert [e.get("gpo/skipped_batches") for e in logs] == [None, 1, None, None, None, None]
    assert scaler.get_scale() == 2.0**16 and logs[-1]["gpo/loss_scale_overflows"] == 0
    after = [e["loss"] for e in logs[2:]]
    assert all(later < earlier for earlier, later in zip(after, after[1:])) and after[-1] < logs[0]["loss"]


def test_gradients_still_nonfinite_at_scale_1_follow_on_nonfinite(tiny_models, zen_rows, tmp_path):
    """A finite loss with NaN gradients from step 2 on: loss scaling takes them for overflows while it can (scale 4,
    then 2), but at scale 1 the scaled gradients are the true ones, so `stop` stops there (step 4) and `skip` drops
    the batches, keeping the scale at 1 instead of lowering it towards 0."""
    EXACT.update(calls=0, poisoned=set(range(1, 100)), gradient_only=True)
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path / "stop", loss="test_reliability:exactly_poisoned")
    wire_grad_scaler(trainer, 4.0)
    message = r"Non-finite gradients \(at fp16 loss scale 1, so not a loss-scale overflow\) at training step 4"
    with pytest.raises(NonFiniteError, match=message):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    EXACT.update(calls=0, poisoned=set(range(1, 100)), gradient_only=True)
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path / "skip", loss="test_reliability:exactly_poisoned",
                           on_nonfinite="skip")
    scaler = wire_grad_scaler(trainer, 4.0)
    trainer.train()
    logs = logged_steps(trainer)
    assert [e["gpo/loss_scale"] for e in logs] == [4.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert [e["gpo/loss_scale_overflows"] for e in logs] == [0, 1, 2, 2, 2, 2]
    assert [e.get("gpo/skipped_batches") for e in logs] == [None, None, None, 1, 2, 3]
    assert scaler.get_scale() == 1.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    EXACT["gradient_only"] = False


@pytest.mark.parametrize("accumulation, nan_inf_filter", [(1, False), (1, True), (2, True)])
def test_a_skipped_steps_logged_loss_is_what_transformers_logs_for_a_nan_loss(accumulation, nan_inf_filter,
                                                                              tiny_models, zen_rows, tmp_path):
    """The skipped micro-batch reports its loss as NaN, and transformers' `logging_nan_inf_filter` does the rest:
    off, the step logs nan; on (the default), the NaN counts as the mean of the logging window so far: 0 when the
    step opens the window (logging_steps 1, no accumulation), the finite first micro-batch's own loss when the NaN
    is in the second. The fp32 run (no scaler) is the plain case; the loss is never the half-sum 0.35 seen before."""
    poisoned = {1} if accumulation == 1 else {3}
    EXACT.update(calls=0, poisoned=poisoned, losses=[])
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path, loss="test_fp16:recording_loss", fp16=False,
                           accumulation=accumulation, on_nonfinite="skip", logging_nan_inf_filter=nan_inf_filter,
                           max_steps=3)
    trainer.train()
    logs = logged_steps(trainer)
    assert logs[1]["gpo/skipped_batches"] == 1
    if not nan_inf_filter:  # and transformers' running sum stays nan (`tr_loss -= tr_loss`), as for any NaN loss
        assert [math.isnan(e["loss"]) for e in logs] == [False, True, True]
        return
    elif accumulation == 1:
        assert logs[1]["loss"] == 0.0
    else:
        assert logs[1]["loss"] == pytest.approx(EXACT["losses"][2], rel=1e-6)  # step 2's first micro-batch
    # The other steps log their loss as computed: micro-batch losses, in order, the poisoned one not recorded
    per_step = [EXACT["losses"][0:1], EXACT["losses"][1:2]] if accumulation == 1 else \
        [EXACT["losses"][0:2], EXACT["losses"][3:5]]
    for log, losses in zip((logs[0], logs[2]), per_step):
        assert log["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, where accelerate builds the GradScaler")
def test_fp16_on_a_gpu_with_accelerates_own_scaler(tiny_models, zen_rows, tmp_path):
    """Not run here (no GPU): accelerate's own fp16 path on CUDA. Its scaler, started at 2**24 (GradScaler's default
    2**16 need not overflow on a tiny model), overflows the float16 backward: the first steps are skipped with the
    scale halved, then training goes on, under the default `stop`."""
    trainer = fp16_trainer(tiny_models, zen_rows, tmp_path, use_cpu=False, max_steps=10)
    assert trainer.accelerator.native_amp and trainer.accelerator.scaler is not None  # built by accelerate
    trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)
    trainer.train()
    assert trainer.optimizer.scaler is trainer.accelerator.scaler
    logs = logged_steps(trainer)
    overflows = int(logs[-1]["gpo/loss_scale_overflows"])
    assert 1 <= overflows < 10 and trainer.accelerator.scaler.get_scale() == 2.0**24 / 2**overflows
    assert logs[-1]["loss"] < logs[overflows]["loss"]
