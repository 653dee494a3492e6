"""Reliability: bad input is caught before the model loads, numerical faults stop (or skip) cleanly, and interrupted
runs resume to the same result."""

import json
import math
import os
import signal
import subprocess
import time
import warnings

import psutil
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import REPO, console_script, cpu_args, launch_two_ranks, logged_steps
from gpo_trl import GPOConfig, GPOTrainer, builtin_losses
from gpo_trl.data import DataError, check_dataset, check_row
from gpo_trl.guards import NonFiniteError, last_complete_checkpoint
from gpo_trl.recipe import ConfigError, parse_args

DEMO = str(REPO / "configs" / "demo.yaml")

# --- Bad rows: every row either passes the checks or is named in a DataError; nothing crashes, nothing vanishes --

text = st.one_of(st.text(max_size=40), st.just(""), st.just("   \n"), st.text(alphabet="éü中🙂\u200b", max_size=10),
                 st.just("a very long answer " * 200))
value = st.one_of(text, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans())
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]),
                                 "content": st.one_of(text, st.integers(), st.none())})
messages = st.one_of(st.lists(message, max_size=3), st.lists(st.one_of(message, st.text(), st.integers()), max_size=2))
row = st.one_of(
    st.fixed_dictionaries({"prompt": value, "chosen": value, "rejected": value}),
    st.fixed_dictionaries({"prompt": messages, "chosen": messages, "rejected": messages}),
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), value, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(row)
def test_check_row_never_crashes_and_names_a_column(candidate):
    problem = check_row(candidate)
    if problem is not None:
        column, reason = problem
        assert column in ("prompt", "chosen", "rejected") and reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}), min_size=1, max_size=12))
def test_check_dataset_keeps_or_reports_every_row(rows):
    """For string rows (what Arrow can hold in one column): kept + dropped == rows, drops name their rows, and with
    invalid_rows=error any dropped row becomes an error naming it."""
    dataset = Dataset.from_list(rows)
    try:
        kept, report = check_dataset(dataset, "fuzz")
    except DataError as err:
        assert "no valid rows" in str(err)
        return
    dropped = sorted(i for indices in report.dropped.values() for i in indices)
    assert len(kept) + len(dropped) == len(rows) == report.rows
    for index in dropped:
        assert check_row(dict(rows[index], prompt=rows[index]["prompt"])) is not None
    if dropped:
        with pytest.raises(DataError, match=rf"fuzz, row {dropped[0]}, column"):
            check_dataset(dataset, "fuzz", invalid_rows="error")


def test_a_dataset_with_no_valid_row_is_an_error():
    dataset = Dataset.from_list([{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match="no valid rows left.*chosen identical to rejected: 1"):
        check_dataset(dataset, "tiny")


# --- Config fuzzing: wrong types and out-of-range values fail in parsing, before anything loads -----------------


@pytest.mark.parametrize(
    "override, message",
    [(["--beta", "abc"], "invalid float value: 'abc'"),
     (["--beta", "-0.1"], "`beta` must be a number > 0"),
     (["--gpo_loss", "nope"], "Unknown GPO loss 'nope'"),
     (["--aux_coef", "0.5", "--aux_rewards", '[{"name": "length", "weight": -1}]', "--aux_temperature", "0"],
      "`aux_temperature` must be > 0"),
     (["--invalid_rows", "sometimes"], "invalid choice: 'sometimes'"),
     (["--on_nonfinite", "ignore"], "invalid choice: 'ignore'"),
     (["--lora_r", "eight"], "invalid int value: 'eight'"),
     (["--max_steps", "1.5"], "invalid int value: '1.5'")],
)
def test_bad_values_fail_at_parse_time(override, message, capsys):
    with pytest.raises((ConfigError, SystemExit)) as info:
        parse_args(["--config", DEMO, *override])
    text = str(info.value) + capsys.readouterr().err
    assert message in text


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["beta", "aux_temperature"]))
def test_fuzzed_numbers_are_accepted_only_when_valid(number, key):
    kwargs = {key: number}
    if key == "aux_temperature":
        kwargs.update(aux_coef=0.5, aux_rewards=[{"name": "length", "weight": -1.0}])
    valid = math.isfinite(number) and number > 0
    if valid:
        GPOConfig(output_dir="unused", use_cpu=True, **kwargs)
    else:
        with pytest.raises(ValueError, match=key):
            GPOConfig(output_dir="unused", use_cpu=True, **kwargs)


def test_max_length_shorter_than_every_prompt_fails_before_the_model_loads(tmp_path, tiny_models):
    from gpo_trl.recipe import main as recipe_main

    args = parse_args(["--config", DEMO, "--model_name_or_path", str(tmp_path / "m"), "--dataset_name",
                       str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"), "--max_length", "3"])
    with pytest.raises(DataError, match="no valid rows left.*prompt fills max_length: 256"):
        recipe_main(*args)
    assert not (tmp_path / "o").exists()


# --- Numerical faults --------------------------------------------------------------------------------------------


POISON = {"calls": 0}


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poisoned(t, gradient_only=False):
    """softplus(-t), except on batches of 4 margins after the first training step (2 calls: loss and the gpo/push
    derivative), where the value (or only the gradient) turns NaN: a stand-in for an overflow mid-run. The config's
    probe and derivative checks use other sizes, so the function passes validation like a real one would."""
    if t.numel() == 4:
        POISON["calls"] += 1
        if POISON["calls"] > 2:
            return torch.nn.functional.softplus(-_NaNGradient.apply(t)) if gradient_only else t * float("nan")
    return torch.nn.functional.softplus(-t)


def poisoned_loss(t):
    return _poisoned(t)


def poisoned_gradient(t):
    return _poisoned(t, gradient_only=True)


def lora():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def nan_trainer(tiny_models, dataset, tmp_path, loss="poisoned_loss", **kwargs):
    POISON["calls"] = 0
    args = GPOConfig(output_dir=str(tmp_path), gpo_loss=f"test_reliability:{loss}", **cpu_args(max_steps=4, **kwargs))
    return GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=dataset, peft_config=lora())


@pytest.mark.parametrize("loss, what", [("poisoned_loss", "loss"), ("poisoned_gradient", "gradients")])
def test_nonfinite_stops_naming_the_step_and_keeps_the_checkpoint(loss, what, tiny_models, zen_dataset, tmp_path):
    """The loss (or only its gradient) turns NaN at step 2: the run stops there, naming step 2, before any NaN
    reaches the weights; the checkpoint saved at step 1 is intact."""
    trainer = nan_trainer(tiny_models, zen_dataset, tmp_path, loss=loss, save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteError, match=rf"Non-finite {what} at training step 2.*checkpoints in .* are intact"):
        trainer.train()
    checkpoint = last_complete_checkpoint(str(tmp_path))
    assert checkpoint is not None
    weights = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_gradient_under_accumulation_is_caught_before_the_update(tiny_models, zen_dataset, tmp_path):
    """With 2 micro-batches per step the gradients are checked once, after the last one: a NaN that entered at the
    first micro-batch of step 2 is still in the sum, so the run stops naming step 2 with finite weights."""
    trainer = nan_trainer(tiny_models, zen_dataset, tmp_path, loss="poisoned_gradient", gradient_accumulation_steps=2)
    POISON["calls"] = -2  # 4 calls per step: the poison starts at the first micro-batch of step 2
    with pytest.raises(NonFiniteError, match="Non-finite gradients at training step 2"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("loss", ["poisoned_loss", "poisoned_gradient"])
def test_nonfinite_batches_can_be_skipped_and_counted(loss, tiny_models, zen_dataset, tmp_path):
    """With on_nonfinite: skip, steps 2-4 are dropped (zero update), counted cumulatively, and the weights stay as
    step 1 left them."""
    trainer = nan_trainer(tiny_models, zen_dataset, tmp_path, loss=loss, on_nonfinite="skip")
    trainer.train()
    logs = logged_steps(trainer)
    assert [e.get("gpo/skipped_batches", 0) for e in logs] == [0, 1, 2, 3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


EXACT = {"calls": 0, "poisoned": set(), "gradient_only": False}


def exactly_poisoned(t):
    """softplus(-t), except on the training micro-batches listed in EXACT["poisoned"] (0-based; a micro-batch makes
    two calls with 2 or 4 margins: the loss and the gpo/push derivative), where the value, or only its gradient,
    turns NaN. The config's probes use other sizes."""
    if t.numel() in (2, 4):
        micro_batch = EXACT["calls"] // 2
        EXACT["calls"] += 1
        if micro_batch in EXACT["poisoned"]:
            return torch.nn.functional.softplus(-_NaNGradient.apply(t)) if EXACT["gradient_only"] else t * float("nan")
    return torch.nn.functional.softplus(-t)


class Snapshots(TrainerCallback):
    """After every optimizer step, clones of what a skipped step must leave alone: the trainable weights, the
    optimizer's state (AdamW: exp_avg, exp_avg_sq, step) and the LR scheduler's state."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        moments = {(i, k): v.clone() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
        self.steps.append((weights, moments, dict(lr_scheduler.state_dict())))


def assert_identical(before: dict, after: dict):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("gradient_only, accumulation, poisoned", [
    (False, 1, {1}),  # the loss is NaN at step 2
    (False, 2, {3}),  # ... in the second micro-batch of step 2: the first micro-batch's gradient goes too
    (True, 1, {1}),  # the loss is finite, its gradient NaN, at step 2
    (True, 2, {3}),
], ids=["loss", "loss-accumulated", "gradient", "gradient-accumulated"])
def test_a_skipped_step_changes_nothing(gradient_only, accumulation, poisoned, tiny_models, zen_rows, tmp_path):
    """AdamW with weight decay 0.1 and a linear LR schedule, the same 4 pairs every step, step 2 poisoned, `skip`:
    after step 2 the weights, the optimizer's moments and step counts, and the LR schedule are bit-identical to
    after step 1 (a zero gradient would still move the weights by weight decay and the moments); step 3 updates
    again, and the loss keeps going down to the end with finite weights."""
    EXACT.update(calls=0, poisoned=poisoned, gradient_only=gradient_only)
    snapshots = Snapshots()
    args = GPOConfig(output_dir=str(tmp_path), gpo_loss="test_reliability:exactly_poisoned", on_nonfinite="skip",
                     **cpu_args(max_steps=6, optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="linear",
                                per_device_train_batch_size=4 // accumulation,
                                gradient_accumulation_steps=accumulation))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=Dataset.from_list(zen_rows[:4]),
                         peft_config=lora(), callbacks=[snapshots])
    trainer.train()
    (weights_1, moments_1, schedule_1), (weights_2, moments_2, schedule_2), (weights_3, _, schedule_3) = \
        snapshots.steps[:3]
    assert_identical(weights_1, weights_2)
    assert_identical(moments_1, moments_2)
    assert {moments_2[k].item() for k in moments_2 if k[1] == "step"} == {1.0}  # AdamW counted one step only
    assert schedule_2 == schedule_1
    assert schedule_3["last_epoch"] == schedule_1["last_epoch"] + 1
    assert not all(torch.equal(weights_2[n], weights_3[n]) for n in weights_2)  # step 3 is a real update
    logs = logged_steps(trainer)
    assert [e.get("gpo/skipped_batches") for e in logs] == [None, 1, None, None, None, None]  # logged when it grows
    assert trainer.state.global_step == 6  # the skipped step counts as a step
    after = [e["loss"] for e in logs[2:]]
    assert all(later < earlier for earlier, later in zip(after, after[1:])) and after[-1] < logs[0]["loss"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_all(tiny_models, tmp_path):
    """2 DDP processes over gloo, the loss NaN at step 2 on rank 1 only: both ranks skip that step (one decision),
    each keeps weights, AdamW state and LR schedule bit-identical across it, and both end with the same weights."""
    ranks, _ = launch_two_ranks("skip_ranks.py", tiny_models["llama"], tmp_path)
    assert [(r["weights_kept"], r["optimizer_kept"], r["schedule_kept"], r["step_3_updated"]) for r in ranks] == \
        [(True, True, True, True)] * 2
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_gradients_out_of_reach_turn_the_check_off_loudly(tiny_models, zen_dataset, tmp_path):
    """As under DeepSpeed ZeRO, each trainable parameter's gradient is moved elsewhere during backward (a hook takes
    it and leaves .grad None). The NaN gradients of steps 2-4 then reach no .grad and cannot be checked: the run
    says so once, loudly, instead of passing them as checked."""
    trainer = nan_trainer(tiny_models, zen_dataset, tmp_path, loss="poisoned_gradient")
    moved = []

    def move_away(parameter):
        moved.append(bool(torch.isfinite(parameter.grad).all()))
        parameter.grad = None

    for parameter in trainer.model.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(move_away)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    off = [str(w.message) for w in record if "gradient finiteness check is OFF" in str(w.message)]
    assert len(off) == 1 and "no trainable parameter holds a .grad" in off[0]
    assert moved and not all(moved)  # NaN gradients did arrive, unchecked


@pytest.mark.parametrize("name", builtin_losses())
def test_bfloat16_training_at_extreme_margins_stays_finite(name, tiny_models, zen_dataset, tmp_path):
    """bfloat16 autocast, beta = 1e4 so that beta * rho reaches thousands after one update: loss, gradients and
    weights stay finite for every built-in loss."""
    args = GPOConfig(output_dir=str(tmp_path), gpo_loss=name, **cpu_args(max_steps=3, bf16=True, beta=1e4,
                                                                        learning_rate=0.05))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset, peft_config=lora())
    trainer.train()
    logs = logged_steps(trainer)
    assert max(abs(e["gpo/margin"]) * 1e4 for e in logs) > 100  # the margins really were extreme
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in logs)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# --- Interrupted runs ----------------------------------------------------------------------------------------------

LONG_RUN = ["--max_steps", "40", "--save_strategy", "steps", "--save_steps", "10", "--logging_steps", "10",
            "--eval_before_training", "false", "--per_device_train_batch_size", "8", "--lr_scheduler_type", "linear"]


def start(tmp_path, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = [console_script("gpo-trl"), "train", "--config", DEMO, "--model_name_or_path", str(tmp_path / "m"),
            "--dataset_name", str(tmp_path / "d"), "--output_dir", str(tmp_path / out), *LONG_RUN, *extra]
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path, process, timeout=240):
    started = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() - started < timeout, f"{path} never appeared"
        time.sleep(0.2)


def finish(process, timeout=300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def adapter(tmp_path, out):
    return load_file(tmp_path / out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    finish(start(tmp_path, "straight"))
    return tmp_path, adapter(tmp_path, "straight")


def assert_same_adapter(a, b):
    """Bit-identical (measured): resuming restores weights, optimizer, scheduler, RNG and data order exactly."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: differs by up to {(a[name] - b[name]).abs().max().item():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_a_checkpoint_and_resume_matches(signum, uninterrupted, tmp_path):
    assets, expected = uninterrupted
    for name in ("m", "d"):
        os.symlink(assets / name, tmp_path / name)
    process = start(tmp_path, "run")
    wait_for(tmp_path / "run" / "checkpoint-10" / "trainer_state.json", process)
    # One local process: `gpo-trl train` trains in its own process (no accelerate child that could turn the signal
    # into exit 143 and be killed 5 s later, as accelerate 1.16's child runner does)
    assert psutil.Process(process.pid).children() == []
    os.killpg(process.pid, signum)  # like a scheduler: the whole process group
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err[-3000:]
    assert "Training was interrupted" in err and "--resume_from_checkpoint last" in err
    checkpoint = last_complete_checkpoint(str(tmp_path / "run"))
    assert checkpoint is not None and int(checkpoint.rsplit("-", 1)[1]) >= 10
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # no "final" adapter from a cut run
    finish(start(tmp_path, "run", "--resume_from_checkpoint", "last"))
    assert_same_adapter(adapter(tmp_path, "run"), expected)


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_adapter(uninterrupted, tmp_path):
    """SIGKILL leaves no chance to save: resume from the last complete checkpoint (a half-written newer one, as a
    crash during a save would leave, is ignored) and reach the uninterrupted run's final adapter weights."""
    assets, expected = uninterrupted
    for name in ("m", "d"):
        os.symlink(assets / name, tmp_path / name)
    process = start(tmp_path, "run")
    wait_for(tmp_path / "run" / "checkpoint-20" / "trainer_state.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    half = tmp_path / "run" / "checkpoint-30"
    half.mkdir(exist_ok=True)  # a checkpoint cut short: model files maybe, trainer_state.json never
    (half / "adapter_model.safetensors").write_bytes(b"truncated")
    (half / "trainer_state.json").unlink(missing_ok=True)
    assert last_complete_checkpoint(str(tmp_path / "run")).endswith("checkpoint-20")
    out = finish(start(tmp_path, "run", "--resume_from_checkpoint", "last"))
    assert "Resuming from" in out and "checkpoint-20" in out
    assert_same_adapter(adapter(tmp_path, "run"), expected)


def test_full_disk_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """A second run into the same output_dir hits ENOSPC while writing its adapter: the error surfaces, and the
    first run's adapter is still there, byte for byte (the new files were being written under a staging name)."""
    import errno

    import peft.peft_model

    from gpo_trl.recipe import main as recipe_main

    args = ["--config", DEMO, "--model_name_or_path", str(tmp_path / "m"), "--dataset_name", str(tmp_path / "d"),
            "--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--eval_before_training", "false"]
    recipe_main(*parse_args(args))
    before = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial write, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)  # where PEFT writes adapter_model.safetensors
    with pytest.raises(OSError, match="No space left"):
        recipe_main(*parse_args(args + ["--learning_rate", "0.1"]))
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == before


def test_an_explicit_incomplete_checkpoint_is_refused(tmp_path):
    from types import SimpleNamespace

    from gpo_trl.recipe import resume_point

    half = tmp_path / "checkpoint-30"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="checkpoint-30 is incomplete.*--resume_from_checkpoint last"):
        resume_point(SimpleNamespace(resume_from_checkpoint=str(half), output_dir=str(tmp_path)))
    assert resume_point(SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path))) is None
    assert resume_point(SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))) is None
