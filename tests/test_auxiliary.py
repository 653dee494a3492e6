"""UPO-style auxiliary objectives (gpo_trl.auxiliary): rewards, validation, the reference-anchored term, and what it
does to a model. The loss under test, as documented in the README:

    L = L_GPO + alpha * L_aux,  A_w = -A_l = (R_w - R_l) / 2,  h = log pi - log ref,
    L_aux = mean over pairs of sum_{y in pair} max(tanh(A(y) / tau), 0) * f(beta * h(y))
"""

import math

import pytest
import torch
from peft import LoraConfig

import custom_rewards
from conftest import REPO, cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.auxiliary import (RewardError, aux_loss, length_reward, lexicon_reward, pair_advantages,
                               readability_reward, regex_reward)
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


def softplus_f(t: float) -> float:
    """The logistic GPO loss f(t) = log(1 + e^-t), written out here."""
    return math.log1p(math.exp(-t))


def test_pair_advantages_and_per_pair_loss_from_the_formula():
    """Pair-mean baseline: A_w = (R_w - R_l) / 2 = -A_l; per pair, tanh(|A| / tau) * f(beta h) of the better one."""
    chosen, rejected = torch.tensor([3.0, 1.0, 2.5]), torch.tensor([1.0, 1.0, 4.0])
    advantages = pair_advantages(chosen, rejected)
    assert advantages.tolist() == [1.0, 0.0, -0.75, -1.0, -0.0, 0.75]
    h = torch.tensor([0.4, -1.3, 0.2, -0.5, 2.0, 0.1], dtype=torch.float64)  # beta * h for [chosen; rejected]
    got = aux_loss(lambda t: torch.nn.functional.softplus(-t), h, advantages, temperature=2.0)
    expected = [math.tanh(1.0 / 2) * softplus_f(0.4),  # chosen scores better: its log-ratio is pushed up
                0.0,  # equal rewards: nothing
                math.tanh(0.75 / 2) * softplus_f(0.1)]  # rejected scores better: its log-ratio is pushed up
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert got[1].item() == 0.0
    # The weight saturates: a reward gap 1000 times larger pulls at most 1 / tanh(1/2) ~ 2.2 times harder
    huge = aux_loss(lambda t: torch.nn.functional.softplus(-t), h, advantages * 1000, temperature=2.0)
    assert huge[0].item() == pytest.approx(softplus_f(0.4), rel=1e-12)


def test_an_overflowing_f_on_a_zero_weight_response_gives_no_nan():
    """exp(-t) overflows far below the reference; the responses it is evaluated at there have weight 0."""
    scaled = torch.tensor([1.0, -200.0], requires_grad=True)  # [chosen; rejected], rejected far below the reference
    loss = aux_loss(lambda t: torch.exp(-t), scaled, pair_advantages(torch.tensor([2.0]), torch.tensor([0.0])), 1.0)
    loss.sum().backward()
    assert loss.item() == pytest.approx(math.tanh(1.0) * math.exp(-1.0))
    assert scaled.grad.tolist() == [pytest.approx(-math.tanh(1.0) * math.exp(-1.0)), 0.0]


def test_each_pairs_value_does_not_depend_on_the_rest_of_the_batch():
    """The same pair alone, in a batch of 3, or in a batch of 5 with other rewards: the same value, bit for bit."""
    torch.manual_seed(0)
    rewards_c, rewards_r, h = torch.randn(5) * 10, torch.randn(5) * 10, torch.randn(10, requires_grad=True)

    def loss_of(rows):
        index = torch.tensor(rows)
        scaled = torch.cat([h[index], h[index + 5]])
        return aux_loss(lambda t: torch.nn.functional.softplus(-t), scaled,
                        pair_advantages(rewards_c[index], rewards_r[index]), temperature=3.0)

    alone = loss_of([2])[0]
    assert loss_of([0, 2, 4])[1] == alone and loss_of([4, 3, 2, 1, 0])[2] == alone
    grad_alone = torch.autograd.grad(alone, h)[0]
    assert torch.equal(torch.autograd.grad(loss_of([4, 3, 2, 1, 0])[2], h)[0], grad_alone)
    assert set(grad_alone.nonzero().flatten().tolist()) <= {2, 7}  # only the pair's own responses
    assert grad_alone.abs().sum() > 0


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


def trainable(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("no_signal", [
    dict(aux_coef=1.0, aux_rewards=[{"name": "custom_rewards:constant", "kwargs": {"value": 0.7}}]),
    dict(aux_coef=1.0, aux_rewards=[{"name": "length", "weight": 0.0}, {"name": "readability", "weight": 0.0}]),
    dict(aux_coef=0.0, aux_rewards=LENGTH_PENALTY)], ids=["constant_reward", "zero_weights", "aux_coef_0"])
def test_rewards_without_signal_train_exactly_like_plain_gpo(no_signal, tiny_models, demo_datasets, tmp_path):
    """Step for step: the same losses, gradient norms and margins, and the same weights at the end (==)."""
    plain = train(tiny_models["llama"], demo_datasets["train"], tmp_path / "plain")
    aux = train(tiny_models["llama"], demo_datasets["train"], tmp_path / "aux", **no_signal)
    plain_logs, aux_logs = logged_steps(plain), logged_steps(aux)
    for key in ("loss", "grad_norm", "gpo/margin", "rewards/accuracies"):
        assert [e[key] for e in aux_logs] == [e[key] for e in plain_logs], key
    plain_weights, aux_weights = trainable(plain), trainable(aux)
    assert all(torch.equal(aux_weights[name], value) for name, value in plain_weights.items())
    assert plain_logs[-1]["gpo/margin"] != 0.0  # the runs moved
    if no_signal["aux_coef"]:
        assert all(e["aux/loss"] == 0.0 and e["aux/advantage_abs"] == 0.0 for e in aux_logs)


@pytest.fixture(scope="module")
def penalised(tiny_models, demo_datasets, tmp_path_factory):
    """A LoRA run with a length penalty, 3 steps in (so the policy has left the reference), in eval mode."""
    trainer = train(tiny_models["llama"], demo_datasets["train"], tmp_path_factory.mktemp("penalised"), max_steps=3,
                    aux_coef=0.3, aux_rewards=[{"name": "length", "weight": -1.0}], aux_temperature=4.0)
    trainer.model.eval()
    return trainer


def independent_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs (2B,) from the model's plain logits (no fused head, no trainer code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def loss_and_metrics(trainer, rows):
    """The trainer's loss on a batch of `rows` (indices of the training set) and the aux metrics it logged."""
    trainer._metrics["eval"].clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, loss.item(), {k: v[0] for k, v in trainer._metrics["eval"].items() if k.startswith("aux/")}


def test_auxiliary_loss_is_recomputed_from_log_probs_and_rewards(penalised, demo_datasets):
    """L_aux from an independent forward (policy, and the disabled adapter as reference) and the length reward on
    the raw text; the total is mean f(beta rho) + alpha * L_aux with f(t) = log(1 + e^-t)."""
    rows = list(range(6))
    batch, loss, metrics = loss_and_metrics(penalised, rows)
    with torch.no_grad():
        policy = independent_logps(penalised.model, batch)
        with penalised.model.disable_adapter():
            reference = independent_logps(penalised.model, batch)
    beta, tau, alpha = 0.1, 4.0, 0.3
    h_w, h_l = (policy - reference).double().chunk(2)
    raw = demo_datasets["train"].select(rows)
    r_w = [-len(text.split()) for text in raw["chosen"]]
    r_l = [-len(text.split()) for text in raw["rejected"]]
    expected_aux = 0.0
    for w, l, hw, hl in zip(r_w, r_l, h_w.tolist(), h_l.tolist()):
        a = (w - l) / 2  # A_w = -A_l; the better-scored response of the pair carries the weight
        better = hw if a > 0 else hl
        expected_aux += math.tanh(abs(a) / tau) * softplus_f(beta * better) / len(rows)
    expected_gpo = sum(softplus_f(beta * (w - l)) for w, l in zip(h_w.tolist(), h_l.tolist())) / len(rows)
    assert any(r != 0 for r in h_w.tolist())  # off the reference, so the log-ratios matter
    assert metrics["aux/loss"] == pytest.approx(expected_aux, rel=1e-5)
    assert loss == pytest.approx(expected_gpo + alpha * expected_aux, rel=1e-5)
    assert metrics["aux/reward_chosen"] == pytest.approx(sum(r_w) / len(rows))
    assert metrics["aux/reward_rejected"] == pytest.approx(sum(r_l) / len(rows))
    designer = [(w - l > 0) == (a > 0) for w, l, a in zip(h_w.tolist(), h_l.tolist(), [w - l for w, l in zip(r_w, r_l)])
                if a != 0]
    assert metrics["aux/designer_accuracy"] == pytest.approx(sum(designer) / len(designer))


def test_auxiliary_gradient_is_recomputed_from_log_probs_and_rewards(penalised, demo_datasets):
    """The gradient of the trainer's loss on the LoRA weights equals that of the loss written out here on the
    independent forward, and differs from the GPO part's alone (so the auxiliary term's own gradient is checked)."""
    rows, beta, tau, alpha = list(range(6)), 0.1, 4.0, 0.3
    batch = penalised.data_collator([penalised.train_dataset[i] for i in rows])
    params = [p for p in penalised.model.parameters() if p.requires_grad]
    trainer_grads = torch.autograd.grad(penalised.compute_loss(penalised.model, batch), params)
    with torch.no_grad(), penalised.model.disable_adapter():
        reference = independent_logps(penalised.model, batch)
    h_w, h_l = (independent_logps(penalised.model, batch) - reference).chunk(2)
    raw = demo_datasets["train"].select(rows)
    advantage = torch.tensor([(len(l.split()) - len(w.split())) / 2 for w, l in zip(raw["chosen"], raw["rejected"])])
    better = torch.where(advantage > 0, h_w, h_l)  # length penalty: the shorter answer of the pair
    gpo = torch.nn.functional.softplus(-beta * (h_w - h_l)).mean()
    aux = (torch.tanh(advantage.abs() / tau) * torch.nn.functional.softplus(-beta * better)).mean()
    expected = torch.autograd.grad(gpo + alpha * aux, params, retain_graph=True)
    gpo_only = torch.autograd.grad(gpo, params)
    for got, want in zip(trainer_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    difference = sum((e - g).abs().sum() for e, g in zip(expected, gpo_only))
    assert difference > 1e-3 * sum(e.abs().sum() for e in expected)


def test_a_pairs_auxiliary_loss_is_the_same_in_any_batch(penalised):
    """The micro-batch's L_aux is the mean of its pairs' values computed one pair at a time (to float32 rounding,
    padding differs), whatever the batch size: no normalisation over the batch."""
    singles = [loss_and_metrics(penalised, [i])[2]["aux/loss"] for i in range(6)]
    assert len(set(singles)) > 1
    for rows in ([0, 1], [0, 1, 2, 3, 4, 5], [5, 2, 3]):
        mean = sum(singles[i] for i in rows) / len(rows)
        assert loss_and_metrics(penalised, rows)[2]["aux/loss"] == pytest.approx(mean, rel=1e-5)


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
                       "--aux_coef", str(training.aux_coef), "--aux_temperature", str(training.aux_temperature),
                       "--aux_rewards", json_list(training.aux_rewards)])
    trainer, _, after = recipe_main(*args)
    assert "aux/reward_chosen" in logged_steps(trainer)[0] and math.isfinite(after["eval_aux/loss"])


def json_list(value) -> str:
    import json

    return json.dumps(value)


def sample(trainer, tokenizer, prompts, seed=0) -> tuple[float, float]:
    """(mean tokens before EOS, mean Flesch reading ease) of 8 samples per prompt (temperature 1, <= 48 tokens)."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = trainer.model.eval().generate(**batch, do_sample=True, max_new_tokens=48, num_return_sequences=8,
                                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    lengths, flesch = [], []
    for ids in out[:, batch["input_ids"].shape[1]:].tolist():
        length = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
        lengths.append(length)
        flesch.append(readability_reward("", tokenizer.decode(ids[:length])))
    return sum(lengths) / len(lengths), sum(flesch) / len(flesch)


DESIGNER_RUNS = {
    "plain": {},
    "length_penalty": dict(aux_coef=0.75, aux_temperature=5.0, aux_rewards=LENGTH_PENALTY),
    "readability": dict(aux_coef=1.0, aux_temperature=10.0, aux_rewards=[{"name": "readability", "weight": 1.0}]),
}


@pytest.mark.slow
def test_designer_rewards_change_what_they_score_and_keep_the_preferences(tiny_models, demo_datasets, tmp_path):
    """Full fine-tuning of the tiny model for 100 steps, seed 0, three runs: plain GPO, + a length penalty, + a
    readability reward. On held-out prompts the penalty's samples are shorter than plain GPO's by a quarter and the
    readability run's read easier, while held-out preference accuracy stays within 0.05 of plain GPO.
    (Measured, seed 0: 32.3 / 11.7 tokens, Flesch 71.0 / 83.3, accuracy 1.00 / 1.00 / 1.00.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompts = sorted(set(demo_datasets["test"]["prompt"]))
    results = {}
    for name, kwargs in DESIGNER_RUNS.items():
        args = GPOConfig(output_dir=str(tmp_path / name), **cpu_args(
            max_steps=100, per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=50, **kwargs))
        trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=demo_datasets["train"],
                             eval_dataset=demo_datasets["test"])
        trainer.train()
        accuracy = trainer.evaluate()["eval_rewards/accuracies"]
        results[name] = (*sample(trainer, tokenizer, prompts), accuracy)
    (plain_len, plain_flesch, plain_acc), (penalty_len, _, penalty_acc), (_, read_flesch, read_acc) = results.values()
    assert penalty_len < 0.75 * plain_len, results
    assert abs(penalty_acc - plain_acc) <= 0.05, results
    assert read_flesch > plain_flesch + 4, results
