"""`gpo-trl iterate` (on-policy rounds with a judge) and `gpo-trl evaluate --generate / --compare`, on a tiny Llama
first trained a little as a plain language model on the demo texts, so that it samples varied, demo-like answers of
different lengths and stops with EOS. Every expectation is recomputed here from the written files."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_jsonl
from gpo_trl.online import iterate
from gpo_trl.cli import main as cli
from gpo_trl.demo import save_talking_model
from gpo_trl.online.generation import Sample, load_prompts
from gpo_trl.online.judges import make_judge, make_pairs, score_samples
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
    # Round 2 samples from round 1's policy. Measured at seed 0, training on the sampled ids: 13.6 -> 1.5 words per
    # completion (before, with re-tokenised text pairs, seeds 0, 1, 2: 13.6 -> 2.5, 13.1 -> 4.0, 14.4 -> 3.4).
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
        low, high = summary["judge_ci95"]  # a bootstrap over the 8 prompts, each with its 2 samples
        prompt_means = [statistics.fmean(p["score"] for p in policy if p["prompt_index"] == i) for i in range(8)]
        spread = 1.96 * statistics.pstdev(prompt_means) / 8 ** 0.5
        assert low <= summary["judge_mean"] <= high and 0.6 * spread < (high - low) / 2 < 1.4 * spread
        # KL from the policy's own samples, recomputed with independent unpadded forwards
        ratios = [sequence_logprob(policy_model, p["prompt_ids"], p["completion_ids"])
                  - sequence_logprob(base_model, p["prompt_ids"], p["completion_ids"]) for p in policy]
        assert summary["kl"] == pytest.approx(statistics.fmean(ratios), rel=1e-4, abs=1e-4)
        assert summary["kl"] > 0 and not summary["kl_from_tempered"] and summary["kl_distorted_by"] == []
        assert summary["generation_config_ignored"] == {} and summary["prompts"] == 8
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


# --- Training sees exactly the sampled tokens -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_model(tiny_models, tmp_path_factory) -> Path:
    """The random-init tiny Llama with a tokenizer that adds BOS to every text, as Llama's tokenizers do."""
    from tokenizers import processors

    path = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_models["llama"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("Hi").input_ids[0] == bos[1]
    return path


def test_a_round_trains_on_the_ids_it_sampled(bos_model, prompt_files, tmp_path):
    """The first step's logged log-probs are those of the sampled ids (one plain forward per sequence here), for a
    model whose samples do not survive decode -> encode and a tokenizer that adds BOS."""
    from conftest import logged_steps
    from gpo_trl.recipe import main as recipe_main
    from gpo_trl.recipe import parse_args

    path = write_plan(tmp_path, bos_model, prompt_files["train"], rounds=1, max_prompts=6, samples_per_prompt=2,
                      generation={"max_new_tokens": 10, "batch_size": 6},
                      judge={"aux": "length", "weight": -1, "kwargs": {"unit": "chars"}},
                      overrides={"max_steps": 1, "per_device_train_batch_size": 16})
    plan = iterate.load_plan(str(path))
    round_dir = plan.output_dir / "round_1"
    recipe = iterate.write_round_recipe(plan, round_dir, str(bos_model), round_dir / "pairs.jsonl", None)
    iterate.sample_round(plan, 1, str(bos_model), load_prompts(plan.prompts, plan.max_prompts), round_dir)
    pairs = read_jsonl(round_dir / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(bos_model)
    assert len(pairs) >= 4 and all(p["prompt_ids"] == tokenizer(p["prompt"]).input_ids for p in pairs)
    assert all(p["prompt_ids"][0] == tokenizer.bos_token_id for p in pairs)
    retokenised = [tokenizer(p["prompt"] + p[side]).input_ids for p in pairs for side in ("chosen", "rejected")]
    sampled = [p["prompt_ids"] + p[f"{side}_ids"] for p in pairs for side in ("chosen", "rejected")]
    assert sum(a != b for a, b in zip(retokenised, sampled)) >= len(sampled) // 2  # text would train other tokens

    trainer, _, _ = recipe_main(*parse_args(["--config", str(recipe)]))
    first = logged_steps(trainer)[0]
    model = AutoModelForCausalLM.from_pretrained(bos_model).eval()  # the policy at step 1: LoRA starts at zero
    for side in ("chosen", "rejected"):
        expected = statistics.fmean(sequence_logprob(model, p["prompt_ids"], p[f"{side}_ids"]) for p in pairs)
        assert first[f"logps/{side}"] == pytest.approx(expected, abs=2e-3), side


# --- Bad input and interrupted runs (issue #21's iterate cases) -------------------------------------------------


class Sampled(Exception):
    """Raised by a stand-in for sample_round: reaching it means every check before sampling passed."""


def _round_1_defined_with_another_judge(path: Path):
    plan = iterate.load_plan(str(path))
    prompts = load_prompts(plan.prompts)
    other = {**plan.spec, "judge": {"aux": "length", "weight": -2}}
    plan.spec = other
    iterate.check_definition(plan, iterate.definition(plan, prompts), restart=False)
    (plan.output_dir / "round_1").mkdir()
    (plan.output_dir / "round_1" / "round.json").write_text("{}")


def _unrelated_files_in_output_dir(path: Path):
    out = path.parent / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")


# (what is wrong: a change to the iterate file, a setup of its folder), the message; all before any sampling
BAD_ITERATE_RUNS = {
    "missing prompts file": ({"prompts": {"data_files": "missing.jsonl"}}, None,
                             "data file missing.jsonl does not exist"),
    "empty prompts file": ({"prompts": {"data_files": "EMPTY"}}, None, "EMPTY is empty"),
    "output_dir is a file": ({"output_dir": "FILE"}, None, "is a file; iterate writes a folder of rounds there"),
    "unknown launch option": ({"launch": ["--num_proceses", "2"]}, None,
                              "`launch` has '--num_proceses', which is not a launch option"),
    "unknown accelerate flag": ({"launch": ["--", "--no_such_flag"]}, None,
                                "`accelerate launch` has no option '--no_such_flag'"),
    "bad launch value": ({"launch": ["--num_processes", "two"]}, None, "invalid literal for int()"),
    "another definition": ({}, _round_1_defined_with_another_judge,
                           "holds rounds made with another definition: judge.weight changed"),
    "a folder of other files": ({}, _unrelated_files_in_output_dir, "is not empty and holds no iterate.json"),
    "negative missing_eos_penalty": ({"missing_eos_penalty": -1}, None, "`missing_eos_penalty` must be a number >= 0"),
    "bad merge_dtype": ({"merge_dtype": "fp8"}, None, "`merge_dtype` must be one of"),
    "unknown generation processor": ({"generation": {"processors": {"repetition_penalt": 1.2}}}, None,
                                     "Did you mean 'repetition_penalty'?"),
}


@pytest.mark.parametrize("case", BAD_ITERATE_RUNS)
def test_bad_iterate_runs_get_one_line_before_sampling(case, prompt_files, tmp_path, capsys, monkeypatch):
    change, setup, message = BAD_ITERATE_RUNS[case]
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "FILE").write_text("not a folder")
    change = json.loads(json.dumps(change).replace('"EMPTY"', json.dumps(str(tmp_path / "EMPTY")))
                        .replace('"FILE"', json.dumps(str(tmp_path / "FILE"))))
    path = write_plan(tmp_path, tmp_path / "no-model-needed", prompt_files["train"], **change)
    if setup:
        setup(path)
    monkeypatch.setattr(iterate, "sample_round", lambda *args: (_ for _ in ()).throw(Sampled()))
    monkeypatch.chdir(tmp_path)
    assert cli(["iterate", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
    report = error[error.index("gpo-trl: "):].strip().splitlines()  # after any progress bar of `datasets`
    assert len(report) == 2 and report[0] in ("gpo-trl: ConfigError:", "gpo-trl: DataError:", "gpo-trl: MissingInputError:"), report


def test_restart_deletes_the_rounds_of_another_definition(prompt_files, tmp_path, monkeypatch):
    path = write_plan(tmp_path, tmp_path / "no-model-needed", prompt_files["train"])
    _round_1_defined_with_another_judge(path)
    monkeypatch.setattr(iterate, "sample_round", lambda *args: (_ for _ in ()).throw(Sampled()))
    with pytest.raises(Sampled):
        cli(["iterate", "--config", str(path), "--restart"])
    out = tmp_path / "out"
    assert json.loads((out / "iterate.json").read_text())["definition"]["judge"] == SHORTER
    assert not (out / "round_1" / "round.json").exists()  # round 1 was started afresh (recipe.yaml only)
    assert sorted(p.name for p in (out / "round_1").iterdir()) == ["recipe.yaml"]


def test_a_round_interrupted_in_training_resumes_from_its_checkpoint(tiny_models, prompt_files, tmp_path,
                                                                      monkeypatch):
    """A real SIGTERM at step 2 of 3 (the recipe checkpoints every step): the rerun trains step 3 only."""
    import os
    import signal

    from gpo_trl.guards import PreemptionCallback
    from gpo_trl.trainer import GPOTrainer

    path = write_plan(tmp_path, tiny_models["llama"], prompt_files["train"], rounds=1, max_prompts=4,
                      samples_per_prompt=2, generation={"max_new_tokens": 6},
                      judge={"aux": "length", "weight": -1, "kwargs": {"unit": "chars"}},
                      overrides={"max_steps": 3, "per_device_train_batch_size": 2, "save_strategy": "steps",
                                 "save_steps": 1})
    real_step_end, steps = PreemptionCallback.on_step_end, []

    def terminated_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2 and not steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", terminated_at_step_2)
    with pytest.raises(RuntimeError, match="interrupted by signal"):
        iterate.run_iterate(iterate.load_plan(str(path)))
    adapter = tmp_path / "out" / "round_1" / "adapter"
    assert (adapter / "checkpoint-2" / "trainer_state.json").is_file() and not (adapter / "gpo_run.json").exists()
    real_training_step = GPOTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return real_training_step(self, *args, **kwargs)

    monkeypatch.setattr(GPOTrainer, "training_step", counted)
    rows = iterate.run_iterate(iterate.load_plan(str(path)))
    assert steps == [2] and rows[0]["steps"] == 3  # one step, the third (global_step counts those before it)
    assert rows[0]["merge_dtype"] == "float32" and rows[0]["merge_max_abs_logp_diff"] <= 1e-5


# --- The stated sampling distribution, and intervals by prompt ----------------------------------------------------


def test_generation_config_processors_are_off_unless_asked_for(talking_model, prompt_files, tmp_path):
    """A model that ships repetition_penalty 1.3 samples what it samples without it; turned on in `processors`, the
    penalty applies and is named as what the samples (and a KL from them) were drawn with."""
    from gpo_trl.online.generation import make_generation, sample_completions, shipped_processors

    model = AutoModelForCausalLM.from_pretrained(talking_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(talking_model)
    prompts = load_prompts(make_generation and iterate.make_prompt_source({"data_files": str(prompt_files["train"])}),
                           max_prompts=4)
    plain = make_generation({"max_new_tokens": 12})
    penalised = make_generation({"max_new_tokens": 12, "processors": {"repetition_penalty": 1.3}})

    def ids(settings):
        return [s.completion_ids for s in sample_completions(model, tokenizer, prompts, 2, settings, seed=0)]

    without = ids(plain)
    model.generation_config.repetition_penalty = 1.3  # as several instruct models ship it
    assert shipped_processors(model) == {"repetition_penalty": 1.3}
    assert ids(plain) == without and model.generation_config.repetition_penalty == 1.3  # restored afterwards
    assert ids(penalised) != without
    assert plain.distortions == [] and penalised.distortions == ["repetition_penalty"]
    assert make_generation({"temperature": 0.7, "processors": {"no_repeat_ngram_size": 3}}).distortions == [
        "temperature", "no_repeat_ngram_size"]


def test_cluster_bootstrap_covers_with_prompt_effects():
    """32 prompts x 4 samples, prompt effects as large as the within-prompt noise: the interval over prompts covers
    the true mean in >= 93% of 1000 simulated evaluations (measured 94.0%); resampling samples one by one does not
    (75.4%)."""
    import numpy as np

    from gpo_trl.online.generate_eval import bootstrap_ci

    rng = np.random.default_rng(0)
    prompts, per_prompt, runs = 32, 4, 1000
    clusters = np.repeat(np.arange(prompts), per_prompt)
    covered = {"prompts": 0, "samples": 0}
    for run in range(runs):
        values = (rng.normal(size=prompts)[clusters] + rng.normal(size=prompts * per_prompt)).tolist()
        for name, groups in (("prompts", clusters.tolist()), ("samples", list(range(len(values))))):
            low, high = bootstrap_ci(values, groups, resamples=1000, seed=run)
            covered[name] += low <= 0 <= high
    assert covered["prompts"] / runs >= 0.93, covered
    assert covered["samples"] / runs < 0.85, covered


def test_truncated_samples_are_penalised_or_dropped(prompt_files, tmp_path):
    """Prompt 0: a cut sample is the longest-scored; prompt 1: only one sample stopped by itself."""
    samples = [Sample(0, 0, "a b", [1], [5, 0], True), Sample(0, 1, "a", [1], [6, 0], True),
               Sample(0, 2, "", [1], [7], False), Sample(1, 0, "b", [1], [8, 0], True),
               Sample(1, 1, "", [1], [9], False)]
    scores = [-2.0, -1.0, 0.0, -1.0, 0.0]  # aux:length, weight -1 (words)
    path = write_plan(tmp_path, tmp_path / "no-model-needed", prompt_files["train"], samples_per_prompt=3)
    plan = iterate.load_plan(str(path))
    assert iterate.pair_samples(plan, samples, scores, seed=0) == ([(2, 0), (4, 3)], 0, 0)  # default: kept as is
    plan.drop_truncated = True
    assert iterate.pair_samples(plan, samples, scores, seed=0) == ([(1, 0)], 0, 1)
    plan.drop_truncated = False
    plan.missing_eos_penalty = 1.5
    penalised = iterate.scores_for_pairing(plan, samples, scores)
    assert penalised == [-2.0, -1.0, -1.5, -1.0, -1.5]
    assert iterate.pair_samples(plan, samples, penalised, seed=0) == ([(1, 0), (3, 4)], 0, 0)


def test_trl_style_reward_functions_and_registered_rewards_judge():
    import custom_judges

    from gpo_trl import register_reward
    from gpo_trl.auxiliary import REGISTERED, resolve_reward
    from gpo_trl.errors import JudgeError

    samples = [Sample(i // 2, i % 2, "x" * i, [1], [2] * (i + 1)) for i in range(5)]
    prompts = ["p0", "p1", "p2"]
    custom_judges.BATCHES.clear()
    judge = make_judge({"reward_func": "custom_judges:trl_style_brevity", "kwargs": {"scale": 2}, "batch_size": 2,
                        "weight": 0.5})
    assert score_samples(judge, prompts, samples) == [-1.0, -2.0, -3.0, -4.0, -5.0]  # 0.5 * -2 * ids
    assert custom_judges.BATCHES == [2, 2, 1]
    with pytest.raises(JudgeError, match="returned 1 scores for 5 completions"):
        score_samples(make_judge({"reward_func": "custom_judges:trl_style_wrong_count"}), prompts, samples)
    try:
        register_reward("chars", lambda prompt, completion: float(len(completion)))
        register_reward("batched_brevity", custom_judges.trl_style_brevity, batched=True)
        chars = [0.0, 1.0, 2.0, 3.0, 4.0]
        assert score_samples(make_judge("aux:chars"), prompts, samples) == chars
        assert score_samples(make_judge({"reward_func": "chars"}), prompts, samples) == chars
        assert score_samples(make_judge({"reward_func": "batched_brevity"}), prompts, samples) == [-1, -2, -3, -4, -5]
        # the same names in aux_rewards (per row; a batched one is called with one-element lists)
        assert resolve_reward({"name": "chars"})("p", "abc") == 3.0
        with pytest.raises(TypeError):  # completion_ids are not passed row by row
            resolve_reward({"name": "batched_brevity"})("p", "abc")
        with pytest.raises(ValueError, match="built-in reward"):
            register_reward("length", len)
    finally:
        REGISTERED.pop("chars", None)
        REGISTERED.pop("batched_brevity", None)


@pytest.mark.slow
def test_the_iterate_example_runs_as_written_and_gives_the_recorded_rounds(tmp_path, monkeypatch):
    """`gpo-trl iterate --config configs/iterate/length.yaml` from a fresh checkout's root (the demo's model written
    on the way) gives the rounds docs/iterate_length_judge.json records for seed 0, which the README quotes."""
    from conftest import REPO

    shutil.copytree(REPO / "configs" / "iterate", tmp_path / "configs" / "iterate")
    monkeypatch.chdir(tmp_path)
    assert cli(["iterate", "--config", "configs/iterate/length.yaml"]) == 0
    rows = read_jsonl(tmp_path / "runs" / "iterate-length" / "rounds.jsonl")
    recorded = json.loads((REPO / "docs" / "iterate_length_judge.json").read_text())["rounds"]["0"]
    assert len(rows) == len(recorded) == 2
    for row, expected in zip(rows, recorded):
        for key in ("samples", "pairs", "ties", "truncated", "mean_completion_words", "mean_completion_tokens",
                    "judge_mean", "steps"):
            assert row[key] == expected[key], key
        assert row["train/train_loss"] == pytest.approx(expected["train/train_loss"], rel=1e-4)


def test_pretokenised_rows_are_checked_by_their_ids(tmp_path):
    from datasets import Dataset

    from gpo_trl.data import DataError, PreferenceSource, check_dataset, mix

    rows = [{"prompt": "p", "chosen": "", "rejected": "x", "prompt_ids": [1], "chosen_ids": [0], "rejected_ids": [5]},
            {"prompt": "p", "chosen": "a", "rejected": "b", "prompt_ids": [1], "chosen_ids": [7], "rejected_ids": [7]},
            {"prompt": "p", "chosen": "a", "rejected": "b", "prompt_ids": [1], "chosen_ids": [], "rejected_ids": [7]}]
    kept, report = check_dataset(Dataset.from_list(rows), "pairs")
    # an EOS-only completion is a sample (its text is empty); identical or empty ids are not a pair
    assert kept["chosen_ids"] == [[0]] and report.dropped == {"chosen identical to rejected": [1],
                                                               "empty completion": [2]}
    text = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="Only some sources of the mixture are pre-tokenised"):
        mix([Dataset.from_list(rows[:1]), text], [PreferenceSource(path="ids"), PreferenceSource(path="text")])
