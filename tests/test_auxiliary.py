"""UPO-style auxiliary objectives (gpo_trl.auxiliary): rewards, validation, the weighted-likelihood loss, and what
it does to a model. The loss under test, as documented in the README:

    L = L_GPO + alpha * L_aux,  L_aux = - sum_batch softmax((R - V) / tau) * log pi(y|x) / |y|
"""

import math

import pytest
import torch
from peft import LoraConfig

import custom_rewards
from conftest import REPO, cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.auxiliary import (RewardError, advantage_weights, effective_sample_size, length_reward,
                               lexicon_reward, readability_reward, regex_reward, resolve_reward)
from gpo_trl.recipe import main as recipe_main
from gpo_trl.recipe import parse_args

LENGTH_PENALTY = [{"name": "length", "weight": -1.0}]


def test_length_reward():
    assert length_reward("p", "one two  three") == 3.0
    assert length_reward("p", "abc", unit="chars") == 3.0
    with pytest.raises(ValueError, match="unit must be"):
        length_reward("p", "x", unit="tokens")


def test_readability_is_flesch_reading_ease():
    """'The cat sat on the mat.': 6 words, 1 sentence, 6 syllables -> 206.835 - 1.015 * 6 - 84.6 * 1 = 116.145."""
    assert readability_reward("p", "The cat sat on the mat.") == pytest.approx(116.145)
    easy = readability_reward("p", "Boil water. Add tea. Wait a bit.")
    hard = readability_reward("p", "Notwithstanding considerable institutional heterogeneity, epistemologies proliferate.")
    assert easy > 80 > 0 > hard
    assert readability_reward("p", "") == 0.0


def test_lexicon_reward_inline_and_file(tmp_path):
    assert lexicon_reward("p", "Darn it, darn!", words=["darn"]) == 2.0
    assert lexicon_reward("p", "darn it", words=["darn"], per_word=True) == 0.5
    words = tmp_path / "words.txt"
    words.write_text("heck\nDARN\n")
    assert lexicon_reward("p", "heck and darn", file=str(words)) == 2.0
    with pytest.raises(ValueError, match="give `words`"):
        lexicon_reward("p", "x")


def test_regex_reward():
    assert regex_reward("p", "Step 1, step 2", pattern=r"(?i)step \d") == 1.0
    assert regex_reward("p", "Step 1, step 2", pattern=r"(?i)step \d", count=True) == 2.0
    assert regex_reward("p", "none", pattern="x") == 0.0


def test_advantage_weights_and_effective_sample_size():
    """Pair-mean baseline: A_chosen = (R_c - R_r) / 2 = -A_rejected; omega = softmax(A / tau) over the 2B responses;
    ESS = (sum w)^2 / sum w^2 is 2B for equal rewards."""
    chosen, rejected = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    weights, advantages = advantage_weights(chosen, rejected, temperature=2.0, baseline="pair_mean")
    assert advantages.tolist() == [1.0, 0.0, -1.0, 0.0]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([0.5, 0.0, -0.5, 0.0]), dim=0))
    _, raw = advantage_weights(chosen, rejected, temperature=1.0, baseline="none")
    assert raw.tolist() == [3.0, 1.0, 1.0, 1.0]
    uniform, _ = advantage_weights(torch.ones(3), torch.ones(3), 1.0, "pair_mean")
    assert effective_sample_size(uniform).item() == pytest.approx(6.0)


@pytest.mark.parametrize(
    "rewards, message",
    [([{"name": "lenght"}], "Unknown reward 'lenght'. Built-ins: \\['length', 'lexicon', 'readability', 'regex'\\]"),
     ([{"weight": 1.0}], "needs a `name`"),
     ([{"name": "length", "wieght": 1}], "unknown keys \\['wieght'\\]"),
     ([{"name": "length", "weight": "big"}], "`weight` of reward 'length' must be a finite number"),
     ([{"name": "custom_rewards:raises"}], "'custom_rewards:raises' raised RuntimeError on the probe row.*service down"),
     ([{"name": "custom_rewards:returns_text"}], "returned str 'high' on the probe row.*must return a float"),
     ([{"name": "custom_rewards:returns_nan"}], "returned nan on the probe row.*must be finite"),
     ([{"name": "custom_rewards:missing"}], "Cannot load reward function 'custom_rewards:missing'"),
     ([{"name": "lexicon"}], "lexicon.*raised ValueError on the probe row.*give `words`")],
)
def test_bad_rewards_fail_when_the_config_is_built(rewards, message):
    with pytest.raises(RewardError, match=message):
        GPOConfig(output_dir="unused", use_cpu=True, aux_coef=0.5, aux_rewards=rewards)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(aux_coef=-1.0, aux_rewards=LENGTH_PENALTY), "`aux_coef` must be a number >= 0"),
     (dict(aux_coef=0.5, aux_rewards=LENGTH_PENALTY, aux_temperature=0.0), "`aux_temperature` must be > 0"),
     (dict(aux_coef=0.5, aux_rewards=LENGTH_PENALTY, aux_baseline="median"), "`aux_baseline` must be one of"),
     (dict(aux_coef=0.5), "needs `aux_rewards`"),
     (dict(aux_coef=0.5, aux_rewards='{"name": "length"}'), "`aux_rewards` must be a JSON list")],
)
def test_invalid_auxiliary_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPOConfig(output_dir="unused", use_cpu=True, **kwargs)


def test_a_reward_failing_on_a_data_row_names_the_row(tiny_models, demo_datasets, tmp_path):
    args = GPOConfig(output_dir=str(tmp_path), aux_coef=0.5, aux_rewards=[{"name": "custom_rewards:fails_on_long_answers"}],
                     **cpu_args(max_steps=1))
    with pytest.raises(RewardError, match=r"train row \d+, column 'chosen': too long to score"):
        GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=demo_datasets["train"],
                   peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def lora():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def train(model, dataset, tmp_path, **kwargs):
    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(**{"max_steps": 4, "per_device_train_batch_size": 8,
                                                             **kwargs}))
    trainer = GPOTrainer(model=str(model), args=args, train_dataset=dataset, peft_config=lora())
    trainer.train()
    return trainer


@pytest.mark.parametrize("disabled", [dict(aux_coef=0.0, aux_rewards=LENGTH_PENALTY), dict(aux_coef=0.0)])
def test_disabled_objective_is_identical_to_plain_gpo(disabled, tiny_models, demo_datasets, tmp_path):
    plain = logged_steps(train(tiny_models["llama"], demo_datasets["train"], tmp_path / "a"))
    off = logged_steps(train(tiny_models["llama"], demo_datasets["train"], tmp_path / "b", **disabled))
    assert [e["loss"] for e in off] == [e["loss"] for e in plain]
    assert [e["gpo/margin"] for e in off] == [e["gpo/margin"] for e in plain]
    assert not any(key.startswith("aux/") for key in off[0])


def test_auxiliary_loss_is_added_with_alpha_and_logged(tiny_models, demo_datasets, tmp_path):
    """At step 1 (policy == reference) the GPO part is f(0) = log 2, so loss = log 2 + alpha * aux/loss."""
    trainer = train(tiny_models["llama"], demo_datasets["train"], tmp_path, aux_coef=0.3, aux_rewards=LENGTH_PENALTY,
                    aux_temperature=2.0)
    first = logged_steps(trainer)[0]
    assert first["loss"] == pytest.approx(math.log(2) + 0.3 * first["aux/loss"], rel=1e-6)
    assert first["aux/reward_chosen"] < first["aux/reward_rejected"] < 0  # chosen answers are longer
    assert first["aux/advantage_mean"] == pytest.approx(0.0, abs=1e-6)  # pair-mean baseline
    assert 1.0 <= first["aux/ess"] <= 16.0 and first["aux/advantage_abs"] > 0


def test_rewards_are_scored_once_per_row_not_in_the_training_step(tiny_models, demo_datasets, tmp_path):
    """3 epochs over 32 pairs call the reward 64 times (chosen + rejected per row, at preparation), plus the probe."""
    rows = demo_datasets["train"].select(range(32))
    custom_rewards.CALLS["count"] = 0
    train(tiny_models["llama"], rows, tmp_path, max_steps=-1, num_train_epochs=3, aux_coef=0.5,
          aux_rewards=[{"name": "custom_rewards:exclamations", "kwargs": {"bonus": 2.0}}])
    probes = 1  # GPOConfig.__post_init__ runs every reward once on the probe row
    assert custom_rewards.CALLS["count"] == 2 * 32 + probes


def test_recipe_with_readability_and_lexicon_rewards_runs(tmp_path):
    """The shipped recipe's auxiliary keys, on the demo's tiny model and data: parsed from YAML, trained, logged."""
    recipe = REPO / "configs" / "recipes" / "qwen2.5-0.5b-lora-readability-lexicon.yaml"
    _, training, _, _ = parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert [r.name for r in training.build_aux_rewards()] == ["readability", "lexicon"]
    args = parse_args(["--config", str(REPO / "configs" / "demo.yaml"), "--model_name_or_path",
                       str(tmp_path / "m"), "--dataset_name", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"),
                       "--max_steps", "2", "--logging_steps", "1", "--eval_before_training", "false", "--disable_tqdm", "true",
                       "--aux_coef", str(training.aux_coef), "--aux_rewards", json_list(training.aux_rewards)])
    trainer, _, after = recipe_main(*args)
    assert "aux/reward_chosen" in logged_steps(trainer)[0] and math.isfinite(after["eval_aux/loss"])


def json_list(value) -> str:
    import json

    return json.dumps(value)


def sample_lengths(trainer, tokenizer, prompts, seed=0) -> float:
    """Mean number of tokens sampled before EOS (4 samples per prompt, temperature 1, at most 48 tokens)."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = trainer.model.eval().generate(**batch, do_sample=True, max_new_tokens=48, num_return_sequences=4,
                                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    lengths = []
    for ids in out[:, batch["input_ids"].shape[1]:].tolist():
        lengths.append(ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids))
    return sum(lengths) / len(lengths)


@pytest.mark.slow
def test_length_penalty_makes_sampled_answers_shorter(tiny_models, demo_datasets, tmp_path):
    """Full fine-tuning of the tiny model for 100 steps, same seed, three runs: plain GPO; GPO + the auxiliary
    objective with a zero-weight reward (uniform weights: the likelihood term alone); GPO + a length penalty.
    The penalty's samples on held-out prompts are shorter than both, and held-out preference accuracy stays within
    0.1 of the plain run. (Measured: 32.6 / 15.8 / 5.9 tokens; accuracy 1.00 / 0.89 / 0.94.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompts = sorted(set(demo_datasets["test"]["prompt"]))
    results = {}
    for name, kwargs in {"plain": {}, "uniform": dict(aux_coef=1.0, aux_rewards=[{"name": "length", "weight": 0.0}]),
                         "penalty": dict(aux_coef=1.0, aux_rewards=LENGTH_PENALTY)}.items():
        args = GPOConfig(output_dir=str(tmp_path / name), **cpu_args(
            max_steps=100, per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=50, **kwargs))
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=demo_datasets["train"],
                             eval_dataset=demo_datasets["test"])
        trainer.train()
        accuracy = trainer.evaluate()["eval_rewards/accuracies"]
        results[name] = (sample_lengths(trainer, tokenizer, prompts), accuracy)
    (plain_len, plain_acc), (uniform_len, _), (penalty_len, penalty_acc) = results.values()
    assert penalty_len < 0.75 * uniform_len and penalty_len < 0.75 * plain_len, results
    assert abs(penalty_acc - plain_acc) <= 0.1, results
