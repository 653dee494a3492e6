"""GPOTrainer against TRL's DPOTrainer on the same tiny model, data, seed and arguments (float32, CPU).

Where GPO reduces to a TRL loss the runs must agree at every logged step:
  logistic  f(t) = log(1 + e^-t)  ==  TRL loss_type="sigmoid"  (DPO)
  hinge     f(t) = max(0, 1 - t)  ==  TRL loss_type="hinge"    (SLiC)
  squared   f(t) = (t - 1)^2 on per-token log-ratios at beta = 2 tau  ==  4 tau^2 * TRL loss_type="ipo" at tau
"""

import math

import pytest
import torch
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from conftest import cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer, get_loss

PAIRS = [("logistic", "sigmoid"), ("hinge", "hinge")]
SETUPS = {
    "full": dict(),
    "full+precompute+grad_accum": dict(precompute_ref_log_probs=True, gradient_accumulation_steps=2,
                                       per_device_train_batch_size=2),
    "lora": dict(),
    "lora+precompute+grad_accum": dict(precompute_ref_log_probs=True, gradient_accumulation_steps=2,
                                       per_device_train_batch_size=2),
}


def lora_config():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def run(trainer_cls, config_cls, model_path, dataset, tmp_path, peft=False, eval_dataset=None, **kwargs):
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **cpu_args(**{"max_steps": 5, **kwargs}))
    trainer = trainer_cls(model=str(model_path), args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          peft_config=lora_config() if peft else None)
    trainer.train()
    return trainer


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("gpo_loss, trl_loss", PAIRS)
def test_parity_with_trl_at_every_step(gpo_loss, trl_loss, arch, setup, tiny_models, zen_dataset, tmp_path):
    """Identical loss and identical TRL metrics at each of 5 optimizer steps (bit-identical here: same operations)."""
    kwargs = dict(SETUPS[setup], peft=setup.startswith("lora"))
    trl = run(DPOTrainer, DPOConfig, tiny_models[arch], zen_dataset, tmp_path, loss_type=trl_loss, **kwargs)
    gpo = run(GPOTrainer, GPOConfig, tiny_models[arch], zen_dataset, tmp_path, gpo_loss=gpo_loss, **kwargs)
    trl_logs, gpo_logs = logged_steps(trl), logged_steps(gpo)
    assert len(trl_logs) == len(gpo_logs) == 5
    for step, (expected, got) in enumerate(zip(trl_logs, gpo_logs), start=1):
        assert set(expected) <= set(got), f"GPO misses TRL metrics {set(expected) - set(got)}"
        for key, value in expected.items():
            assert abs(got[key] - value) <= 1e-5, f"step {step}: {key} GPO {got[key]} vs TRL {value}"
        assert got["loss"] == expected["loss"], f"step {step}: loss not bit-identical"
    # The run must actually have moved: otherwise parity would be trivial
    assert gpo_logs[-1]["rewards/margins"] != 0.0


def test_squared_with_length_normalisation_is_ipo_times_4_tau_squared(tiny_models, zen_dataset, tmp_path):
    """(2 tau rho_bar - 1)^2 = 4 tau^2 (rho_bar - 1/(2 tau))^2. With plain SGD and the GPO learning rate divided by
    4 tau^2 the two runs take the same steps, so the identity holds at every step, not only the first."""
    tau, lr = 0.25, 0.05
    common = dict(optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", peft=True)
    trl = run(DPOTrainer, DPOConfig, tiny_models["qwen2"], zen_dataset, tmp_path, loss_type="ipo", beta=tau,
              learning_rate=lr, **common)
    gpo = run(GPOTrainer, GPOConfig, tiny_models["qwen2"], zen_dataset, tmp_path, gpo_loss="squared",
              gpo_length_normalize=True, beta=2 * tau, learning_rate=lr / (4 * tau**2), **common)
    trl_losses = [e["loss"] for e in logged_steps(trl)]
    gpo_losses = [e["loss"] for e in logged_steps(gpo)]
    assert len(trl_losses) == 5 and trl_losses[0] != trl_losses[-1]
    for step, (t, g) in enumerate(zip(trl_losses, gpo_losses), start=1):
        assert g == pytest.approx(4 * tau**2 * t, rel=1e-5, abs=1e-7), f"step {step}"


@pytest.mark.parametrize("name", ["logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"])
def test_first_step_loss_is_f_of_zero(name, tiny_models, zen_dataset, tmp_path):
    """With a fresh LoRA adapter (B = 0) the policy equals the reference, so rho = 0 and the loss is f(0);
    the push |f'(beta rho)| is |f'(0)|."""
    trainer = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path, peft=True, gpo_loss=name,
                  max_steps=1)
    first = logged_steps(trainer)[0]
    loss = get_loss(name)
    assert first["loss"] == pytest.approx(loss(torch.zeros(1)).item(), abs=1e-7)
    assert first["gpo/margin"] == 0.0 and first["gpo/offline_reg"] == 0.0
    assert first["gpo/push"] == pytest.approx(abs(loss.d1_at_0))


def test_gpo_diagnostics_are_consistent_with_trl_rewards(tiny_models, zen_dataset, tmp_path):
    """rewards/margins = beta * E[rho]; 1/2 E[rho^2] >= 1/2 E[rho]^2; push = E|f'(beta rho)| = E[sigmoid(-beta rho)] in (0, 1) for logistic."""
    trainer = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path, peft=True, beta=0.5)
    for entry in logged_steps(trainer)[1:]:
        assert entry["rewards/margins"] == pytest.approx(0.5 * entry["gpo/margin"], rel=1e-5, abs=1e-7)
        assert entry["gpo/offline_reg"] >= 0.5 * entry["gpo/margin"] ** 2 - 1e-7
        assert 0.0 < entry["gpo/push"] < 1.0
        assert entry["gpo/beta_effective"] == 0.5


def test_beta_calibration_runs_at_the_effective_beta(tiny_models, zen_dataset, tmp_path):
    """exponential calibrated to logistic at beta = 0.2 runs at 0.2 * (1/4) / (1/2) = 0.1, and its rewards use it."""
    trainer = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path, peft=True, beta=0.2,
                  gpo_loss="exponential", beta_calibration="logistic", max_steps=2)
    assert trainer.beta == pytest.approx(0.1)
    last = logged_steps(trainer)[-1]
    assert last["gpo/beta_effective"] == pytest.approx(0.1)
    assert last["rewards/margins"] == pytest.approx(0.1 * last["gpo/margin"], rel=1e-5)


def test_lora_uses_the_disabled_adapter_as_reference_and_the_fused_head(tiny_models, zen_dataset, tmp_path):
    """No second model is loaded, and lm_head's forward (which would build (B, T, V) logits) never runs."""
    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=2))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                         peft_config=lora_config())
    assert trainer.ref_model is None
    calls = []
    lm_head = trainer.model.get_base_model().lm_head
    handle = lm_head.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    trainer.train()
    handle.remove()
    assert calls == [], f"full logits were materialised: {calls}"


def test_evaluation_logs_gpo_diagnostics(tiny_models, zen_dataset, tmp_path):
    trainer = run(GPOTrainer, GPOConfig, tiny_models["gpt2"], zen_dataset, tmp_path, peft=True,
                  eval_dataset=zen_dataset.select(range(8)), per_device_eval_batch_size=4, max_steps=1)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_gpo/margin", "eval_gpo/offline_reg", "eval_gpo/push"):
        assert key in metrics and math.isfinite(metrics[key]), key


def test_import_path_loss_trains(tiny_models, zen_dataset, tmp_path):
    """A user's function named by import path, with kwargs, trains end to end."""
    trainer = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path, peft=True, max_steps=2,
                  gpo_loss="custom_losses:smoothed_hinge", gpo_loss_kwargs={"margin": 2.0})
    first = logged_steps(trainer)[0]
    assert first["loss"] == pytest.approx(torch.nn.functional.softplus(torch.tensor(8.0)).item() / 4, rel=1e-6)


def test_gpo_trainer_refuses_a_plain_dpo_config(tiny_models, zen_dataset, tmp_path):
    with pytest.raises(TypeError, match="needs a GPOConfig"):
        GPOTrainer(model=str(tiny_models["llama"]), args=DPOConfig(output_dir=str(tmp_path), use_cpu=True),
                   train_dataset=zen_dataset)


def test_length_grouped_batching_reduces_padding(tiny_models, tmp_path):
    """`train_sampling_strategy: group_by_length` (transformers' LengthGroupedSampler) on the real, variable-length
    hh-rlhf sample: batches pad far less than random ones, and every pair is still used once per epoch."""
    from datasets import load_dataset

    from conftest import DATA
    from gpo_trl.data import check_dataset

    rows, _ = check_dataset(load_dataset("json", data_files=str(DATA / "hh_rlhf_harmless_base_head300.jsonl"),
                                         split="train"), "hh")
    padding, seen = {}, {}
    for strategy in ("random", "group_by_length"):
        args = GPOConfig(output_dir=str(tmp_path), train_sampling_strategy=strategy, **cpu_args(
            per_device_train_batch_size=8, max_length=512))
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=rows, peft_config=lora_config())
        batches = list(trainer.get_train_dataloader())
        padding[strategy] = sum(1 - b["attention_mask"].sum().item() / b["attention_mask"].numel()
                                for b in batches) / len(batches)
        seen[strategy] = (sum(b["input_ids"].shape[0] // 2 for b in batches), len(trainer.train_dataset))
    assert seen["random"][0] == seen["group_by_length"][0] == seen["random"][1]
    assert padding["group_by_length"] < 0.6 * padding["random"], padding
