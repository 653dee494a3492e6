"""Packed and prefix-shared batches (gpo_trl.packing) against the padded path: same loss, same gradients, same metrics.

The data is the real hh-rlhf sample (multi-turn prompts of very different lengths, some truncated at max_length),
tokenised by the tiny test tokenizer. LoRA weights are set to random values so the policy differs from the reference
(the reference pass runs through the disabled adapter, as in TRL).
"""

import math

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from conftest import DATA, cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer, available_losses, get_loss
from gpo_trl.data import check_dataset
from gpo_trl.packing import PackedPreferenceCollator, best_fit_decreasing, branch_mask, flex_block_mask

MODES = {
    "packed": dict(padding_free=True),
    "packed_one_row": dict(padding_free=True, packing_strategy="one_row"),
    "prefix_shared": dict(prefix_sharing=True),
    "packed+prefix_shared": dict(padding_free=True, prefix_sharing=True),
}
BATCH = 6
# Float32 rounding bounds, measured on these tests (packed, one-row, prefix-shared and both, every loss, 3 models,
# full fine-tuning, QLoRA): per-tensor relative gradient error ||g - g_padded|| / ||g_padded|| at most 4.6e-6
# (typically 1-3e-6); loss 1.0e-6 relative; metrics 6.4e-6 absolute. An absolute 1e-5 on gradients of median
# magnitude 0.03 would let 3e-4 through.
GRAD_RTOL, LOSS_RTOL, METRIC_TOL = 1e-5, 5e-6, 1e-5
# rho is a difference of log-prob sums of ~230 nats, each exact to ~7e-8 relative: it moves by up to RHO_TOL nats
# (measured: E[rho] by 9.5e-6 on an AMD EPYC, gpt2 one-row). offline_reg = E[rho^2] / 2 then moves by
# E[rho d] + E[d^2] / 2 <= sqrt(E[rho^2]) RHO_TOL + RHO_TOL^2 / 2 (Cauchy-Schwarz; measured 1.4e-5 at 0.53).
RHO_TOL = 2e-5
# DiscoPOP's pair weight f'(t) turns within |t| ~ tau = 0.05 (f'' ~ 1 / tau), so the float32 rounding of rho (~2e-5
# nats on sums of ~230) moves its gradients 10x more than those of the other losses: measured 4.2e-5 relative.
GRAD_RTOL_BY_LOSS = {"discopop": 1e-4}


def assert_same_gradients(grads, expected, where, rtol=GRAD_RTOL):
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        error, scale = (grad - expected[name]).norm().item(), expected[name].norm().item()
        assert error <= rtol * scale, f"{where}: gradient of {name} off by {error / scale:.2e} relative"


def metric_tolerance(key: str, value: float) -> float:
    if key == "gpo/margin":
        return RHO_TOL
    if key == "gpo/offline_reg":
        return math.sqrt(2 * value) * RHO_TOL + RHO_TOL**2 / 2
    return METRIC_TOL * max(1.0, abs(value))


def assert_same_loss(loss, expected, where):
    assert abs(loss.item() - expected.item()) <= LOSS_RTOL * abs(expected.item()), f"{where}: {loss} vs {expected}"


@pytest.fixture(scope="module")
def hh_dataset():
    raw = load_dataset("json", data_files=str(DATA / "hh_rlhf_harmless_base_head300.jsonl"), split="train")
    rows, _ = check_dataset(raw.select(range(40)), "hh")
    return rows


def build(model_path, dataset, tmp_path, peft=True, quantization=None, **kwargs):
    args = GPOConfig(output_dir=str(tmp_path / "out"), **cpu_args(max_length=96, per_device_train_batch_size=BATCH,
                                                                   **kwargs))
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GPOTrainer(model=str(model_path), args=args, train_dataset=dataset, peft_config=peft_config if peft else None,
                         **({"quantization_config": quantization} if quantization else {}))
    generator = torch.Generator().manual_seed(1)
    for parameter in trainer.model.parameters():  # same random adapter in every trainer: policy != reference
        if parameter.requires_grad and peft:
            parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.05).to(parameter.device)
    return trainer


def loss_and_grads(trainer, loss_name, rows):
    trainer.gpo_loss = get_loss(loss_name)
    trainer._metrics["train"].clear()
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: value[-1] for key, value in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_mode_matches_the_padded_path_for_every_loss(arch, tiny_models, hh_dataset, tmp_path):
    padded = build(tiny_models[arch], hh_dataset, tmp_path)
    others = {mode: build(tiny_models[arch], hh_dataset, tmp_path, **kwargs) for mode, kwargs in MODES.items()}
    rows = [padded.train_dataset[i] for i in range(BATCH)]
    lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows]
    assert max(lengths) > 96, "the batch must exercise truncation"
    for loss_name in available_losses():
        expected_loss, expected_grads, expected_metrics = loss_and_grads(padded, loss_name, rows)
        assert expected_metrics["rewards/margins"] != 0.0  # the adapter moved the policy off the reference
        for mode, trainer in others.items():
            loss, grads, metrics = loss_and_grads(trainer, loss_name, rows)
            where = f"{arch} {mode} {loss_name}"
            assert_same_loss(loss, expected_loss, where)
            assert_same_gradients(grads, expected_grads, where, GRAD_RTOL_BY_LOSS.get(loss_name, GRAD_RTOL))
            assert metrics.keys() == expected_metrics.keys()
            for key, value in expected_metrics.items():
                assert abs(metrics[key] - value) <= metric_tolerance(key, value), f"{where}: {key} {metrics[key]} vs {value}"


def test_full_fine_tuning_with_a_separate_reference_model(tiny_models, hh_dataset, tmp_path):
    padded = build(tiny_models["llama"], hh_dataset, tmp_path, peft=False)
    shared = build(tiny_models["llama"], hh_dataset, tmp_path, peft=False, padding_free=True, prefix_sharing=True)
    with torch.no_grad():  # move the policy away from its reference copy, identically in both
        for a, b in zip(padded.model.parameters(), shared.model.parameters()):
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())) * 0.02
            a.add_(noise)
            b.add_(noise)
    rows = [padded.train_dataset[i] for i in range(BATCH)]
    expected_loss, expected_grads, _ = loss_and_grads(padded, "logistic", rows)
    loss, grads, _ = loss_and_grads(shared, "logistic", rows)
    assert_same_loss(loss, expected_loss, "full fine-tuning")
    assert_same_gradients(grads, expected_grads, "full fine-tuning")


def repacked_4bit_layers(trainer) -> list[str]:
    """The 4-bit layers bitsandbytes switched to its CPU inference format (bf16, no backward): must stay empty."""
    from bitsandbytes.nn import Linear4bit

    layers = {name: m for name, m in trainer.model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    return [name for name, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def test_qlora_4bit_packed_prefix_shared_matches_padded(tiny_models, hh_dataset, tmp_path):
    """bitsandbytes nf4 base (float32 compute) + LoRA, reference through the disabled adapter, precomputed or not.

    The precompute is an eval-mode pass without gradients. On an AVX512-BF16 CPU, bitsandbytes 0.50 used to switch
    every 4-bit layer there to its bf16 inference kernel for the rest of the run, which has no backward (see
    gpo_trl.fourbit.keep_4bit_layers_differentiable): the padded gradients of the precomputed run then differed from
    those of the run that recomputes the reference by 92% (median over the 28 LoRA tensors), and the packed+prefix-
    shared ones from the padded ones by up to 1.9e-4. Fixed, the two runs' padded gradients are bit-identical.
    """
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    padded_grads = {}
    for precompute in (False, True):
        trainer = build(tiny_models["llama"], hh_dataset, tmp_path, quantization=nf4,
                        precompute_ref_log_probs=precompute, ref_logps_cache_dir=str(tmp_path / "ref_logps"),
                        padding_free=True, prefix_sharing=True)
        assert repacked_4bit_layers(trainer) == []
        rows = [trainer.train_dataset[i] for i in range(BATCH)]
        loss, grads, _ = loss_and_grads(trainer, "savage", rows)
        shared_collator, trainer.data_collator = trainer.data_collator, trainer._padded_collator
        expected_loss, expected_grads, _ = loss_and_grads(trainer, "savage", rows)
        assert shared_collator is not trainer.data_collator and "unpack_index" in shared_collator(rows)
        assert_same_loss(loss, expected_loss, f"QLoRA precompute={precompute}")
        assert_same_gradients(grads, expected_grads, f"QLoRA precompute={precompute}")
        padded_grads[precompute] = expected_grads
    assert_same_gradients(padded_grads[True], padded_grads[False], "QLoRA precomputed vs recomputed reference")


def test_qlora_gradients_unchanged_by_an_evaluation(tiny_models, hh_dataset, tmp_path):
    """`evaluate()` (e.g. `eval_before_training`) runs the 4-bit layers in eval mode without gradients, as the
    reference precompute does: the training gradients after it are those before it (they were 90% off after it on
    an AVX512-BF16 CPU, where bitsandbytes switched the layers to a kernel without backward)."""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    trainer = build(tiny_models["llama"], hh_dataset, tmp_path, quantization=nf4)
    rows = [trainer.train_dataset[i] for i in range(BATCH)]
    expected_loss, expected_grads, _ = loss_and_grads(trainer, "logistic", rows)
    assert "eval_loss" in trainer.evaluate(eval_dataset=trainer.train_dataset.select(range(BATCH)))
    assert repacked_4bit_layers(trainer) == []
    loss, grads, _ = loss_and_grads(trainer, "logistic", rows)
    assert loss.item() == expected_loss.item()
    assert_same_gradients(grads, expected_grads, "QLoRA after evaluate()", rtol=0.0)


def test_packed_batches_remove_padding_and_share_prompts(tiny_models, hh_dataset, tmp_path):
    padded = build(tiny_models["llama"], hh_dataset, tmp_path)
    rows = [padded.train_dataset[i] for i in range(BATCH)]
    batch = padded.data_collator(rows)
    real_tokens = batch["attention_mask"].sum().item()
    assert batch["input_ids"].numel() > real_tokens  # the padded batch wastes tokens on this data
    one_row = PackedPreferenceCollator(padded.data_collator, pad_token_id=0, strategy="one_row")(rows)
    assert one_row["input_ids"].shape == (1, real_tokens)  # no padding at all
    bins = PackedPreferenceCollator(padded.data_collator, pad_token_id=0, row_length=96)(rows)
    assert bins["input_ids"].size(1) <= 96 and bins["input_ids"].numel() <= batch["input_ids"].numel()
    # Prefix sharing computes each prompt once, plus the last prompt token once more per pair
    shared = PackedPreferenceCollator(padded.data_collator, pad_token_id=0, prefix_sharing=True, strategy="one_row")(rows)
    prompt_tokens = sum(min(len(row["prompt_ids"]), 96) for row in rows)
    assert shared["input_ids"].shape == (1, real_tokens - prompt_tokens + BATCH)
    # The same tokens are scored in every layout
    for layout in (one_row, bins, shared):
        assert (layout["labels"] != -100).sum() == (batch["completion_mask"][:, 1:] > 0).sum()
        assert (layout["unpack_index"] >= 0).sum() == (batch["completion_mask"][:, 1:] > 0).sum()


def test_best_fit_decreasing_bins():
    lengths = [7, 5, 4, 3, 2, 2, 1]
    bins = best_fit_decreasing(lengths, capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 3  # 24 tokens in bins of 8: optimal here
    assert best_fit_decreasing([10, 3], capacity=8) == [[0], [1]]  # a longer item gets its own bin


def test_unsupported_setups_are_refused_before_the_model_loads(hh_dataset, tmp_path):
    from peft import PromptTuningConfig

    missing = str(tmp_path / "no-such-model")  # loading it would fail: the layout check must come first
    cases = [
        (dict(prefix_sharing=True, model_init_kwargs={"attn_implementation": "flash_attention_2"}), {},
         "prefix_sharing.*attn_implementation='flash_attention_2'.*sdpa"),
        (dict(padding_free=True), dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
         "padding_free.*prompt-learning PEFT"),
        (dict(padding_free=True), dict(compute_metrics=lambda prediction: {}), "padding_free.*compute_metrics"),
    ]
    for config, extra, message in cases:
        args = GPOConfig(output_dir=str(tmp_path), **cpu_args(**config))
        with pytest.raises(ValueError, match=message):
            GPOTrainer(model=missing, args=args, train_dataset=hh_dataset, **extra)
    images = hh_dataset.add_column("images", [None] * len(hh_dataset))
    with pytest.raises(ValueError, match="padding_free.*text preference data only"):
        GPOTrainer(model=missing, args=GPOConfig(output_dir=str(tmp_path), **cpu_args(padding_free=True)),
                   train_dataset=images)


def test_flex_block_mask_allows_exactly_what_the_dense_branch_mask_allows(tiny_models, hh_dataset, tmp_path):
    """The BlockMask for flex_attention encodes the dense mask's rule cell for cell, on real packed prefix-shared rows
    (padding tails included), and the collator hands the ids for it instead of the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    padded = build(tiny_models["llama"], hh_dataset, tmp_path)
    rows = [padded.train_dataset[i] for i in range(BATCH)]
    collate = PackedPreferenceCollator(padded.data_collator, pad_token_id=0, prefix_sharing=True, row_length=96)
    dense = collate(rows)
    ids = PackedPreferenceCollator(padded.data_collator, pad_token_id=0, prefix_sharing=True, row_length=96,
                                   block_mask=True)(rows)
    assert "attention_mask" not in ids and ids["mask_document"].shape == ids["input_ids"].shape
    assert all(torch.equal(ids[k], dense[k]) for k in ("input_ids", "position_ids", "labels", "unpack_index"))
    document, branch = ids["mask_document"], ids["mask_branch"]
    assert len(document) > 1 and (branch == 2).any() and (document[:, -1] != document[:, 0]).any()  # rows, tails
    block = flex_block_mask(document, branch)
    assert block.shape == dense["attention_mask"].shape
    cells = create_mask(block.mask_mod, document.size(0), 1, document.size(1), document.size(1), device="cpu")
    assert torch.equal(cells, dense["attention_mask"])
    # The tiles are classified as torch's own create_block_mask (dense evaluation) classifies them
    reference = create_block_mask(block.mask_mod, document.size(0), None, document.size(1), document.size(1),
                                  device="cpu", BLOCK_SIZE=16)
    small = flex_block_mask(document, branch, block_size=16)  # small tiles: empty, partial and full ones all occur
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(small, name), getattr(reference, name)), name
    assert torch.equal(small.to_dense(), reference.to_dense()) and (small.full_kv_num_blocks > 0).any()
    assert (small.kv_num_blocks > 0).any() and (small.to_dense() == 0).any()
    assert torch.equal(branch_mask(document, branch), dense["attention_mask"])


@pytest.mark.slow
def test_flex_attention_forward_gives_the_dense_mask_log_probs(tiny_models, hh_dataset, tmp_path):
    """Packed + prefix-shared rows through flex_attention (BlockMask) and through sdpa (dense 4D mask): the same
    per-token log-probs in float32. Forward only: FlexAttention has no CPU backward (the GPU tests train with it).
    The trainer is built with sdpa (prefix sharing with flex is refused on the CPU) and switched for the forward."""
    trainer = build(tiny_models["llama"], hh_dataset, tmp_path, padding_free=True, prefix_sharing=True)
    rows = [trainer.train_dataset[i] for i in range(BATCH)]

    def log_probs():
        inputs = trainer._prepare_inputs(trainer.data_collator(rows))
        with torch.no_grad():
            return inputs, trainer._forward(trainer.model, inputs, fields=("log_probs",)).log_probs

    dense_inputs, expected = log_probs()
    trainer.model.get_base_model().set_attn_implementation("flex_attention")
    trainer.data_collator = trainer._packed_collator(trainer.args)
    flex_inputs, got = log_probs()
    assert "attention_mask" in dense_inputs and "mask_document" in flex_inputs and "attention_mask" not in flex_inputs
    scored = dense_inputs["completion_mask"][:, 1:].bool()
    assert scored.sum() > 100 and expected[scored].abs().min() > 0
    difference = (got - expected).abs().max().item()
    assert difference <= 1e-5, f"flex vs dense mask log-probs differ by {difference}"


def test_prefix_sharing_with_flex_attention_is_refused_on_the_cpu(hh_dataset, tmp_path):
    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(prefix_sharing=True, model_init_kwargs={
        "attn_implementation": "flex_attention"}))
    with pytest.raises(ValueError, match="flex_attention.*needs a GPU.*no backward pass on the CPU"):
        GPOTrainer(model=str(tmp_path / "no-such-model"), args=args, train_dataset=hh_dataset)


def test_prefix_sharing_refuses_keep_end_truncation(tmp_path):
    with pytest.raises(ValueError, match="prefix_sharing.*keep_start"):
        GPOConfig(output_dir=str(tmp_path), use_cpu=True, prefix_sharing=True, truncation_mode="keep_end", max_length=64)
    with pytest.raises(ValueError, match="packing_strategy.*bfd"):
        GPOConfig(output_dir=str(tmp_path), use_cpu=True, padding_free=True, packing_strategy="wrapped")


@pytest.mark.slow
def test_packed_prefix_shared_training_follows_the_padded_trajectory(tiny_models, hh_dataset, tmp_path):
    """Five optimizer steps with the reference pass: every logged value equals the padded run's within 1e-4.
    Plain SGD: Adam divides by the root of tiny second moments, which magnifies float32 rounding step after step."""
    common = dict(max_steps=5, optim="sgd", learning_rate=0.05, per_device_train_batch_size=4, max_length=96)
    runs = {}
    for name, kwargs in {"padded": {}, "packed+shared": dict(padding_free=True, prefix_sharing=True)}.items():
        args = GPOConfig(output_dir=str(tmp_path / name), **cpu_args(**common, **kwargs))
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=hh_dataset)
        trainer.train()
        runs[name] = logged_steps(trainer)
    assert runs["padded"][-1]["rewards/margins"] > runs["padded"][0]["rewards/margins"] + 0.1
    for step, (expected, got) in enumerate(zip(runs["padded"], runs["packed+shared"]), start=1):
        for key, value in expected.items():
            if key not in ("grad_norm",):
                assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), f"step {step} {key}: {got[key]} vs {value}"


@pytest.mark.slow
def test_benchmark_reports_every_layout_with_ratios(tmp_path):
    """scripts/benchmark.py end to end at toy size. Its ratios are recomputed here from the raw per-step times it
    reports, and its token accounting is cross-checked between layouts: every layout is credited with the same real
    tokens, the packed layout fills exactly those cells, and the prefix-shared one the real tokens minus one copy of
    each prompt plus one token per pair (the prompt share comes from TRL's padded batch, the cells from the units).
    Without the peak-memory runs (`--no-memory`, half the time): the memory sampler is checked by the reference-free
    test below."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out, batch, steps = tmp_path / "bench.json", 4, 2
    subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--rows", "16", "--batch", str(batch),
                    "--max_length", "256", "--steps", str(steps), "--warmup", "1", "--losses", "logistic", "squared",
                    "--settings", "lora+precompute", "--no-memory", "--json", str(out)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads(out.read_text())["results"]
    assert all(row["peak_memory_mb"] is None for row in results if row["part"] != "overhead")
    check_benchmark_results(results, batch, steps)


def check_benchmark_results(results: list[dict], batch: int, steps: int):
    import statistics

    parts = {part: {r["name"]: r for r in results if r["part"] == part} for part in ("losses", "layouts", "overhead")}
    assert {"TRL DPO (sigmoid)", "GPO logistic", "GPO squared", "TRL DPOTrainer, own model",
            "floor (policy fwd+bwd)"} == parts["losses"].keys()
    assert {"TRL DPO padded", "GPO padded", "GPO length-grouped", "GPO packed", "GPO prefix-shared",
            "GPO packed+prefix-shared"} == parts["layouts"].keys()
    for part, baseline in (("losses", "TRL DPO (sigmoid)"), ("layouts", "TRL DPO padded")):
        base_times = parts[part][baseline]["step_times_s"]
        for name, row in parts[part].items():
            times = row["step_times_s"]
            assert len(times) == steps and all(t > 0 for t in times), name
            assert row["step_time_s"] == statistics.median(times), name
            assert row["step_time_ratio"] == statistics.median([t / b for t, b in zip(times, base_times)]), name
            assert row["tokens_per_s"] == pytest.approx(sum(row["tokens_per_step"]) / sum(times), rel=1e-12), name
            assert row["padding_fraction"] == pytest.approx(
                1 - sum(row["filled_per_step"]) / sum(row["cells_per_step"]), rel=1e-12), name
        assert parts[part][baseline]["step_time_ratio"] == 1.0
    floor = parts["losses"]["floor (policy fwd+bwd)"]["step_times_s"]
    for name, row in parts["losses"].items():
        assert row["vs_floor"] == statistics.median([t / f for t, f in zip(row["step_times_s"], floor)]), name
    layouts = parts["layouts"]
    tokens = layouts["TRL DPO padded"]["tokens_per_step"]
    for name in ("GPO padded", "GPO packed", "GPO prefix-shared", "GPO packed+prefix-shared"):
        assert layouts[name]["tokens_per_step"] == tokens, name  # the same batches, the same work credited
    for name in ("TRL DPO padded", "GPO padded", "GPO packed"):
        assert layouts[name]["filled_per_step"] == tokens, name
    prompt_share = layouts["GPO padded"]["prompt_token_share"]
    for name in ("GPO prefix-shared", "GPO packed+prefix-shared"):  # prompt once (half the prompt tokens) + 1 per pair
        expected = sum(tokens) * (1 - prompt_share / 2) + batch * steps
        assert sum(layouts[name]["filled_per_step"]) == pytest.approx(expected, abs=1e-6), name
    assert layouts["TRL DPO padded"]["padding_fraction"] == layouts["GPO padded"]["padding_fraction"] > 0.1
    assert layouts["GPO packed"]["padding_fraction"] < layouts["GPO padded"]["padding_fraction"]
    overhead = parts["overhead"]
    assert {"TRL DPO (sigmoid)", "GPO logistic", "GPO squared"} == overhead.keys()
    trl_ms = overhead["TRL DPO (sigmoid)"]["loss_path_ms"]
    for name, row in overhead.items():
        assert row["loss_path_ms"] > 0 and (row["gradient_check_ms"] > 0) == name.startswith("GPO"), name
        assert row["extra_ms_vs_trl"] == pytest.approx(row["loss_path_ms"] + row["gradient_check_ms"] - trl_ms), name


@pytest.mark.slow
def test_benchmark_reference_free_part_counts_one_forward_without_the_reference(tmp_path):
    """scripts/benchmark.py --parts reference_free end to end at toy size, LoRA and full fine-tuning: with the
    reference a step runs two model forwards (LoRA: the disabled-adapter pass; full: the separate reference model),
    reference-free SimPO and the floor one; all run the same batches; the ratios are those of the recorded times."""
    import json
    import os
    import statistics
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--rows", "8", "--batch", "2",
                    "--max_length", "96", "--steps", "2", "--warmup", "0", "--parts", "reference_free",
                    "--memory_rounds", "1", "--json", str(out)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads(out.read_text())["results"]
    for setting in ("lora", "full"):
        rows = {r["name"]: r for r in results if r["part"] == "reference_free" and r["setting"] == setting}
        reference, free, floor = (rows[name] for name in ("GPO logistic, reference", "SimPO (reference-free)",
                                                          "floor (policy fwd+bwd)"))
        assert reference["forwards_per_step"] == [2, 2], setting
        assert free["forwards_per_step"] == [1, 1] == floor["forwards_per_step"], setting
        # the same batches: the same real tokens in total
        tokens = [r["tokens_per_s"] * sum(r["step_times_s"]) for r in (reference, free, floor)]
        assert max(tokens) - min(tokens) < 1e-6 * tokens[0]
        ratios = [f / r for f, r in zip(free["step_times_s"], reference["step_times_s"])]
        assert free["step_time_ratio"] == statistics.median(ratios) and reference["step_time_ratio"] == 1.0
        assert free["tokens_per_s_ratio"] == statistics.median([1 / r for r in ratios])
        assert reference["memory_with_load_ratio"] == 1.0 and reference["peak_memory_with_load_mb"] > 0
        with_load = free["peak_memory_with_load_mb"] / reference["peak_memory_with_load_mb"]
        assert free["memory_with_load_ratio"] == with_load
        assert free["peak_memory_mb"] > 0 and free["memory_ratio"] > 0
