"""Preference data on the real samples in tests/data (copied from shared/data): every format, column maps,
mixtures, held-out splits, and the row checks that run before any model is loaded."""

import csv
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Value

from conftest import DATA
from gpo_trl.data import (DataArguments, DataError, PreferenceSource, build_datasets, check_dataset, check_row,
                          load_source, make_source)

HH = str(DATA / "hh_rlhf_harmless_base_head300.jsonl")
ULTRA = str(DATA / "ultrafeedback_binarized_16.jsonl")
STACK = str(DATA / "stack_exchange_paired_25.json")
STACK_MAP = {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}
ORCA = DATA / "orca_style_dpo_pairs_10.csv"  # Intel/orca_dpo_pairs layout: system, question, chosen, rejected
QA = DATA / "qa_preference_extra_columns_8.jsonl"  # prompt, chosen, rejected plus id, scores, topic
ORCA_SOURCE = {"data_files": str(ORCA), "column_map": {"question": "prompt"}}


def no_script(**kwargs):
    return SimpleNamespace(dataset_name=None, dataset_config=None, dataset_train_split="train",
                           dataset_test_split="test", **kwargs)


def build(*sources, tokenizer=None, max_length=None, **data_kwargs):
    args = DataArguments(datasets=[dict(s) for s in sources], **data_kwargs)
    return build_datasets(no_script(), args, tokenizer, max_length)


def test_implicit_prompt_hh_rlhf_gets_the_shared_prefix_and_drops_empty_turns():
    """hh-rlhf: the prompt is the shared dialogue up to the last `Assistant:`; row 86 ends in an empty assistant turn
    on the chosen side, so it is dropped and reported, not silently kept or silently lost."""
    train, _, [report] = build({"data_files": HH})
    assert report.rows == 300 and report.dropped == {"empty completion": [86]}
    assert len(train) == 299
    row = train[0]
    assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("Assistant:")
    assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
    assert "Human:" not in row["chosen"][:20]


def test_hh_rlhf_empty_turn_as_an_error_names_row_and_column():
    with pytest.raises(DataError, match=r"row 86, column 'chosen': empty completion.*invalid_rows: drop"):
        build({"data_files": HH}, invalid_rows="error")


def test_conversational_ultrafeedback_string_prompt_is_re_extracted_from_messages():
    """UltraFeedback's `prompt` is a string copy of the first user turn while chosen/rejected are full conversations;
    the prompt becomes the shared message prefix and the completions the assistant turns."""
    train, _, [report] = build({"data_files": ULTRA})
    assert report.rows == 16 and not report.dropped
    row = train[0]
    assert row["prompt"] == [{"content": "how can i develop a habit of drawing daily", "role": "user"}]
    assert [m["role"] for m in row["chosen"]] == ["assistant"]
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}  # scores, ids and messages dropped


def test_column_map_stack_exchange():
    train, _, [report] = build({"data_files": STACK, "column_map": STACK_MAP})
    assert len(train) == 25 and not report.dropped
    raw = json.loads((DATA / "stack_exchange_paired_25.json").read_text())
    assert train[3]["prompt"] == raw[3]["question"] and train[3]["chosen"] == raw[3]["response_j"]


def test_missing_column_names_the_dataset_and_the_fix():
    with pytest.raises(DataError, match=r"stack_exchange_paired_25.json.*no 'chosen' column.*column_map"):
        build({"data_files": STACK})
    with pytest.raises(DataError, match=r"`column_map` renames \['answer'\], but the dataset has columns"):
        build({"data_files": STACK, "column_map": {"answer": "chosen"}})


@pytest.mark.parametrize("config", ["standard_preference", "conversational_preference",
                                    "standard_implicit_prompt_preference", "conversational_implicit_prompt_preference"])
def test_trl_zen_layouts_from_a_local_directory(config):
    """A local directory with train/test files loads like a Hub id: both splits, explicit prompts after checks."""
    script = no_script()
    script.dataset_name = str(DATA / f"zen_{config}")
    train, test, reports = build_datasets(script, DataArguments(), None, None)
    assert (len(train), len(test)) == (17, 2)
    assert all(r["prompt"] for r in train)
    assert [r.kept for r in reports] == [17, 2]


def test_unpaired_layout_is_refused_with_the_reason():
    script = no_script()
    script.dataset_name = str(DATA / "zen_standard_unpaired_preference")
    with pytest.raises(DataError, match="no 'chosen' column"):
        build_datasets(script, DataArguments(), None, None)


def test_mixture_with_weights_and_a_seeded_held_out_split():
    """Weights 3:1 over hh (299 usable) and stack-exchange (25): the mixture takes round(0.75 N) and round(0.25 N)
    rows with N = 100, the largest size that oversamples neither; test_split_size holds out 10% with a fixed seed."""
    sources = ({"data_files": HH, "weight": 3.0}, {"data_files": STACK, "column_map": STACK_MAP, "weight": 1.0})
    train, test, reports = build(*sources, test_split_size=0.1)
    assert len(train) + len(test) + sum(len(v) for r in reports for v in r.dropped.values()) == 100
    assert 9 <= len(test) <= 10
    again, again_test, _ = build(*sources, test_split_size=0.1)
    assert again["chosen"] == train["chosen"] and again_test["chosen"] == test["chosen"]


def test_fraction_takes_a_seeded_share_of_one_source():
    train, _, _ = build({"data_files": STACK, "column_map": STACK_MAP, "fraction": 0.4})
    assert len(train) == 10


def test_mixing_conversational_and_standard_is_refused():
    with pytest.raises(DataError, match="combines conversational"):
        build({"data_files": ULTRA}, {"data_files": STACK, "column_map": STACK_MAP})


@pytest.mark.parametrize(
    "entry, message",
    [({"data_files": HH, "wieght": 1}, "Unknown key 'wieght'.*Did you mean 'weight'"),
     ({"data_files": HH, "fraction": 1.5}, r"`fraction` of .* must be in \(0, 1\]"),
     ({"name": "x"}, "needs `path`"),
     ({"data_files": "x.txt"}, "Cannot tell the format")],
)
def test_bad_source_entries(entry, message):
    with pytest.raises(DataError, match=message):
        load_source(make_source(entry))


@pytest.mark.parametrize(
    "row, expected",
    [({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
     ({"prompt": "p", "chosen": "   ", "rejected": "b"}, ("chosen", "empty completion")),
     ({"prompt": "p", "chosen": None, "rejected": "b"}, ("chosen", "empty completion")),
     ({"prompt": "p", "chosen": "same", "rejected": "same"}, ("chosen", "chosen identical to rejected")),
     ({"prompt": "p", "chosen": 3, "rejected": "b"}, ("chosen", "expected text, got int 3")),
     ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}, ("chosen", "message 0 has role 'bot'")),
     ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}, ("chosen", "message 0 is not a {role, content}")),
     ({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
      ("chosen", "empty completion"))],
)
def test_check_row(row, expected):
    problem = check_row(row)
    if expected is None:
        assert problem is None
    else:
        assert problem[0] == expected[0] and problem[1].startswith(expected[1]), problem


def test_structural_problems_stop_even_when_dropping():
    """A column of numbers where text belongs is a data bug, not a row to skip: it stops with row and column."""
    dataset = Dataset.from_dict({"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": [1, 2]})
    with pytest.raises(DataError, match=r"demo, row 0, column 'rejected': expected text, got int 1"):
        check_dataset(dataset, "demo", invalid_rows="drop")


def test_prompt_filling_max_length_is_counted(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    train, _, [report] = build({"data_files": HH}, tokenizer=tokenizer, max_length=64)
    assert report.dropped["prompt fills max_length"]
    assert report.kept == len(train) == 300 - 1 - len(report.dropped["prompt fills max_length"])
    with pytest.raises(DataError, match=r"column 'prompt': prompt fills max_length. Raise `max_length` \(now 64\)"):
        build({"data_files": HH}, tokenizer=tokenizer, max_length=64, invalid_rows="error")


# --- Mixtures of files in different formats, and the `system` column ---------------------------------------------


def csv_rows(path) -> list[dict]:
    """The file as the csv module reads it (an empty cell is ''), independently of `datasets`."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def jsonl_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat(prompt: str, system: str = "") -> list[dict]:
    """The messages a text row should become: a system message only when its text is not blank."""
    return ([{"role": "system", "content": system}] if system.strip() else []) + [{"role": "user", "content": prompt}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_reported_mixture_of_orca_csv_and_jsonl_becomes_one_conversational_dataset():
    """The issue's mixture: csv (typed large_string, with a system column) + jsonl (string, extra columns). Every
    row becomes messages; the system text leads the prompt where it is not blank (7 of the 10 csv rows)."""
    train, _, [report] = build(ORCA_SOURCE, {"data_files": str(QA)})
    orca, qa = csv_rows(ORCA), jsonl_rows(QA)
    assert len(train) == report.rows == len(orca) + len(qa) == 18 and not report.dropped
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}
    expected = [{"prompt": chat(r["question"], r["system"]), "chosen": answer(r["chosen"]),
                 "rejected": answer(r["rejected"])} for r in orca]
    expected += [{"prompt": chat(r["prompt"]), "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"])}
                 for r in qa]
    assert train.to_list() == expected
    assert orca[1]["system"] == "" and orca[8]["system"] == "   "  # the empty and the blank system texts
    assert train[1]["prompt"] == [{"role": "user", "content": orca[1]["question"]}]
    assert train[8]["prompt"] == [{"role": "user", "content": orca[8]["question"]}]
    with_system = sum(bool(r["system"].strip()) for r in orca)
    assert with_system == 7
    text = str(report)
    assert f"orca_style_dpo_pairs_10.csv [train]: `system` column -> chat messages (a system message in " \
           f"{with_system} of 10 rows" in text
    assert "qa_preference_extra_columns_8.jsonl [train]: text rows -> user/assistant chat messages" in text


def test_every_builder_of_the_standard_format_mixes(tmp_path):
    """json, jsonl, parquet (large_string, written by pyarrow), csv and a local Hub-layout directory, all standard
    text: the mixture is every source's rows in order, whatever each builder typed them as."""
    zen = jsonl_rows(DATA / "zen_standard_preference" / "train.jsonl")
    qa = jsonl_rows(QA)
    table = pa.table({k: pa.array([r[k] for r in qa[:4]], pa.large_string()) for k in ("prompt", "chosen", "rejected")})
    pq.write_table(table, tmp_path / "qa.parquet")
    with open(tmp_path / "zen.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(zen[:5])
    stack = json.loads((DATA / "stack_exchange_paired_25.json").read_text())
    sources = [{"data_files": STACK, "column_map": STACK_MAP}, {"data_files": str(QA)},
               {"data_files": str(tmp_path / "qa.parquet")}, {"data_files": str(tmp_path / "zen.csv")},
               {"path": str(DATA / "zen_standard_preference")}]
    assert load_source(make_source(sources[3])).features["prompt"] == Value("large_string")  # what needed the cast
    train, _, [report] = build(*sources)
    triple = ("prompt", "chosen", "rejected")
    expected = [dict(zip(triple, (r["question"], r["response_j"], r["response_k"]))) for r in stack]
    expected += [{k: r[k] for k in triple} for r in qa + qa[:4] + zen[:5] + zen]
    assert train.to_list() == expected and not report.dropped and not report.notes
    assert train.features == Features({k: Value("string") for k in triple})


def test_conversational_sources_of_every_origin_mix():
    """The orca csv (messages built from its system column), UltraFeedback (messages with fields content, role) and
    TRL's conversational zen directory (role, content): one schema, every row kept as its own messages."""
    zen = {"path": str(DATA / "zen_conversational_preference")}
    train, _, [report] = build(ORCA_SOURCE, {"data_files": ULTRA}, zen)
    assert len(train) == 10 + 16 + 17 and not report.dropped
    ultra = jsonl_rows(DATA / "ultrafeedback_binarized_16.jsonl")
    assert train[10]["chosen"] == ultra[0]["chosen"][1:]  # the assistant turn, after the shared user prompt
    assert train[10 + 16]["prompt"] == jsonl_rows(DATA / "zen_conversational_preference" / "train.jsonl")[0]["prompt"]
    assert train[0]["prompt"][0] == {"role": "system", "content": csv_rows(ORCA)[0]["system"]}


def test_system_column_without_a_chat_template_is_an_error_naming_the_source(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"orca_style_dpo_pairs_10.csv \[train\].*has no chat template"):
        build(ORCA_SOURCE, tokenizer=tokenizer, max_length=256)


def test_types_that_differ_beyond_string_widths_are_an_error_naming_the_column(tmp_path):
    """Numbers where the other source has text are a data bug, not something to cast away."""
    (tmp_path / "numbers.csv").write_text("prompt,chosen,rejected\nWhich is larger?,2,1\n")
    with pytest.raises(DataError, match=r"type column 'chosen' differently.*numbers.csv \[train\]: Value\('int64'\)"):
        build({"data_files": str(tmp_path / "numbers.csv")}, {"data_files": str(QA)})


def test_a_system_column_that_is_not_text_names_row_and_column(tmp_path):
    rows = [{"system": "Be brief.", "prompt": "p", "chosen": "a", "rejected": "b"},
            {"system": 3, "prompt": "q", "chosen": "c", "rejected": "d"}]
    path = tmp_path / "bad_system.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad_system.jsonl \[train\], row 1, column 'system': expected text"):
        build({"data_files": str(path)})


def test_a_system_column_mapped_away_keeps_the_csv_as_text():
    """The real orca csv (large_string) with `system` renamed out of the way mixes with the jsonl as plain text."""
    source = {"data_files": str(ORCA), "column_map": {"question": "prompt", "system": "unused_system"}}
    train, _, [report] = build(source, {"data_files": str(QA)})
    orca, qa = csv_rows(ORCA), jsonl_rows(QA)
    assert train.to_list() == [{"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]}
                               for r in orca] + [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in qa]
    assert not report.notes


def test_dataset_name_directory_with_a_system_column_converts_both_splits(tmp_path):
    orca = csv_rows(ORCA)
    for split, rows in (("train", orca[:7]), ("test", orca[7:])):
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["system", "prompt", "chosen", "rejected"])
            writer.writerows([r["system"], r["question"], r["chosen"], r["rejected"]] for r in rows)
    script = no_script()
    script.dataset_name = str(tmp_path)
    train, test, _ = build_datasets(script, DataArguments(), None, None)
    assert [r["prompt"] for r in train] == [chat(r["question"], r["system"]) for r in orca[:7]]
    assert [r["prompt"] for r in test] == [chat(r["question"], r["system"]) for r in orca[7:]]
    assert test[1]["prompt"] == [{"role": "user", "content": orca[8]["question"]}]  # the blank system text
    assert test[0]["chosen"] == answer(orca[7]["chosen"])
