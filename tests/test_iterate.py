"""`gpo-trl iterate` (on-policy rounds with a judge) and `gpo-trl evaluate --generate / --compare`, on a tiny Llama
first trained a little as a plain language model on the demo texts, so that it samples varied, demo-like answers of
different lengths and stops with EOS. Every expectation is recomputed here from the written files."""

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_jsonl
from gpo_trl import iterate
from gpo_trl.cli import main as cli
from gpo_trl.demo import save_talking_model
from gpo_trl.generation import Sample
from gpo_trl.judges import make_judge, make_pairs, score_samples
from gpo_trl.recipe import ConfigError

BASE_RECIPE = dict(
    gpo_loss="logistic", beta=0.1, use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
    lora_target_modules="all-linear", output_dir="unused", num_train_epochs=3, per_device_train_batch_size=8,
    learning_rate=5.0e-3, max_length=96, seed=0, use_cpu=True, bf16=False, activation_checkpointing=False,
    logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", dataloader_num_workers=0,
    disable_tqdm=True)
SHORTER = {"aux": "length", "weight": -1}


@pytest.fixture(scope="module")
def talking_model(tiny_models, demo_rows, tmp_path_factory) -> Path:
    """The tiny Llama after 150 causal-LM steps on the demo's prompt + answer texts."""
    texts = [r["prompt"] + r[side] for r in demo_rows["train"] for side in ("chosen", "rejected")]
    return save_talking_model(tmp_path_factory.mktemp("talking") / "model", tiny_models["llama"], texts)


@pytest.fixture(scope="module")
def prompt_files(demo_rows, tmp_path_factory) -> dict[str, Path]:
    """Training prompts as a prompt-only file (32 distinct prompts) and the held-out topics as preference rows."""
    root = tmp_path_factory.mktemp("prompts")
    prompts = list(dict.fromkeys(r["prompt"] for r in demo_rows["train"]))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows["test"]))
    return {"train": root / "prompts.jsonl", "held_out": root / "held_out.jsonl"}


def write_plan(root: Path, model: Path, prompt_file: Path, **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "base.yaml").write_text(yaml.safe_dump({**BASE_RECIPE, "model_name_or_path": str(model)}))
    plan = {"base": "base.yaml", "output_dir": str(root / "out"), "prompts": {"data_files": str(prompt_file)},
            "rounds": 2, "samples_per_prompt": 4, "generation": {"max_new_tokens": 40, "batch_size": 32},
            "judge": SHORTER, "pairing": "best_vs_worst", "reference": "initial", **changes}
    (root / "rounds.yaml").write_text(yaml.safe_dump(plan))
    return root / "rounds.yaml"


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def iterated(talking_model, prompt_files, tmp_path_factory) -> dict:
    """Two rounds, interrupted (KeyboardInterrupt, as from SIGINT) when round 2 starts training, then resumed twice;
    records which steps ran in each resume and the files' modification times."""
    path = write_plan(tmp_path_factory.mktemp("iterate"), talking_model, prompt_files["train"])
    out = path.parent / "out"
    real = {name: getattr(iterate, name) for name in ("sample_round", "train_round", "merge_round")}
    observed = {"path": path, "out": out, "model": talking_model}

    def interrupt_round_2(plan, k, recipe):
        if k == 2:
            raise KeyboardInterrupt
        return real["train_round"](plan, k, recipe)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iterate, "train_round", interrupt_round_2)
        with pytest.raises(KeyboardInterrupt):
            iterate.run_iterate(iterate.load_plan(str(path)))
    observed["after_kill"] = {"round_1": mtimes(out / "round_1"), "round_2": mtimes(out / "round_2"),
                              "rounds": read_jsonl(out / "rounds.jsonl")}
    for resume in ("resume", "rerun"):
        calls = {name: [] for name in real}
        with pytest.MonkeyPatch.context() as patch:
            for name, function in real.items():
                def counted(*args, _name=name, _function=function):
                    calls[_name].append(str(args[1]))  # the round number, or merge_round's adapter folder
                    return _function(*args)
                patch.setattr(iterate, name, counted)
            assert cli(["iterate", "--config", str(path)]) == 0
        observed[resume] = {"calls": calls, "round_1": mtimes(out / "round_1"), "round_2": mtimes(out / "round_2"),
                            "rounds": read_jsonl(out / "rounds.jsonl")}
    return observed


@pytest.mark.slow
def test_two_rounds_under_a_length_judge_shorten_the_samples(iterated):
    out = iterated["out"]
    rows = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:  # the row's statistics, recomputed from the round's samples and pairs
        samples = read_jsonl(out / f"round_{row['round']}" / "samples.jsonl")
        words = [len(s["completion"].split()) for s in samples]
        assert [s["score"] for s in samples] == [-w for w in words]  # aux:length, weight -1
        assert row["mean_completion_words"] == statistics.fmean(words) and row["samples"] == 32 * 4
        assert row["judge_mean"] == -statistics.fmean(words)
        by_prompt = {}
        for s in samples:
            by_prompt.setdefault(s["prompt_index"], []).append(s["score"])
        assert row["ties"] == sum(max(v) == min(v) for v in by_prompt.values())
        pairs = read_jsonl(out / f"round_{row['round']}" / "pairs.jsonl")
        assert row["pairs"] == len(pairs) == 32 - row["ties"]
        for pair in pairs:  # best vs worst of the pair's prompt
            scores = by_prompt[next(s["prompt_index"] for s in samples if s["prompt"] == pair["prompt"])]
            assert (pair["score_chosen"], pair["score_rejected"]) == (max(scores), min(scores))
            assert pair["score_chosen"] == -len(pair["chosen"].split())
    first, second = rows
    # Round 2 samples from round 1's policy. Measured with seeds 0, 1, 2 (sampling and training): 13.6 -> 2.5,
    # 13.1 -> 4.0, 14.4 -> 3.4 words per completion (ratios 0.18-0.31).
    assert second["mean_completion_words"] < 0.5 * first["mean_completion_words"]
    assert second["mean_completion_tokens"] < first["mean_completion_tokens"]
    assert second["judge_mean"] > first["judge_mean"]


@pytest.mark.slow
def test_rounds_chain_policies_and_keep_the_initial_reference(iterated):
    out, model = iterated["out"], iterated["model"]
    recipes = [yaml.safe_load((out / f"round_{k}" / "recipe.yaml").read_text()) for k in (1, 2)]
    assert recipes[0]["model_name_or_path"] == str(model) and "ref_model_name_or_path" not in recipes[0]
    assert recipes[1]["model_name_or_path"] == str(out / "round_1" / "policy")
    assert recipes[1]["ref_model_name_or_path"] == str(model)  # reference: initial
    adapter_base = json.loads((out / "round_2" / "adapter" / "adapter_config.json").read_text())
    assert adapter_base["base_model_name_or_path"] == str(out / "round_1" / "policy")
    # The merged policy computes what its starting model + the round's adapter compute
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer("User: How do I learn chess?\nAssistant: Sure", return_tensors="pt").input_ids
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "round_1" / "policy"),
                                         out / "round_2" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "round_2" / "policy").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits,
                                  AutoModelForCausalLM.from_pretrained(out / "round_1" / "policy")(ids).logits)


@pytest.mark.slow
def test_resume_after_a_kill_redoes_nothing(iterated):
    killed, resume, rerun = iterated["after_kill"], iterated["resume"], iterated["rerun"]
    assert [r["round"] for r in killed["rounds"]] == [1]
    assert "pairs.jsonl" in killed["round_2"] and not any(k.startswith("adapter/") for k in killed["round_2"])
    # Resume: round 1 untouched, round 2's pairs reused (not resampled), only round 2's training and merge run
    assert resume["calls"] == {"sample_round": [], "train_round": ["2"],
                               "merge_round": [str(iterated["out"] / "round_2" / "adapter")]}
    assert resume["round_1"] == killed["round_1"]
    for name in ("pairs.jsonl", "samples.jsonl", "sampling.json"):
        assert resume["round_2"][name] == killed["round_2"][name]
    assert resume["rounds"][0] == killed["rounds"][0] and len(resume["rounds"]) == 2
    # A rerun of a finished run does nothing at all
    assert rerun["calls"] == {"sample_round": [], "train_round": [], "merge_round": []}
    assert rerun["round_1"] == resume["round_1"] and rerun["round_2"] == resume["round_2"]
    assert rerun["rounds"] == resume["rounds"]


@pytest.mark.parametrize("judge, problem", [("custom_judges:nan_on", "returned nan"),
                                            ("custom_judges:raises_on", "raised ConnectionError")])
def test_a_failing_judge_names_the_prompt_before_training(judge, problem, tiny_models, prompt_files, tmp_path,
                                                          capsys):
    prompts = [json.loads(line)["prompt"] for line in prompt_files["train"].read_text().splitlines()]
    topic = prompts[13].removeprefix("User: How do I ").removesuffix("?\nAssistant:")  # fails on this prompt only
    path = write_plan(tmp_path, tiny_models["llama"], prompt_files["train"], rounds=1, samples_per_prompt=2,
                      generation={"max_new_tokens": 4}, judge={"aux": judge, "kwargs": {"word": topic}})
    assert [i for i, p in enumerate(prompts) if topic in p] == [13]
    assert cli(["iterate", "--config", str(path)]) == 1
    error = capsys.readouterr().err
    assert "on prompt index 13 (sample 0)" in error and problem in error and "JudgeError" in error
    round_dir = tmp_path / "out" / "round_1"
    assert not (round_dir / "pairs.jsonl").exists() and not (round_dir / "adapter").exists()


@pytest.mark.parametrize("change, message", [
    ({"sampels_per_prompt": 4}, "Unknown key 'sampels_per_prompt' in iterate file"),
    ({"samples_per_prompt": 1}, "`samples_per_prompt` must be an integer >= 2"),
    ({"pairing": "best"}, "`pairing` must be one of ['best_vs_worst', 'all_pairs', 'random_pair']"),
    ({"reference": "base"}, "`reference` must be one of ['initial', 'previous']"),
    ({"generation_backend": "vllm"}, "vLLM is not installed"),
    ({"generation": {"max_new_token": 8}}, "Did you mean 'max_new_tokens'?"),
    ({"judge": "length"}, "a judge given as text is `aux:<reward>`"),
    ({"judge": {"aux": "lenght"}}, "Unknown reward 'lenght'"),
    ({"prompts": {"data_file": "x.jsonl"}}, "Did you mean 'data_files'?"),
    ({"overrides": {"model_name_or_path": "x"}}, "iterate sets for each round"),
    ({"overrides": {"bta": 0.2}}, "Unknown key 'bta' in the YAML recipe. Did you mean 'beta'?"),
])
def test_bad_iterate_files_fail_before_any_model_loads(change, message, tmp_path, prompt_files):
    if change.get("generation_backend") == "vllm" and _vllm_installed():
        pytest.skip("vLLM is installed here, so asking for it is not an error")
    path = write_plan(tmp_path, tmp_path / "no-model-needed", prompt_files["train"], **change)
    with pytest.raises(ConfigError) as error:
        iterate.load_plan(str(path))
    assert message in str(error.value)


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _samples(scores_by_prompt: list[list[float]]) -> tuple[list[Sample], list[float]]:
    samples = [Sample(i, j, "", [1], [2]) for i, scores in enumerate(scores_by_prompt) for j in range(len(scores))]
    return samples, [s for scores in scores_by_prompt for s in scores]


def test_pairings_and_ties():
    samples, scores = _samples([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, 4.0, 4.0]])
    # positions: prompt 0 -> 0, 1, 2; prompt 1 -> 3, 4, 5; prompt 2 -> 6, 7, 8
    assert make_pairs(samples, scores, "best_vs_worst", seed=0) == ([(1, 0), (7, 6)], 1)
    assert make_pairs(samples, scores, "all_pairs", seed=0) == ([(1, 0), (2, 0), (1, 2), (7, 6), (8, 6)], 4)
    pairs, ties = make_pairs(samples, scores, "random_pair", seed=0)
    assert ties + len(pairs) == 3 and all(scores[a] > scores[b] for a, b in pairs)
    assert all(samples[a].prompt_index == samples[b].prompt_index for a, b in pairs)


def test_pairwise_judge_scores_round_robin_wins():
    texts = ["a", "abcd", "ab", "abc"]
    samples = [Sample(0, j, t, [1], [2]) for j, t in enumerate(texts)] + [Sample(1, 0, "xx", [1], [2]),
                                                                         Sample(1, 1, "x", [1], [2])]
    scores = score_samples(make_judge({"pairwise": "custom_judges:prefer_shorter"}), ["p0", "p1"], samples)
    assert scores == [3, 0, 2, 1, 0, 1]  # wins among the samples of the same prompt: the shortest beats all


def test_reward_model_judge_is_the_classifier_logit(tiny_models, tmp_path):
    """Batched, padded scoring equals one unpadded forward per text."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = AutoConfig.from_pretrained(tiny_models["llama"], num_labels=1)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    completions = [" Sure, here is how: take your time, good luck!", " No.", " Not my problem. Go away."]
    samples = [Sample(0, j, c, [1], [2]) for j, c in enumerate(completions)]
    prompt = "User: How do I make tea?\nAssistant:"
    scores = score_samples(make_judge({"reward_model": str(tmp_path / "rm"), "batch_size": 2}), [prompt], samples)
    with torch.no_grad():
        expected = [classifier(**tokenizer(prompt + c, return_tensors="pt")).logits[0, 0].item() for c in completions]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3


# --- evaluate --generate / --compare --------------------------------------------------------------------------


def sequence_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt), one unpadded forward, summed token by token."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logps[len(prompt_ids) - 1 + t, token].item() for t, token in enumerate(completion_ids))


@pytest.mark.slow
def test_evaluate_generate_compare_win_rate_and_kl(iterated, prompt_files, tmp_path, capsys):
    out, model = iterated["out"], iterated["model"]
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "prompts": {"data_files": str(prompt_files["held_out"])}, "samples_per_prompt": 2,
        "generation": {"max_new_tokens": 40}, "judge": SHORTER, "bootstrap_samples": 500}))
    policies = [out / "round_1" / "adapter", out / "round_2" / "policy"]  # a LoRA adapter and a full model
    assert cli(["evaluate", "--compare", "--config", str(config), *map(str, policies),
                "--out", str(tmp_path / "table")]) == 0
    printed = capsys.readouterr().out
    compared = json.loads((tmp_path / "table" / "compare.json").read_text())
    assert [c["policy"] for c in compared] == list(map(str, policies))
    tokenizer = AutoTokenizer.from_pretrained(model)
    base_model = AutoModelForCausalLM.from_pretrained(model).eval()
    policy_models = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), policies[0]).eval(),
                     AutoModelForCausalLM.from_pretrained(policies[1]).eval()]
    base_rows = []
    for policy_dir, policy_model, summary in zip(policies, policy_models, compared):
        rows = read_jsonl(policy_dir / "generate_eval" / "samples.jsonl")
        assert json.loads((policy_dir / "generate_eval" / "summary.json").read_text()) == summary
        base = {(r["prompt_index"], r["sample_index"]): r for r in rows if r["model"] == "base"}
        policy = [r for r in rows if r["model"] == "policy"]
        assert len(policy) == len(base) == 8 * 2 == summary["samples"]
        for r in rows:  # the recorded tokens are the text, and the score is the judge's
            assert tokenizer.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"]
            assert r["score"] == -len(r["completion"].split())
        opponents = [base[(p["prompt_index"], p["sample_index"])]["score"] for p in policy]
        outcomes = [(p["score"] > other) - (p["score"] < other) for p, other in zip(policy, opponents)]
        assert summary["win_rate"] == outcomes.count(1) / len(outcomes)
        assert summary["tie_rate"] == outcomes.count(0) / len(outcomes)
        assert summary["judge_mean"] == statistics.fmean(p["score"] for p in policy)
        assert summary["mean_tokens"] == statistics.fmean(len(p["completion_ids"]) for p in policy)
        low, high = summary["judge_ci95"]
        spread = 1.96 * statistics.pstdev(p["score"] for p in policy) / len(policy) ** 0.5
        assert low <= summary["judge_mean"] <= high and 0.6 * spread < (high - low) / 2 < 1.4 * spread
        # KL from the policy's own samples, recomputed with independent unpadded forwards
        ratios = [sequence_logprob(policy_model, p["prompt_ids"], p["completion_ids"])
                  - sequence_logprob(base_model, p["prompt_ids"], p["completion_ids"]) for p in policy]
        assert summary["kl"] == pytest.approx(statistics.fmean(ratios), rel=1e-4, abs=1e-4)
        assert summary["kl"] > 0 and not summary["kl_from_tempered"]
        assert str(policy_dir) in printed
        base_rows.append(sorted(base.items()))
    # Same seeds: the base samples are the same whether the base ran as a disabled adapter or as its own model
    assert base_rows[0] == base_rows[1]
    assert compared[0]["win_rate"] > 0.5 and compared[0]["mean_tokens"] < compared[0]["base_mean_tokens"]


def test_sweep_checks_its_generation_file_first(tmp_path, prompt_files):
    from test_sweep import write_sweep

    from gpo_trl.experiments.sweep import load_sweep

    bad = tmp_path / "generate.yaml"
    bad.write_text(yaml.safe_dump({"prompts": {"data_files": str(prompt_files["held_out"])}, "judge": SHORTER,
                                   "samples_per_promt": 2}))
    with pytest.raises(ConfigError, match="Unknown key 'samples_per_promt'.*Did you mean 'samples_per_prompt'"):
        load_sweep(str(write_sweep(tmp_path, evaluate_generate=str(bad))))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_ref_model_name_or_path_is_the_reference(tiny_models, talking_model, demo_rows, tmp_path):
    """The recipe key iterate uses for `reference: initial`: a reference other than the starting model. At the first
    step the policy is its starting model, so the margins are exactly 0 against it and not 0 against another model."""
    from conftest import logged_steps
    from gpo_trl.recipe import main as recipe_main
    from gpo_trl.recipe import parse_args

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in demo_rows["train"][:8]))
    recipe = {**BASE_RECIPE, "model_name_or_path": str(tiny_models["llama"]), "datasets": [{"data_files": str(pairs)}],
              "max_steps": 1, "output_dir": str(tmp_path / "out")}
    first_steps = {}
    for name, reference in (("itself", None), ("other", str(talking_model))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**recipe, **({"ref_model_name_or_path": reference} if reference else {})}))
        trainer, _, _ = recipe_main(*parse_args(["--config", str(path)]))
        first_steps[name] = logged_steps(trainer)[0]
        if reference:
            expected = AutoModelForCausalLM.from_pretrained(talking_model).state_dict()
            held = trainer.ref_model.state_dict()
            common = expected.keys() & held.keys()  # TRL's fused LM head may rename lm_head's weight
            assert len(common) >= len(expected) - 1 and all(torch.equal(held[k], expected[k]) for k in common)
            assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert first_steps["itself"]["rewards/margins"] == 0
    assert first_steps["itself"]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # f(0) = log 2
    assert abs(first_steps["other"]["rewards/margins"]) > 0.01
