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
    """The loss and every TRL metric bit-identical (==) at each of 5 optimizer steps: the same operations in the
    same order on float32."""
    kwargs = dict(SETUPS[setup], peft=setup.startswith("lora"))
    trl = run(DPOTrainer, DPOConfig, tiny_models[arch], zen_dataset, tmp_path, loss_type=trl_loss, **kwargs)
    gpo = run(GPOTrainer, GPOConfig, tiny_models[arch], zen_dataset, tmp_path, gpo_loss=gpo_loss,
              ref_logps_cache_dir=str(tmp_path / "ref_logps"), **kwargs)
    trl_logs, gpo_logs = logged_steps(trl), logged_steps(gpo)
    assert len(trl_logs) == len(gpo_logs) == 5
    for step, (expected, got) in enumerate(zip(trl_logs, gpo_logs), start=1):
        assert set(expected) <= set(got), f"GPO misses TRL metrics {set(expected) - set(got)}"
        for key, value in expected.items():
            assert got[key] == value, f"step {step}: {key} GPO {got[key]!r} vs TRL {value!r} (not bit-identical)"
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
    zero = torch.zeros(1, dtype=torch.float64)  # f and f' written out by hand below, not gpo_trl's
    assert first["loss"] == pytest.approx(FORMULAS[name](zero).item(), abs=1e-7)
    assert first["gpo/margin"] == 0.0 and first["gpo/offline_reg"] == 0.0
    assert first["gpo/push"] == pytest.approx(DERIVATIVES[name](zero).abs().item(), rel=1e-6)


# f'(t) of every built-in, written out by hand (not gpo_trl's autograd): the independent side of the push check
DERIVATIVES = {
    "logistic": lambda t: -torch.sigmoid(-t),
    "hinge": lambda t: -(t < 1).double(),
    "squared": lambda t: 2 * (t - 1),
    "exponential": lambda t: -torch.exp(-t),  # the margins here are far inside t >= -20, where it is exactly e^-t
    "truncated_quadratic": lambda t: -2 * torch.clamp(1 - t, min=0),
    "savage": lambda t: -2 * torch.exp(t) / (1 + torch.exp(t)) ** 3,
}
FORMULAS = {
    "logistic": lambda t: torch.log1p(torch.exp(-t)),
    "hinge": lambda t: torch.clamp(1 - t, min=0),
    "squared": lambda t: (t - 1) ** 2,
    "exponential": lambda t: torch.exp(-t),
    "truncated_quadratic": lambda t: torch.clamp(1 - t, min=0) ** 2,
    "savage": lambda t: 1 / (1 + torch.exp(t)) ** 2,
}


def sequence_log_prob(model, prompt_ids, completion_ids, max_length) -> float:
    """log p(completion | prompt) from a plain forward of one unpadded sequence: logits -> log_softmax -> gather,
    summed over the completion tokens that survive keep_start truncation. No collator, no fused head, no batch."""
    ids = (prompt_ids + completion_ids)[:max_length]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    token_log_probs = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return token_log_probs[len(prompt_ids) - 1:].sum().item()


@torch.no_grad()
def independent_margins(peft_model, rows, max_length) -> torch.Tensor:
    """rho per pair in float64: policy minus reference (the disabled LoRA adapter) log-ratios, chosen minus rejected."""
    peft_model.eval()

    def log_probs(key):
        return torch.tensor([sequence_log_prob(peft_model, r["prompt_ids"], r[key], max_length) for r in rows],
                            dtype=torch.float64)

    policy = log_probs("chosen_ids") - log_probs("rejected_ids")
    with peft_model.disable_adapter():
        reference = log_probs("chosen_ids") - log_probs("rejected_ids")
    return policy - reference


@pytest.fixture(scope="module")
def trained_lora(tiny_models, zen_dataset, tmp_path_factory):
    """5 LoRA steps on llama (no dropout anywhere) at beta 0.5, so the policy is off the reference by margins of a
    few nats; trained once for the tests below, which swap the loss and beta with monkeypatch."""
    return run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path_factory.mktemp("trained"),
               peft=True, beta=0.5)


def batch_metrics(trainer, rows) -> dict:
    """The trainer's own loss and metrics on one known batch (eval mode: no dropout, the `eval` metric dict)."""
    trainer.model.eval()
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))
    return {"loss": loss.item(), **{key: values[-1] for key, values in trainer._metrics["eval"].items()}}


# Measured: the batched float32 fused-head path and the unbatched float64 recomputation agree to 1.4e-6 relative on
# E[rho] and 1/2 E[rho^2] (rho 0.3-6 here), and to 9.7e-6 on the truncated quadratic's loss (pairs near its kink
# at t = 1); 3e-5 is three times the worst case.
DIAGNOSTIC_RTOL = 3e-5


@pytest.mark.parametrize("name", list(FORMULAS))
def test_gpo_diagnostics_equal_an_independent_recomputation(name, trained_lora, monkeypatch):
    """On a known batch, recompute rho from a plain forward of the model (policy and disabled adapter), then the
    loss mean f(beta rho), gpo/margin = E[rho], gpo/offline_reg = 1/2 E[rho^2], gpo/push = E|f'(beta rho)| and
    TRL's rewards/margins = beta E[rho] with hand-written f and f', and compare with what the trainer logs."""
    trainer, beta = trained_lora, 0.5
    monkeypatch.setattr(trainer, "gpo_loss", get_loss(name))
    rows = [trainer.train_dataset[i] for i in range(8)]
    logged = batch_metrics(trainer, rows)
    rho = independent_margins(trainer.model, rows, trainer.args.max_length)
    assert rho.abs().min() > 0.1, "the adapter must have moved every pair off the reference"
    t = beta * rho
    expected = {"loss": FORMULAS[name](t).mean(), "gpo/margin": rho.mean(), "gpo/offline_reg": 0.5 * (rho**2).mean(),
                "gpo/push": DERIVATIVES[name](t).abs().mean(), "rewards/margins": beta * rho.mean(),
                "rewards/accuracies": (rho > 0).double().mean(), "gpo/beta_effective": beta}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(float(value), rel=DIAGNOSTIC_RTOL, abs=1e-9), (name, key, logged[key], value)


@pytest.mark.parametrize("name", ["logistic", "squared", "exponential", "savage"])
def test_offline_reg_is_the_metric_in_the_second_order_expansion(name, trained_lora, monkeypatch):
    """The README and `GPOLoss.c_f` say: E f(beta rho) ~ f(0) + f'(0) beta E[rho] + 1/2 f''(0) beta^2 E[rho^2], i.e.
    per unit of push, -E[rho] + beta c_f E[rho^2] = -E[rho] + 2 beta c_f gpo/offline_reg. Checked on the logged
    values at a small beta (exact for the quadratic loss; third order in beta rho for the others)."""
    trainer, beta = trained_lora, 0.01
    monkeypatch.setattr(trainer, "gpo_loss", get_loss(name))
    monkeypatch.setattr(trainer, "beta", beta)
    logged = batch_metrics(trainer, [trainer.train_dataset[i] for i in range(8)])
    loss = trainer.gpo_loss
    per_unit_push = (logged["loss"] - loss(torch.zeros(1)).item()) / (beta * abs(loss.d1_at_0))
    second_order = per_unit_push + logged["gpo/margin"]
    # Measured: 7.5e-5 relative for squared (float32 cancellation in loss - f(0)), 3e-5 for logistic (no third-order
    # term), 1.1% for exponential and savage (third order, beta rho ~ 0.025)
    tolerance = {"squared": 1e-3, "logistic": 1e-3}.get(name, 0.03)
    assert second_order == pytest.approx(2 * beta * loss.c_f * logged["gpo/offline_reg"], rel=tolerance)


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


def test_evaluation_logs_gpo_diagnostics_of_the_eval_set(tiny_models, zen_dataset, tmp_path):
    """`trainer.evaluate()` on 8 pairs (2 batches of 4): eval_loss and eval_gpo/* equal the same quantities
    recomputed over the whole eval set from a plain forward of the model (gpt2, dropout off in evaluation)."""
    beta = 0.1
    trainer = run(GPOTrainer, GPOConfig, tiny_models["gpt2"], zen_dataset, tmp_path, peft=True, beta=beta,
                  eval_dataset=zen_dataset.select(range(8)), per_device_eval_batch_size=4, max_steps=3)
    metrics = trainer.evaluate()
    rho = independent_margins(trainer.model, list(trainer.eval_dataset), trainer.args.max_length)
    assert rho.abs().min() > 0.1
    expected = {"eval_loss": FORMULAS["logistic"](beta * rho).mean(), "eval_gpo/margin": rho.mean(),
                "eval_gpo/offline_reg": 0.5 * (rho**2).mean(), "eval_gpo/push": torch.sigmoid(-beta * rho).mean(),
                "eval_rewards/margins": beta * rho.mean(), "eval_rewards/accuracies": (rho > 0).double().mean()}
    for key, value in expected.items():  # equal-sized batches: the mean of batch means is the mean over the set
        assert metrics[key] == pytest.approx(float(value), rel=DIAGNOSTIC_RTOL, abs=1e-9), (key, metrics[key], value)


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
