"""The study's iterative arm (gpo_trl.experiments.study_iterative) on its smoke config: on-policy pairs labelled by
the gold reward, rounds trained with the real GPOTrainer against the base LM, every round evaluated like the offline
points. The smoke run checks the machinery; the reading of the full run is in docs/results.md."""

import json

import pytest
import torch
import yaml

from conftest import REPO
from gpo_trl.experiments import study
from gpo_trl.experiments.study_iterative import load_config, main, on_policy_pairs
from gpo_trl.recipe import ConfigError

SMOKE = REPO / "configs" / "studies" / "iterative_smoke.yaml"


@pytest.mark.parametrize("change, message", [
    ({"round": 2}, "Unknown key 'round' in iterative study file"),
    ({"samples_per_prompt": 4}, "`samples_per_prompt` in"),
    ({"losses": ["logistc"]}, "Unknown losses ['logistc']"),
    ({"betas": [0]}, "`betas`"),
])
def test_bad_iterative_study_files(change, message, tmp_path):
    spec = {**yaml.safe_load(SMOKE.read_text()), "study": str(REPO / "configs" / "studies" / "smoke.yaml"), **change}
    path = tmp_path / "iterative.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)


def ids_of(text: str) -> list[int]:
    words = {"<|endoftext|>": study.EOS, "<|pad|>": study.PAD, ":": study.SEP}
    return [words[w] if w in words else study.FIRST_WORD + int(w[1:]) for w in text.split()]


def test_on_policy_pairs_are_labelled_by_the_offline_rule():
    """The iterative arm's pairs are the offline arm's rule applied to the policy's samples: with the same dice, the
    same rows as `study.preference_pairs`; the labels are Bradley-Terry coin flips on the gold reward (mostly, not
    always, the higher gold first)."""
    cfg = study.StudyConfig(threads=1)
    torch.manual_seed(0)
    model = study.build_model(cfg, study.build_tokenizer(cfg.vocab)).eval()
    rows, stats = on_policy_pairs(model, 200, cfg, torch.Generator().manual_seed(0))
    offline_rows, _ = study.preference_pairs(model, 200, cfg, torch.Generator().manual_seed(0))
    assert rows == offline_rows and stats["pairs"] + stats["ties"] == 200 == len(rows) + stats["ties"]
    higher_first = [study.gold_reward(ids_of(r["prompt"]), ids_of(r["chosen"]))
                    > study.gold_reward(ids_of(r["prompt"]), ids_of(r["rejected"])) for r in rows]
    assert 0.5 < sum(higher_first) / len(rows) < 1 and 0.5 < stats["label_agrees_with_gold"] < 1


@pytest.mark.slow
def test_smoke_iterative_study(tmp_path):
    rows = main(["--config", str(SMOKE), "--out", str(tmp_path)])
    assert [(r["arm"], r["loss"], r["round"]) for r in rows] == [
        ("offline", "logistic", 0), ("iterative", "logistic", 1), ("iterative", "logistic", 2),
        ("offline", "squared", 0), ("iterative", "squared", 1), ("iterative", "squared", 2)]
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == rows
    per_round = 192 // 2  # train_pairs / rounds prompts per round
    for row in rows:
        assert row["kl"] > 0 and -10 < row["gold_reward"] < 10
        if row["arm"] == "iterative":
            assert row["pairs"] + row["ties"] == per_round
    # Round 1 samples the base LM with the same dice for every loss: the same pairs, so the same sampled gold
    first = [r for r in rows if r["round"] == 1]
    assert first[0]["sampled_gold"] == first[1]["sampled_gold"] and first[0]["pairs"] == first[1]["pairs"]
    # Round 2 samples round 1's policy, not the base
    second = [r for r in rows if r["round"] == 2]
    assert all(s["sampled_gold"] != first[0]["sampled_gold"] for s in second)
    assert (tmp_path / "gold_reward_vs_kl_iterative.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| logistic | 0.1 | iterative | 2 |" in (tmp_path / "tables.md").read_text()


def test_matched_kl_gap_interpolates_the_offline_curve():
    from gpo_trl.experiments.study_iterative import matched_kl_gaps

    rows = [{"arm": "offline", "loss": "logistic", "beta": 0.4, "round": 0, "kl": 1.0, "gold_reward": 1.0},
            {"arm": "offline", "loss": "logistic", "beta": 0.1, "round": 0, "kl": 3.0, "gold_reward": 2.0},
            {"arm": "iterative", "loss": "logistic", "beta": 0.1, "round": 1, "kl": 2.0, "gold_reward": 2.0},
            {"arm": "iterative", "loss": "logistic", "beta": 0.1, "round": 2, "kl": 0.5, "gold_reward": 0.0},
            {"arm": "iterative", "loss": "logistic", "beta": 0.1, "round": 3, "kl": 4.0, "gold_reward": 3.0}]
    gaps = [g["gap"] for g in matched_kl_gaps(rows, base_gold=-1.0)]
    assert gaps == [2.0 - 1.5, 0.0 - (-1.0 + 0.5 * 2.0), None]  # base point (0, -1) to (1, 1); beyond KL 3: none
    assert [g["gap"] for g in matched_kl_gaps(rows)] == [0.5, None, None]
