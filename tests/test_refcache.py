"""Precomputed reference log-probs are an artifact: computed once per (tokenised data, reference weights,
truncation, precision), reused by later runs that change anything else, recomputed when any of those change."""

from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig

from conftest import DATA, cpu_args, launch_two_ranks, logged_steps
from gpo_trl import GPOConfig, GPOTrainer


@pytest.fixture
def count_reference_passes(monkeypatch):
    calls = []
    original = GPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls.append(inputs["input_ids"].shape[0] // 2)
        return original(self, model, inputs)

    monkeypatch.setattr(GPOTrainer, "compute_ref_log_probs", counting)
    return calls


def make(model, tmp_path, **kwargs):
    dataset = load_dataset("json", data_files=str(DATA / "zen_standard_preference" / "train.jsonl"), split="train",
                           cache_dir=str(tmp_path / "hf"))  # TRL's own cache lives there: fresh per test
    args = GPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True,
                     ref_logps_cache_dir=str(tmp_path / "cache"), **cpu_args(**{"max_steps": 2, **kwargs}))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return GPOTrainer(model=str(model), args=args, train_dataset=dataset, peft_config=lora)


def test_a_second_run_with_other_beta_loss_and_lr_does_no_reference_pass(tiny_models, tmp_path,
                                                                          count_reference_passes):
    first = make(tiny_models["llama"], tmp_path)
    assert sum(count_reference_passes) == 17  # every pair once
    first_values = first.train_dataset["ref_chosen_logps"]
    count_reference_passes.clear()
    # TRL's own cache misses here: its key includes the whole config
    second = make(tiny_models["llama"], tmp_path, beta=0.3, learning_rate=3e-3, gpo_loss="hinge")
    assert count_reference_passes == []
    assert second.train_dataset["ref_chosen_logps"] == first_values
    second.train()  # and training runs on the reused values
    assert logged_steps(second)[0]["loss"] == pytest.approx(1.0)  # hinge at rho = 0


@pytest.mark.parametrize("change", [dict(max_length=16), dict(bf16=True)], ids=["max_length", "precision"])
def test_a_change_that_alters_the_values_recomputes(change, tiny_models, tmp_path, count_reference_passes):
    make(tiny_models["llama"], tmp_path)
    count_reference_passes.clear()
    make(tiny_models["llama"], tmp_path, **change)
    assert sum(count_reference_passes) > 0


def test_other_reference_weights_recompute(tiny_models, tmp_path, count_reference_passes):
    make(tiny_models["llama"], tmp_path)
    count_reference_passes.clear()
    make(tiny_models["qwen2"], tmp_path)
    assert sum(count_reference_passes) == 17


def test_a_stale_or_broken_cache_file_is_recomputed_not_trusted(tiny_models, tmp_path, count_reference_passes):
    first = make(tiny_models["llama"], tmp_path)
    expected = first.train_dataset["ref_chosen_logps"]
    [cache_file] = list((tmp_path / "cache").glob("*.arrow"))
    cache_file.write_bytes(b"not an arrow file")
    count_reference_passes.clear()
    again = make(tiny_models["llama"], tmp_path, beta=0.5)  # beta: so that TRL's own cache misses too
    assert sum(count_reference_passes) == 17
    torch.testing.assert_close(torch.tensor(again.train_dataset["ref_chosen_logps"]), torch.tensor(expected))


def test_the_test_session_never_writes_the_users_datasets_cache():
    """conftest points HF_DATASETS_CACHE (hence the default ref_logps_cache_dir) at a temporary directory, for this
    process and its subprocesses, so tests that precompute without their own cache dir leave the user's cache alone."""
    import datasets

    from conftest import TEST_DATASETS_CACHE
    from gpo_trl.refcache import default_cache_dir

    assert datasets.config.HF_DATASETS_CACHE.resolve() == Path(TEST_DATASETS_CACHE).resolve()
    assert default_cache_dir().resolve().parent == Path(TEST_DATASETS_CACHE).resolve()


@pytest.mark.slow
def test_ranks_with_different_model_hashes_share_rank_zeros_key(tiny_models, tmp_path):
    """Each rank hashes the reference differently (under ZeRO-3 each holds another shard): all use rank 0's key, so
    the second run is one shared hit (no rank computes alone, nobody hangs) and its values are the first run's."""
    ranks, _ = launch_two_ranks("refcache_ranks.py", tiny_models["llama"], tmp_path, "keys")
    assert [[run["passes"] > 0 for run in r["runs"]] for r in ranks] == [[True, False], [True, False]]
    first = ranks[0]["runs"][0]["ref_chosen_logps"]
    assert len(first) == 8 and all(run["ref_chosen_logps"] == first for r in ranks for run in r["runs"])
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 1  # one key, rank 0's


@pytest.mark.slow
def test_ranks_with_separate_cache_dirs_take_one_decision(tiny_models, tmp_path):
    """Each rank has its own cache directory and only rank 0 writes: on the second run rank 0 has the file, rank 1
    not. Rank 0's hit is everyone's: rank 1 gets the values from rank 0 and does no reference pass (rather than
    entering the precompute's collectives alone), and a warning says the directory is not shared."""
    ranks, err = launch_two_ranks("refcache_ranks.py", tiny_models["llama"], tmp_path, "dirs")
    assert [[run["passes"] > 0 for run in r["runs"]] for r in ranks] == [[True, False], [True, False]]
    first = ranks[0]["runs"][0]["ref_chosen_logps"]
    assert all(run["ref_chosen_logps"] == first for r in ranks for run in r["runs"])
    assert list((tmp_path / "cache-rank1").glob("*.arrow")) == []
    assert "is not shared" in err and "rank 1" in err


# --- The key hashes the rows the dataset holds -------------------------------------------------------------------


def token_rows(n=40):
    """Distinct tokenised pairs: row i holds ids derived from i, with lengths that vary."""
    return [{"prompt_ids": list(range(i, i + 1 + i % 3)), "chosen_ids": [i, 2 * i],
             "rejected_ids": [i + 1000] * (1 + i % 2), "other": f"row {i}"} for i in range(n)]


def key(dataset):
    from gpo_trl.refcache import cache_key

    args = GPOConfig(output_dir="unused", use_cpu=True, bf16=False)
    return cache_key(dataset, "model-hash", args)


def test_the_key_tells_apart_zero_copy_slices_of_one_table():
    """select(range) and shard / train_test_split without shuffling are zero-copy slices: they share their parent's
    Arrow buffers, which the key once hashed, so every such slice of a table got the same key."""
    from datasets import Dataset

    table = Dataset.from_list(token_rows())
    views = {"first ten": table.select(range(0, 10)), "next ten": table.select(range(10, 20)),
             "shard 0": table.shard(3, 0, contiguous=True), "shard 1": table.shard(3, 1, contiguous=True),
             "last ten": table.train_test_split(test_size=10, shuffle=False)["test"],
             "shuffled": table.shuffle(seed=0).select(range(10)), "whole": table}
    keys = {name: key(view) for name, view in views.items()}
    assert len(set(keys.values())) == len(keys), keys


def test_equal_rows_reached_two_ways_share_the_key():
    from datasets import Dataset, concatenate_datasets

    from gpo_trl.refcache import token_digest

    rows = token_rows()
    table = Dataset.from_list(rows)
    fresh = Dataset.from_list(rows[10:20])
    assert key(table.select(range(10, 20))) == key(fresh) == key(table.shard(4, 1, contiguous=True))
    shuffled = table.shuffle(seed=0)  # an index mapping, resolved batch by batch
    order = shuffled._indices.column(0).to_pylist()
    assert key(shuffled) == key(shuffled.flatten_indices()) == key(Dataset.from_list([rows[i] for i in order]))
    halves = concatenate_datasets([Dataset.from_list(rows[:13]), Dataset.from_list(rows[13:])])  # two chunks
    assert key(halves) == key(table) == key(table.remove_columns("other"))  # only the token columns count
    assert token_digest(table, batch_rows=3) == token_digest(table)


def test_where_the_row_boundaries_fall_changes_the_key():
    from datasets import Dataset

    one = {"chosen_ids": [1], "rejected_ids": [2]}
    split_a = Dataset.from_list([{"prompt_ids": [1, 2], **one}, {"prompt_ids": [3], **one}])
    split_b = Dataset.from_list([{"prompt_ids": [1], **one}, {"prompt_ids": [2, 3], **one}])
    assert key(split_a) != key(split_b)
