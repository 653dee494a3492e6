"""GPOTrainer as a drop-in for DPOTrainer: every DPOConfig loss option, run by both on the same tiny model, data,
seed and arguments, for 3 optimizer steps; and the knobs (WPO, LD-DPO, f-divergences) with GPO losses TRL lacks,
against a computation from the model's plain logits (log_softmax -> gather), independent of both trainers.
"""

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from conftest import cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.guards import NonFiniteError
from test_trainer import lora_config

ALL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# loss_type -> the GPO loss it runs as (None: DPOTrainer's own term)
BECOMES = {"sigmoid": "logistic", "hinge": "hinge", "ipo": "squared", "exo_pair": "exo_pair", "robust": "robust",
           "discopop": "discopop", "sigmoid_norm": "logistic"}
EXTRA = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.2), "aot": dict(label_smoothing=0.1)}
MPO = ["sigmoid", "bco_pair", "sft"]

# name -> (DPOConfig kwargs given to both trainers, GPO-only kwargs)
CASES = {f"loss_type={name}": (dict(loss_type=name, **EXTRA.get(name, {})), {}) for name in ALL_LOSS_TYPES}
CASES.update({
    "mpo": (dict(loss_type=MPO), {}),  # TRL's own suite's list
    "mpo_weighted": (dict(loss_type=MPO, loss_weights=[0.8, 0.2, 1.0]), {}),  # the MPO paper's weights
    "sigmoid+hinge": (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5]), {}),
    "wpo": (dict(use_weighting=True), {}),
    "wpo+ipo+bco_pair": (dict(use_weighting=True, loss_type=["ipo", "bco_pair"]), {}),
    "ld": (dict(ld_alpha=0.5), {}),
    "ld0+sigmoid_norm+sft": (dict(ld_alpha=0.0, loss_type=["sigmoid_norm", "sft"]), {}),
    "ld+precompute": (dict(ld_alpha=0.5, precompute_ref_log_probs=True), {}),
    "forward_kl": (dict(f_divergence_type="forward_kl"), {}),
    "js_divergence": (dict(f_divergence_type="js_divergence"), {}),
    "alpha_divergence": (dict(f_divergence_type="alpha_divergence"), {}),
    "alpha_divergence_0.3+hinge": (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                                        loss_type="hinge"), {}),
    "forward_kl+ipo+sft": (dict(f_divergence_type="forward_kl", loss_type=["ipo", "sft"]), {}),
    "lora+mpo+ld": (dict(loss_type=MPO, ld_alpha=0.5, peft=True), {}),
    "padding_free+bco_pair+wpo+ld": (dict(loss_type=["sigmoid", "bco_pair"], use_weighting=True, ld_alpha=0.7),
                                     dict(padding_free=True)),
})
# Same operations in the same order on float32: bit-identical. The others agree to float32 rounding (rel 1e-4):
# - the same function written differently: ipo as (2 beta rho - 1)^2 / (4 beta^2); discopop's s e^-t as
#   exp(-t + logsigmoid(t / tau)), finite where TRL's product overflows;
# - robust and exo_pair: TRL writes beta * rho once per use, so its backward adds the uses' gradients in another order;
# - lists that mix GPO terms with TRL's: the terms' sum and the backward through the shared log-probs run in
#   another order;
# - padding_free: the packed attention sums in another order (gpo_trl.packing).
NOT_BIT_IDENTICAL = {"loss_type=ipo", "loss_type=discopop", "loss_type=robust", "loss_type=exo_pair", "mpo",
                     "mpo_weighted", "wpo+ipo+bco_pair", "ld0+sigmoid_norm+sft", "forward_kl+ipo+sft", "lora+mpo+ld",
                     "padding_free+bco_pair+wpo+ld"}


def train(trainer_cls, config_cls, model_path, dataset, output_dir, peft=False, **kwargs):
    """3 steps, then an evaluation (on the training rows: the parity, not generalisation, is tested)."""
    args = config_cls(output_dir=str(output_dir), **cpu_args(max_steps=3, eval_strategy="steps", eval_steps=3,
                                                             per_device_eval_batch_size=8, **kwargs))
    trainer = trainer_cls(model=str(model_path), args=args, train_dataset=dataset, eval_dataset=dataset,
                          peft_config=lora_config() if peft else None)
    trainer.train()
    return trainer


def evaluation(trainer) -> dict:
    [entry] = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return {key: value for key, value in entry.items() if not key.endswith(("_runtime", "_per_second"))}


@pytest.mark.parametrize("name", list(CASES))
def test_gpo_trainer_equals_dpo_trainer(name, tiny_models, zen_dataset, tmp_path, caplog):
    """Every TRL metric equal at each of 3 steps and in the evaluation after them; the f(beta rho) members also log
    GPO's diagnostics and say which GPO loss they became."""
    shared, gpo_only = CASES[name]
    trl = train(DPOTrainer, DPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "trl", **shared)
    with caplog.at_level(logging.WARNING, logger="gpo_trl.trainer"):
        gpo = train(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "gpo",
                    ref_logps_cache_dir=str(tmp_path / "ref"), **shared, **gpo_only)
    trl_logs, gpo_logs = logged_steps(trl), logged_steps(gpo)
    assert len(trl_logs) == len(gpo_logs) == 3
    assert gpo_logs[0]["loss"] != gpo_logs[-1]["loss"]  # the run moved: parity is not trivial
    trl_logs.append(evaluation(trl))
    gpo_logs.append(evaluation(gpo))
    for step, (expected, got) in enumerate(zip(trl_logs, gpo_logs), start=1):  # step 4: the evaluation
        for key, value in expected.items():
            if name in NOT_BIT_IDENTICAL:
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"step {step}: {key}"
            else:
                assert got[key] == value, f"step {step}: {key} GPO {got[key]!r} vs TRL {value!r}"

    entries = shared["loss_type"] if isinstance(shared.get("loss_type"), list) else [shared.get("loss_type", "sigmoid")]
    margin_terms = [entry for entry in entries if entry in BECOMES]
    assert [term.loss.name for term in gpo.loss_plan.margin_terms] == [BECOMES[entry] for entry in margin_terms]
    assert [entry for entry, _ in gpo.loss_plan.trl_terms] == [entry for entry in entries if entry not in BECOMES]
    assert "gpo/margin" in gpo_logs[0] and "gpo/offline_reg" in gpo_logs[0] and "eval_gpo/margin" in gpo_logs[-1]
    assert ("gpo/push" in gpo_logs[0]) == ("eval_gpo/push" in gpo_logs[-1]) == bool(margin_terms)
    if entries != ["sigmoid"]:  # the run says what each entry became
        said = " ".join(record.getMessage() for record in caplog.records)
        for entry in margin_terms:
            assert f"loss_type {entry!r} -> gpo_loss {BECOMES[entry]!r}" in said
    if margin_terms:  # the diagnostics of the first member, recomputed from the logged rewards (summed margins)
        term = gpo.loss_plan.margin_terms[0]
        assert gpo_logs[0]["gpo/beta_effective"] == pytest.approx(term.beta)
        if not term.length_normalize and shared.get("f_divergence_type", "reverse_kl") == "reverse_kl":
            for entry in gpo_logs[:-1]:
                assert entry["gpo/margin"] == pytest.approx(entry["rewards/margins"] / 0.1, rel=1e-4, abs=1e-6)


# --- The knobs with any f, against an independent computation ---------------------------------------------------


@pytest.fixture(scope="module")
def moved_reference(tiny_models):
    """The tiny model with every weight perturbed (seeded): a reference whose log-ratios are not 0 at step 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def plain_forward(model, batch):
    """Per-token log p(y_t), log sum_v p(v)^2 and the completion mask, (2B, T-1), from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = batch["completion_mask"][:, 1:].float()
    token = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * mask
    log_sum_sq = torch.logsumexp(2 * log_probs, dim=-1)
    return token, log_sum_sq, mask


def ld_sums(token, mask, alpha):
    """LD-DPO by hand: in each pair, the first min(|y_w|, |y_l|) completion tokens count 1, the later ones alpha."""
    sums = []
    half = token.size(0) // 2
    for row in range(token.size(0)):
        other = row + half if row < half else row - half
        shared = int(min(mask[row].sum(), mask[other].sum()))
        values = token[row][mask[row].bool()]
        sums.append(values[:shared].sum() + (1.0 if alpha is None else alpha) * values[shared:].sum())
    return torch.stack(sums)


def f_scores(h, kind, alpha):
    u = torch.exp(h.double())  # the policy to reference ratio
    return {"reverse_kl": torch.log(u), "forward_kl": 1 - 1 / u, "js_divergence": torch.log(2 * u / (1 + u)),
            "alpha_divergence": (u ** (alpha - 1) - 1) / (alpha - 1)}[kind]


F_OF_T = {"exponential": lambda t: torch.exp(-t), "truncated_quadratic": lambda t: torch.clamp(1 - t, min=0) ** 2,
          "savage": lambda t: torch.sigmoid(-t) ** 2}
KNOBS = {
    "ld": dict(ld_alpha=0.3),
    "wpo": dict(use_weighting=True),
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "js_divergence": dict(f_divergence_type="js_divergence"),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "all+normalised+gamma": dict(ld_alpha=0.6, use_weighting=True, f_divergence_type="forward_kl",
                                 gpo_length_normalize=True, gpo_margin=0.2),
}


def loss_of_first_batch(tiny_models, zen_dataset, moved_reference, tmp_path, **config):
    """(trainer, its first training batch, GPO's loss on it in eval mode) against the moved reference model."""
    args = GPOConfig(output_dir=str(tmp_path), **config)
    trainer = GPOTrainer(model=str(tiny_models["llama"]), ref_model=moved_reference, args=args,
                         train_dataset=zen_dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        return trainer, batch, trainer.compute_loss(trainer.model, batch).item()


@pytest.mark.parametrize("loss", list(F_OF_T))
@pytest.mark.parametrize("knob", list(KNOBS))
def test_knobs_compose_with_any_f(knob, loss, tiny_models, zen_dataset, moved_reference, tmp_path):
    """loss = mean over pairs of w * f(beta * rho - gamma), rho = s(h_w) - s(h_l) (per token when normalised),
    h the log-ratio of LD-weighted sums, s the f-divergence score, w the WPO pair weight (1 without)."""
    kwargs, beta = KNOBS[knob], 0.5
    trainer, batch, got = loss_of_first_batch(tiny_models, zen_dataset, moved_reference, tmp_path, gpo_loss=loss,
                                              beta=beta, **cpu_args(**kwargs))
    token, log_sum_sq, mask = plain_forward(trainer.model, batch)
    ref_token, _, _ = plain_forward(moved_reference, batch)
    alpha = kwargs.get("ld_alpha")
    h = ld_sums(token, mask, alpha) - ld_sums(ref_token, mask, alpha)
    scores = f_scores(h, kwargs.get("f_divergence_type", "reverse_kl"), kwargs.get("f_alpha_divergence_coef", 0.5))
    if kwargs.get("gpo_length_normalize"):
        scores = scores / mask.sum(dim=1)
    chosen, rejected = scores.chunk(2)
    weights = torch.ones_like(chosen)
    if kwargs.get("use_weighting"):
        per_sequence = torch.exp(((token - log_sum_sq) * mask).sum(dim=1) / mask.sum(dim=1))
        weights = per_sequence.chunk(2)[0] * per_sequence.chunk(2)[1]
    t = beta * (chosen - rejected) - kwargs.get("gpo_margin", 0.0)
    expected = (weights * F_OF_T[loss](t)).mean().item()
    assert h.abs().min() > 1e-3  # the reference differs: the knobs act on non-zero log-ratios
    assert got == pytest.approx(expected, rel=1e-4)


def test_gpo_f_next_to_trl_terms(tiny_models, zen_dataset, moved_reference, tmp_path):
    """`gpo_loss` with a list: 0.8 * E f + 0.2 * bco_pair + 1.0 * sft, with bco_pair and sft written out here."""
    beta = 0.5
    trainer, batch, got = loss_of_first_batch(tiny_models, zen_dataset, moved_reference, tmp_path,
                                              gpo_loss="exponential", beta=beta, loss_type=MPO,
                                              loss_weights=[0.8, 0.2, 1.0], **cpu_args())
    token, _, mask = plain_forward(trainer.model, batch)
    ref_token, _, _ = plain_forward(moved_reference, batch)
    h_w, h_l = (token.sum(1) - ref_token.sum(1)).chunk(2)
    exponential = torch.exp(-beta * (h_w - h_l)).mean()
    bco = (-F.logsigmoid(beta * h_w) - F.logsigmoid(-beta * h_l)).mean()
    sft = -token.chunk(2)[0].sum() / mask.chunk(2)[0].sum()
    assert got == pytest.approx((0.8 * exponential + 0.2 * bco + sft).item(), rel=1e-5)
    assert "gpo/push" in trainer._metrics["eval"]
    from gpo_trl.hub import model_card_section

    card = model_card_section(trainer, None)
    assert ("loss_type 'sigmoid' -> gpo_loss 'exponential': f(t) = exp(-t), t = 0.5 * rho, weight 0.8; loss_type "
            "'bco_pair' -> DPOTrainer's own term, weight 0.2; loss_type 'sft' -> DPOTrainer's own term") in card


def test_trl_terms_reference_free(tiny_models, zen_dataset, tmp_path):
    """`gpo_reference: none` gives TRL's terms reference log-probs of 0: sppo_hard on log pi itself."""
    beta = 0.5
    args = GPOConfig(output_dir=str(tmp_path), gpo_reference="none", beta=beta, loss_type="sppo_hard", **cpu_args())
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset)
    assert trainer.ref_model is None
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    token, _, _ = plain_forward(trainer.model, batch)
    chosen, rejected = token.sum(1).chunk(2)
    expected = ((chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)


# --- The one intended difference ------------------------------------------------------------------------------------


def test_a_nan_weight_stops_gpo_where_dpo_trainer_carries_on(tiny_models, zen_dataset, tmp_path):
    """The same corrupted model (one NaN weight) under loss_type [sigmoid, bco_pair, sft]: DPOTrainer steps and
    ends with every weight of the layers NaN; GPOTrainer stops before the first update, its weights intact."""
    def corrupted(trainer):
        with torch.no_grad():
            trainer.model.get_output_embeddings().weight[0, 0] = math.nan
        return trainer

    kwargs = cpu_args(max_steps=2, loss_type=MPO)
    trl = corrupted(DPOTrainer(model=str(tiny_models["llama"]), args=DPOConfig(output_dir=str(tmp_path / "t"),
                                                                             **kwargs), train_dataset=zen_dataset))
    trl.train()  # its log shows no NaN: transformers' logging_nan_inf_filter drops NaN losses from the log
    assert trl.state.global_step == 2
    assert torch.isnan(trl.model.model.layers[0].self_attn.q_proj.weight).all()
    gpo = corrupted(GPOTrainer(model=str(tiny_models["llama"]), args=GPOConfig(output_dir=str(tmp_path / "g"),
                                                                              **kwargs), train_dataset=zen_dataset))
    weight = gpo.model.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    with pytest.raises(NonFiniteError, match="Non-finite loss at training step 1"):
        gpo.train()
    assert torch.equal(weight, before) and torch.isfinite(weight).all()


# --- Configuration: the rule, its contradictions, DPOTrainer's own refusals -----------------------------------------


def config(**kwargs) -> GPOConfig:
    return GPOConfig(output_dir="unused", use_cpu=True, report_to=[], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="hinge", gpo_loss="exponential"),
     "`gpo_loss='exponential'` shapes the gpo_loss term, which is loss_type's 'sigmoid' entry, but "
     "loss_type=['hinge'] has none"),
    (dict(loss_type=["ipo", "sft"], gpo_length_normalize=True), "`gpo_length_normalize=True` shapes the gpo_loss"),
    (dict(loss_type="bco_pair", gpo_margin=0.5), "`gpo_margin=0.5` shapes the gpo_loss term"),
    (dict(loss_type="sft", beta_calibration="logistic"), "`beta_calibration='logistic'` shapes the gpo_loss term"),
    (dict(loss_type="hinge", gpo_loss_kwargs={"tau": 1}), "`gpo_loss_kwargs={'tau': 1}` shapes the gpo_loss term"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"),
     "`f_divergence_type=forward_kl` cannot be combined with `loss_type` 'bco_pair'"),
    (dict(f_divergence_type="js_divergence", gpo_reference="none"),
     "`f_divergence_type=js_divergence` is a divergence from the reference model, but `gpo_reference: none`"),
    (dict(f_divergence_type="kl"), "`f_divergence_type` must be one of"),
    (dict(use_weighting=True, loss_type=MPO), "`use_weighting: true` (WPO) cannot be combined with `loss_type` sft"),
    (dict(use_weighting=True, loss_type=["sigmoid", "aot"]), "`use_weighting: true` (WPO) cannot be combined with "
                                                             "`loss_type` aot / aot_unpaired"),
    (dict(loss_type="exo_pair"), "`loss_type` exo_pair needs `label_smoothing` > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), "`loss_type` robust needs 0 <= `label_smoothing` < 0.5"),
    (dict(loss_type="simpo"), "`loss_type` entry 'simpo' is not a TRL 1.16 loss type"),
    (dict(ld_alpha=1.5), "`ld_alpha` must be in [0, 1]"),
    (dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0]), "`loss_weights` must have the same length"),
    (dict(gpo_loss="robust", gpo_loss_kwargs={"label_smoothing": 0.1}, label_smoothing=0.2),
     "`label_smoothing=0.2` and `gpo_loss_kwargs: {label_smoothing: 0.1}` both set"),
])
def test_contradictions_are_refused_naming_both_keys(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(**kwargs)


def test_trl_loss_parameters_reach_the_gpo_slot():
    """label_smoothing / discopop_tau parameterise gpo_loss robust / exo_pair / discopop as they do the entries."""
    assert config(gpo_loss="robust", label_smoothing=0.2).build_loss().kwargs == {"label_smoothing": 0.2}
    assert config(gpo_loss="discopop", discopop_tau=0.1).build_loss().kwargs == {"tau": 0.1}
    plan = config(loss_type=["sigmoid", "robust"], gpo_loss="exo_pair", label_smoothing=0.3).loss_plan()
    assert [term.loss.kwargs for term in plan.margin_terms] == [{"label_smoothing": 0.3}] * 2
    ipo = config(loss_type="ipo", beta=0.25).loss_plan().margin_terms[0]
    assert (ipo.loss.name, ipo.beta, ipo.weight, ipo.length_normalize) == ("squared", 0.5, 4.0, True)


@pytest.mark.parametrize("kwargs, key", [(dict(label_smoothing=0.1), "label_smoothing"),
                                         (dict(loss_type="hinge", discopop_tau=0.2), "discopop_tau"),
                                         (dict(f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef")])
def test_keys_no_term_reads_warn(kwargs, key):
    with pytest.warns(UserWarning, match=f"`{key}=.*` has no effect here, as in DPOTrainer"):
        config(**kwargs)


def test_an_empty_loss_type_list_is_refused_when_parsed():
    """`loss_type: []` used to pass the checks and fail at the first step (the loss was None)."""
    with pytest.raises(ValueError, match="`loss_type` is an empty list"):
        GPOConfig(output_dir="unused", loss_type=[], **cpu_args())
