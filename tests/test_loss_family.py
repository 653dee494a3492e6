"""The loss family beyond DPO's margin: reference-free GPO (SimPO), the SFT term, TRL's other single-margin losses.

Every expected value is recomputed here from the model's own logits (log_softmax -> gather), independently of the
fused LM head and of GPOTrainer's code, or compared with TRL's DPOTrainer on the same batches.
"""


import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from conftest import cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from test_trainer import lora_config, run


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def completion_logps(model, batch):
    """(per-token log-probs of the completion tokens, their mask), both (2B, T-1), from a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    return logps * mask, mask


def batch_loss(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def count_forwards(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


# --- gpo_reference: none -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_simpo_loss_value_matches_its_formula(peft, tiny_models, zen_dataset, tmp_path):
    """none + length normalisation + logistic + gamma is SimPO: -logsigmoid(beta (avg_w - avg_l) - gamma)."""
    beta, gamma = 2.0, 0.5
    args = GPOConfig(output_dir=str(tmp_path), gpo_reference="none", gpo_length_normalize=True, beta=beta,
                     gpo_margin=gamma, **cpu_args())
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                         peft_config=lora_config() if peft else None)
    assert trainer.ref_model is None
    batch = first_batch(trainer)
    logps, mask = completion_logps(trainer.model, batch)
    average = logps.sum(1) / mask.sum(1)
    avg_w, avg_l = average.chunk(2)
    expected = -F.logsigmoid(beta * (avg_w - avg_l) - gamma).mean().item()
    assert batch_loss(trainer, batch) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss, kwargs", [("hinge", {}), ("custom_losses:smoothed_hinge", {"margin": 2.0})])
def test_reference_free_works_with_any_loss(loss, kwargs, tiny_models, zen_dataset, tmp_path):
    """A built-in and a user's import-path loss, summed log-probs: the loss is f(beta * (log pi_w - log pi_l) - gamma)
    with f written out here."""
    beta, gamma = 0.1, 0.3
    args = GPOConfig(output_dir=str(tmp_path), gpo_reference="none", beta=beta, gpo_margin=gamma, gpo_loss=loss,
                     gpo_loss_kwargs=kwargs, **cpu_args())
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                         peft_config=lora_config())
    batch = first_batch(trainer)
    logps, _ = completion_logps(trainer.model, batch)
    chosen, rejected = logps.sum(1).chunk(2)
    t = beta * (chosen - rejected) - gamma
    f = {"hinge": lambda t: torch.clamp(1 - t, min=0), "custom_losses:smoothed_hinge":
         lambda t: torch.log1p(torch.exp(4 * (2.0 - t))) / 4}[loss]
    assert batch_loss(trainer, batch) == pytest.approx(f(t).mean().item(), rel=1e-5)


def test_reference_free_runs_no_reference_pass(tiny_models, zen_dataset, tmp_path):
    """LoRA: one forward per step (the reference pass would be a second, adapter-disabled forward of the same
    model; the control run with a reference shows the counter sees it). Full fine-tune: no reference model loaded."""
    forwards = {}
    for reference in ("model", "none"):
        args = GPOConfig(output_dir=str(tmp_path / reference), gpo_reference=reference, **cpu_args(max_steps=3))
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                             peft_config=lora_config())
        calls, handle = count_forwards(trainer.model)
        trainer.train()
        handle.remove()
        forwards[reference] = len(calls)
        logs = logged_steps(trainer)
        assert len(logs) == 3 and all(key in logs[-1] for key in ("gpo/margin", "gpo/push", "rewards/margins"))
    assert forwards == {"model": 6, "none": 3}

    args = GPOConfig(output_dir=str(tmp_path / "full"), gpo_reference="none", **cpu_args(max_steps=1))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset)
    assert trainer.ref_model is None
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "full" / "README.md").read_text()
    assert "no reference model was loaded and no reference pass ran" in card


def test_reference_free_refuses_what_needs_a_reference(tiny_models, zen_dataset, tmp_path):
    for key in ("precompute_ref_log_probs", "sync_ref_model"):
        with pytest.raises(ValueError, match=f"`{key}=True` needs a reference model"):
            GPOConfig(output_dir=str(tmp_path), gpo_reference="none", **cpu_args(**{key: True}))
    with pytest.raises(ValueError, match="`gpo_reference` must be one of"):
        GPOConfig(output_dir=str(tmp_path), gpo_reference="base", **cpu_args())
    with pytest.raises(ValueError, match=r"`sft_coef` must be >= 0"):
        GPOConfig(output_dir=str(tmp_path), sft_coef=-0.1, **cpu_args())
    with pytest.raises(ValueError, match="`gpo_margin` must be a finite number"):
        GPOConfig(output_dir=str(tmp_path), gpo_margin=float("inf"), **cpu_args())
    from transformers import AutoModelForCausalLM

    args = GPOConfig(output_dir=str(tmp_path), gpo_reference="none", **cpu_args())
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(ValueError, match="a `ref_model` was passed"):
        GPOTrainer(model=str(tiny_models["llama"]), ref_model=model, args=args, train_dataset=zen_dataset)
    # A model passed as an instance, full fine-tune: still no reference copy
    assert GPOTrainer(model=model, args=args, train_dataset=zen_dataset).ref_model is None


def test_beta_calibration_refuses_a_loss_rising_at_zero(tmp_path):
    with pytest.raises(ValueError, match="undefined with 'discopop': f'\\(0\\) = 0.784"):
        GPOConfig(output_dir=str(tmp_path), gpo_loss="discopop", beta_calibration="logistic", **cpu_args())


def test_margin_gamma_enters_inside_f(tiny_models, zen_dataset, tmp_path):
    """With a reference and a fresh adapter rho = 0, so the first loss is f(-gamma) = log(1 + e^gamma)."""
    trainer = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path, peft=True, gpo_margin=1.5,
                  max_steps=1)
    first = logged_steps(trainer)[0]
    assert first["loss"] == pytest.approx(F.softplus(torch.tensor(1.5)).item(), rel=1e-6)
    assert first["gpo/push"] == pytest.approx(torch.sigmoid(torch.tensor(1.5)).item(), rel=1e-6)


# --- sft_coef --------------------------------------------------------------------------------------------------------


def test_sft_term_value_matches_an_independent_nll(tiny_models, zen_dataset, tmp_path):
    """loss(sft_coef=c) - loss(0) on one batch = c * mean NLL over the batch's chosen completion tokens."""
    coef = 0.7
    losses, batch = {}, None
    for c in (0.0, coef):
        args = GPOConfig(output_dir=str(tmp_path), sft_coef=c, **cpu_args())
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                             peft_config=lora_config())
        batch = batch or first_batch(trainer)  # one batch for both (a fresh adapter leaves the model unchanged)
        losses[c] = batch_loss(trainer, batch)
    logps, mask = completion_logps(trainer.model, batch)
    chosen_logps, chosen_mask = logps.chunk(2)[0], mask.chunk(2)[0]
    nll = -(chosen_logps.sum() / chosen_mask.sum()).item()
    assert losses[coef] - losses[0.0] == pytest.approx(coef * nll, rel=1e-5)
    assert trainer._metrics["eval"]["gpo/sft_loss"][-1] == pytest.approx(nll, rel=1e-5)


def test_sft_coef_matches_trl_sigmoid_plus_sft_at_every_step(tiny_models, zen_dataset, tmp_path):
    """sft_coef = 0 is DPO bit for bit; sft_coef = c is TRL's loss_type [sigmoid, sft] with weights [1, c]."""
    coef = 0.5
    gpo0 = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "g0", peft=True, sft_coef=0.0,
               max_steps=3)
    trl0 = run(DPOTrainer, DPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "t0", peft=True, max_steps=3)
    assert [e["loss"] for e in logged_steps(gpo0)] == [e["loss"] for e in logged_steps(trl0)]
    assert "gpo/sft_loss" not in logged_steps(gpo0)[0]
    gpo = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "g", peft=True, sft_coef=coef,
              max_steps=3)
    trl = run(DPOTrainer, DPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "t", peft=True,
              loss_type=["sigmoid", "sft"], loss_weights=[1.0, coef], max_steps=3)
    gpo_logs, trl_logs = logged_steps(gpo), logged_steps(trl)
    assert len(gpo_logs) == 3 and gpo_logs[0]["loss"] != gpo_logs[-1]["loss"]
    for step, (g, t) in enumerate(zip(gpo_logs, trl_logs), start=1):
        assert g["loss"] == pytest.approx(t["loss"], rel=1e-5), f"step {step}"
        assert g["gpo/sft_loss"] > 0


# --- TRL's single-margin losses --------------------------------------------------------------------------------------

TRL_PARITY = {
    "robust": (dict(gpo_loss="robust", gpo_loss_kwargs={"label_smoothing": 0.2}),
               dict(loss_type="robust", label_smoothing=0.2)),
    "exo_pair": (dict(gpo_loss="exo_pair", gpo_loss_kwargs={"label_smoothing": 1e-3}),
                 dict(loss_type="exo_pair", label_smoothing=1e-3)),
    "discopop": (dict(gpo_loss="discopop", gpo_loss_kwargs={"tau": 0.05}),
                 dict(loss_type="discopop", discopop_tau=0.05)),
    "sigmoid_norm": (dict(gpo_loss="logistic", gpo_length_normalize=True), dict(loss_type="sigmoid_norm")),
}


@pytest.mark.parametrize("name", list(TRL_PARITY))
def test_parity_with_trl_margin_losses(name, tiny_models, zen_dataset, tmp_path):
    """Full fine-tune, 3 steps: the same losses and TRL metrics as TRL's loss_type of the same name."""
    gpo_kwargs, trl_kwargs = TRL_PARITY[name]
    gpo = run(GPOTrainer, GPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "g", max_steps=3, beta=0.5,
              **gpo_kwargs)
    trl = run(DPOTrainer, DPOConfig, tiny_models["llama"], zen_dataset, tmp_path / "t", max_steps=3, beta=0.5,
              **trl_kwargs)
    gpo_logs, trl_logs = logged_steps(gpo), logged_steps(trl)
    assert len(gpo_logs) == 3 and gpo_logs[-1]["rewards/margins"] != 0.0
    # discopop's s e^-t is written exp(-t + logsigmoid(t / tau)) (finite where TRL's product overflows): it drifts
    # from TRL's by a few float32 ulps per step (3e-6 relative at step 3 with torch 2.13)
    rel = 1e-5 if name == "discopop" else 1e-6
    for step, (g, t) in enumerate(zip(gpo_logs, trl_logs), start=1):
        for key, value in t.items():
            assert g[key] == pytest.approx(value, rel=rel, abs=1e-6), f"step {step}: {key}"


# --- TRL knobs ---------------------------------------------------------------------------------------------------


def test_sync_ref_model_moves_the_reference_at_sync_steps(tiny_models, zen_dataset, tmp_path):
    """TR-DPO (TRL's SyncRefModelCallback, inherited): at step 2 of sync_steps = 2 the reference becomes
    alpha * policy + (1 - alpha) * reference, and the reference log-probs GPO uses change then, and only then."""
    from transformers import TrainerCallback

    alpha = 0.6
    args = GPOConfig(output_dir=str(tmp_path), sync_ref_model=True, ref_model_sync_steps=2,
                     ref_model_mixup_alpha=alpha, **cpu_args(max_steps=3))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset)
    batch = first_batch(trainer)
    name = "model.embed_tokens.weight"

    def reference_logps():
        with torch.no_grad():
            return torch.cat(trainer._reference_logps(trainer.model, batch))

    initial_ref = dict(trainer.ref_model.named_parameters())[name].detach().clone()
    seen = [reference_logps()]
    weights = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(reference_logps())
            weights[state.global_step] = (dict(trainer.model.named_parameters())[name].detach().clone(),
                                          dict(trainer.ref_model.named_parameters())[name].detach().clone())

    trainer.add_callback(Record())  # after TRL's sync callback, so it sees the synced reference
    trainer.train()
    assert torch.equal(seen[1], seen[0])  # step 1: no sync
    assert not torch.allclose(seen[2], seen[1])  # step 2: synced
    assert torch.equal(seen[3], seen[2])  # step 3: no sync
    policy, ref = weights[2]
    torch.testing.assert_close(ref, alpha * policy + (1 - alpha) * initial_ref)
    assert torch.equal(weights[1][1], initial_ref)


def test_pad_to_multiple_of_pads_packed_rows_and_keeps_the_loss(tiny_models, zen_dataset, tmp_path):
    """TRL pads its padded batches to the multiple; the packed collator now pads its rows too, exactly."""
    from test_packing import build, loss_and_grads

    padded = build(tiny_models["llama"], zen_dataset, tmp_path / "p")
    rows = [dict(row) for row in padded.train_dataset.select(range(6))]
    packed = build(tiny_models["llama"], zen_dataset, tmp_path / "q", padding_free=True, pad_to_multiple_of=48)
    batch = packed.data_collator(rows)
    assert batch["input_ids"].size(1) % 48 == 0
    unpadded = build(tiny_models["llama"], zen_dataset, tmp_path / "u", padding_free=True).data_collator(rows)
    assert batch["input_ids"].size(1) > unpadded["input_ids"].size(1)  # the multiple added padding here
    expected, _, _ = loss_and_grads(padded, "logistic", rows)
    got, _, _ = loss_and_grads(packed, "logistic", rows)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# --- Every DPOConfig key is honoured or refused -----------------------------------------------------------------------

# DPOConfig's own keys (beyond transformers' TrainingArguments) that GPOTrainer honours, and where.
HONOURED = {
    "model_init_kwargs": "TRL's model loading (GPOTrainer runs DPOTrainer.__init__); the recipe sets it",
    "trust_remote_code": "TRL's model and processor loading",
    "router_aux_loss_coef": "GPOTrainer._compute_loss adds the MoE router loss like TRL (not exercised here: no MoE)",
    "disable_dropout": "TRL's __init__",
    "dataset_num_proc": "TRL's _prepare_dataset (GPOTrainer calls it)",
    "max_length": "TRL's collator; the packed rows' capacity (test_packing)",
    "truncation_mode": "TRL's collator; prefix_sharing refuses keep_end (test_packing)",
    "padding_free": "gpo_trl.packing (test_packing)",
    "pad_to_multiple_of": "TRL's collator; the packed collator (test_pad_to_multiple_of_...)",
    "precompute_ref_log_probs": "TRL's precompute behind gpo_trl.refcache (test_trainer, test_refcache)",
    "precompute_ref_batch_size": "TRL's __init__ passes it to the precompute",
    "beta": "the loss's beta (test_trainer)",
    "activation_offloading": "TRL's training_step (GPOTrainer.training_step calls it)",
    "sync_ref_model": "TRL's SyncRefModelCallback (test_sync_ref_model_...)",
    "ref_model_mixup_alpha": "TRL's SyncRefModelCallback (test_sync_ref_model_...)",
    "ref_model_sync_steps": "TRL's SyncRefModelCallback (test_sync_ref_model_...)",
    "pad_token": "TRL's collator (deprecated in TRL)",
}
# Refused keys: a non-default value and the error it must raise. None since TRL's loss options run as in DPOTrainer
# (tests/test_trl_compat.py); their contradictions are refused there.
REFUSED = {}
HONOURED.update({
    "loss_type": "the loss's terms, the sigmoid entry being gpo_loss (gpo_trl.trl_compat; test_trl_compat)",
    "loss_weights": "the terms' weights (test_trl_compat)",
    "ld_alpha": "LD-DPO log-probs for every term (test_trl_compat)",
    "f_divergence_type": "the margin's scores for every f (test_trl_compat)",
    "f_alpha_divergence_coef": "alpha_divergence's alpha (test_trl_compat)",
    "label_smoothing": "robust / exo_pair / aot entries, gpo_loss robust / exo_pair (test_trl_compat)",
    "use_weighting": "WPO pair weights for every term (test_trl_compat)",
    "discopop_tau": "discopop's tau (test_trl_compat)",
})


def test_every_dpo_config_key_is_honoured_or_refused():
    """Fails when TRL adds a DPOConfig key that is neither listed as honoured nor refused."""
    from dataclasses import fields

    from transformers import TrainingArguments

    own = {f.name for f in fields(DPOConfig)} - {f.name for f in fields(TrainingArguments)}
    assert own == set(HONOURED) | set(REFUSED), own ^ (set(HONOURED) | set(REFUSED))
    assert not set(HONOURED) & set(REFUSED)


# --- Recipe keys from TRL's ScriptArguments ----------------------------------------------------------------------


def test_recipe_refuses_dataset_streaming(tmp_path):
    from test_config import write_recipe

    from gpo_trl.recipe import ConfigError, parse_args

    with pytest.raises(ConfigError, match="`dataset_streaming: true` is not supported by the GPO recipe"):
        parse_args(["--config", write_recipe(tmp_path, dataset_streaming=True)])


def test_ignore_bias_buffers_lists_the_bool_buffers_for_ddp():
    from gpo_trl.recipe import ignore_bool_buffers

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.register_buffer("causal_bias", torch.ones(2, 2, dtype=torch.bool))
    model[0].register_buffer("mask", torch.zeros(2, dtype=torch.bool))
    model.register_buffer("scale", torch.ones(1))
    ignore_bool_buffers(model)
    assert sorted(model._ddp_params_and_buffers_to_ignore) == ["0.mask", "causal_bias"]


# --- Recipe data path: TRL's per-row chat-template columns ---------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                         "parameters": {"type": "object", "properties": {}}}}


def write_rows(path, rows):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_tools_column_reaches_trl_tokenization(tiny_models, tmp_path):
    """A `tools` column survives the recipe's data path and changes the tokenised prompt (TRL renders it)."""
    import json

    from test_data import build

    from conftest import DATA, read_jsonl
    from transformers import AutoTokenizer

    rows = read_jsonl(DATA / "zen_conversational_preference" / "train.jsonl")[:4]
    rows = [{**row, "tools": json.dumps([TOOL]) if i % 2 == 0 else None} for i, row in enumerate(rows)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tools_prefix = "{% if tools %}<|system|>tools: {{ tools | length }}\n{% endif %}"
    tokenizer.chat_template = tools_prefix + tokenizer.chat_template
    train, _, _ = build({"data_files": write_rows(tmp_path / "tools.jsonl", rows)}, tokenizer=tokenizer,
                        max_length=64)
    assert train.column_names == ["prompt", "chosen", "rejected", "tools"]
    args = GPOConfig(output_dir=str(tmp_path / "out"), **cpu_args())
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config())
    prompts = trainer.train_dataset["prompt_ids"]

    def prompt_ids(row, **kwargs):
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    assert len(prompt_ids(rows[0], tools=[TOOL])) > len(prompt_ids(rows[0]))
    assert prompts[0] == prompt_ids(rows[0], tools=[TOOL])  # row 0 has tools
    assert prompts[1] == prompt_ids(rows[1])  # row 1 has none


def test_recipe_data_refuses_images_and_partial_template_columns(tmp_path):
    from test_data import build

    from conftest import DATA, read_jsonl
    from gpo_trl.data import DataError

    rows = read_jsonl(DATA / "zen_standard_preference" / "train.jsonl")[:3]
    with pytest.raises(DataError, match="column 'images' holds images"):
        build({"data_files": write_rows(tmp_path / "img.jsonl", [{**r, "images": []} for r in rows])})
    with_kwargs = write_rows(tmp_path / "a.jsonl", [{**r, "chat_template_kwargs": {"x": 1}} for r in rows])
    without = write_rows(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match="Only some sources of the mixture have a 'chat_template_kwargs' column"):
        build({"data_files": with_kwargs}, {"data_files": without})
