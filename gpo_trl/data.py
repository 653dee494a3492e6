"""Preference data: load from the Hub, a directory or files; rename; mix; split; check every row before training.

A source is one `load_dataset` call plus a `column_map`. Rows end up in TRL's preference formats, with an explicit
prompt (implicit-prompt rows such as hh-rlhf get the shared prefix extracted, as TRL's `extract_prompt` does):

    standard:        {"prompt": str, "chosen": str, "rejected": str}
    conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}

A `system` column (after `column_map`) makes a source conversational: its text becomes a system message before the
user prompt (none when it is empty) and the completions assistant messages, so TRL applies the chat template. The
other text sources of such a mixture become messages too (without a system message), so that every row is formatted
alike. Before mixing, every source is cast to one schema (`large_string` as `string`, the same message fields), so
json, jsonl, parquet, csv and Hub-layout sources of one format concatenate; text mixed with message lists that came
as such is refused.

Every row is checked before any model is loaded. Structural problems (a missing column, a number where text should
be, a malformed message) stop the run with the dataset, row and column named. Rows a user may rather skip (an empty
completion, chosen identical to rejected, a prompt that fills `max_length`) are dropped and counted, or stop the run
with `invalid_rows: error`; the counts are reported before training starts.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from datasets import Dataset, Features, LargeList, List, Value, concatenate_datasets, load_dataset
from trl.data_utils import extract_prompt

from .errors import DataError
from .inputs import check_data_files

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SYSTEM = "system"  # optional column: a system message before the prompt (see `with_system_messages`)
CHAT_TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")  # kept: TRL passes them to apply_chat_template
# Pre-tokenised rows (e.g. `gpo-trl iterate`'s pairs, the ids as sampled): trained on as they are, not re-tokenised
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
ROLES = {"system", "user", "assistant", "tool"}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PreferenceSource:
    """One dataset of a mixture. Mirrors TRL's `DatasetConfig` keys, plus `revision`, `column_map` and `weight`.

    path: Hub id, local directory, or a builder name (json, parquet, csv) with `data_files`; may be omitted when
        `data_files` names the files (the builder follows the extension).
    column_map: {source column: our column}, e.g. {question: prompt, response_j: chosen, response_k: rejected}.
    fraction: use this share (0, 1] of the source's rows (the first ones, after a seeded shuffle).
    weight: relative share of the mixture; weights are normalised and the mixture is capped so that no source is
        oversampled (TRL's `fraction` semantics).
    """

    path: str | None = None
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    column_map: dict[str, str] | None = None
    fraction: float | None = None
    weight: float | None = None

    def __post_init__(self):
        if self.path is None and self.data_files is None:
            raise DataError("A dataset source needs `path` (Hub id, directory or builder) or `data_files`.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise DataError(f"`fraction` of {self.label} must be in (0, 1], got {self.fraction}.")
        if self.weight is not None and not self.weight > 0:
            raise DataError(f"`weight` of {self.label} must be > 0, got {self.weight}.")

    @property
    def label(self) -> str:
        where = self.path or self.data_files
        return f"{where}" + (f" ({self.name})" if self.name else "") + f" [{self.split}]"


@dataclass
class DataArguments:
    """Recipe keys for the data (replacing TRL's `DatasetMixtureConfig`; `dataset_name` still works for one source)."""

    datasets: list[PreferenceSource] = field(
        default_factory=list,
        metadata={"help": "Sources to mix, each a mapping of PreferenceSource keys: path, name, split, revision, "
                  "data_dir, data_files, column_map, fraction, weight. Overrides `dataset_name`."},
    )
    test_split_size: float | None = field(
        default=None,
        metadata={"help": "Hold out this share (< 1) or number (>= 1) of training rows for evaluation, with a fixed "
                  "seed, when the source has no test split."},
    )
    test_split_seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})
    invalid_rows: str = field(
        default="drop",
        metadata={"help": "Rows with an empty completion, chosen == rejected, or a prompt that fills max_length: "
                  "'drop' (counted and reported before training) or 'error' (stop, naming the row).",
                  "choices": ["drop", "error"]},
    )

    def __post_init__(self):
        self.datasets = [source for entry in self.datasets for source in as_sources(entry)]


def as_sources(entry) -> list[PreferenceSource]:
    """The sources of one `datasets` entry: a YAML mapping, or from the command line a path (`--datasets a b`) or a
    JSON/YAML mapping or list of mappings (`--datasets '[{"path": "a", "weight": 2}, {"path": "b"}]'`), which the
    argument parser hands over as a source whose path is that text."""
    if isinstance(entry, PreferenceSource):
        if not (isinstance(entry.path, str) and entry.path.lstrip().startswith(("{", "["))):
            return [entry]
        try:
            entry = yaml.safe_load(entry.path)
        except yaml.YAMLError as err:
            raise DataError(f"`--datasets {entry.path}` is neither a path nor a JSON/YAML mapping or list of mappings "
                            f"({str(err).splitlines()[0]}). Example: --datasets '[{{\"path\": \"a\", \"weight\": 2}}, "
                            f"{{\"path\": \"b\"}}]'") from None
    if isinstance(entry, list):
        return [source for item in entry for source in as_sources(item)]
    if isinstance(entry, str):
        return [make_source({"path": entry})]
    if isinstance(entry, dict):
        return [make_source(entry)]
    raise DataError(f"A `datasets` entry must be a mapping of source keys (path, data_files, weight, ...) or a path, "
                    f"got {entry!r}.")


def make_source(mapping: dict) -> PreferenceSource:
    """A PreferenceSource from a YAML mapping; an unknown key is an error with a suggestion."""
    known = [f.name for f in fields(PreferenceSource)]
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {known}."
            raise DataError(f"Unknown key {key!r} in a `datasets` entry ({mapping}).{hint}")
    return PreferenceSource(**mapping)


def load_source(source: PreferenceSource, seed: int = 0) -> Dataset:
    """Load one source, apply its column map and fraction, and keep the preference columns in an explicit-prompt form."""
    path = source.path or _builder_for(source.data_files)
    check_data_files(source.data_files, f"{source.label}: `data_files`")  # one line naming it, not datasets' traceback
    dataset = load_dataset(path, name=source.name, split=source.split, revision=source.revision,
                           data_dir=source.data_dir, data_files=source.data_files)
    if source.column_map:
        missing = sorted(set(source.column_map) - set(dataset.column_names))
        if missing:
            raise DataError(f"{source.label}: `column_map` renames {missing}, but the dataset has columns "
                            f"{dataset.column_names}.")
        dataset = dataset.rename_columns(source.column_map)
    for column in ("chosen", "rejected"):
        if column not in dataset.column_names:
            raise DataError(
                f"{source.label}: no {column!r} column (columns: {dataset.column_names}). Map yours with "
                f"`column_map`, e.g. {{response_j: chosen, response_k: rejected}}."
            )
    images = [c for c in ("images", "image") if c in dataset.column_names]
    if images:
        raise DataError(f"{source.label}: column {images[0]!r} holds images, but the GPO recipe trains text models "
                        "(it loads a tokenizer, not an image processor). Remove the column from the data.")
    keep = (*PREFERENCE_COLUMNS, SYSTEM, *CHAT_TEMPLATE_COLUMNS)
    if set(TOKEN_COLUMNS) <= set(dataset.column_names):
        keep += TOKEN_COLUMNS
    dataset = dataset.select_columns([c for c in keep if c in dataset.column_names])
    if _needs_extraction(dataset):  # per source, so that a mixture never pairs a prompt-less row with None
        dataset = dataset.map(explicit_prompt, desc=f"Extracting prompts ({source.label})")
    if source.fraction is not None:
        dataset = dataset.shuffle(seed=seed).select(range(max(1, round(source.fraction * len(dataset)))))
    return dataset


def build_datasets(script_args, data_args: DataArguments, tokenizer=None, max_length=None, seed: int = 0):
    """(train, eval or None, reports): load and mix the sources, hold out a split if asked, check every row."""
    if data_args.datasets:
        sources = data_args.datasets
        eval_dataset = None
    elif script_args.dataset_name:
        common = dict(path=script_args.dataset_name, name=script_args.dataset_config)
        sources = [PreferenceSource(**common, split=script_args.dataset_train_split)]
        eval_source = PreferenceSource(**common, split=script_args.dataset_test_split)
        eval_dataset = _load_optional_split(eval_source, seed)
        if eval_dataset is not None:
            [eval_dataset], _ = with_system_messages([eval_dataset], [eval_source])
    else:
        raise DataError("No dataset: set `dataset_name` (a Hub id or a local path) or a `datasets:` list.")
    datasets, notes = with_system_messages([load_source(s, seed) for s in sources], sources)
    train_dataset = mix(datasets, sources)
    if tokenizer is not None:  # before any model is loaded
        require_chat_template(train_dataset, sources, tokenizer)
    if data_args.test_split_size is not None:
        size = data_args.test_split_size
        split = train_dataset.train_test_split(test_size=int(size) if size >= 1 else size, seed=data_args.test_split_seed)
        train_dataset, eval_dataset = split["train"], split["test"]
    reports, checked = [], {}
    base = (sources[0].path or str(sources[0].data_files)) if len(sources) == 1 else f"mixture of {len(sources)}"
    for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is not None:
            checked[name], report = check_dataset(dataset, f"{base} ({name})", tokenizer, max_length,
                                                  data_args.invalid_rows)
            report.notes = notes if name == "train" else []
            reports.append(report)
    return checked["train"], checked.get("eval"), reports


def _load_optional_split(source: PreferenceSource, seed: int) -> Dataset | None:
    try:
        return load_source(source, seed)
    except ValueError as err:  # datasets: 'Unknown split "test". Should be one of [...]'
        if "Unknown split" in str(err) or "split" in str(err).lower() and "not found" in str(err).lower():
            return None
        raise


def _builder_for(data_files) -> str:
    first = data_files if isinstance(data_files, str) else next(iter(
        data_files.values() if isinstance(data_files, dict) else data_files))
    first = first[0] if isinstance(first, list) else first
    suffixes = [s for s in Path(first).suffixes if s != ".gz"]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(f"Cannot tell the format of {first!r}: use .json, .jsonl, .parquet or .csv, or set `path`.")
    return builder


def mix(datasets: list[Dataset], sources: list[PreferenceSource]) -> Dataset:
    """Concatenate sources, cast to one schema; with weights, take round(w_i * N) rows of each, N as large as no
    source is oversampled."""
    kinds = {_is_conversational(d[0]) for d in datasets if len(d)}
    if len(kinds) > 1:
        raise DataError("The mixture combines conversational (message lists) and standard (string) sources; "
                        "convert them to one format first.")
    for column in (*CHAT_TEMPLATE_COLUMNS, TOKEN_COLUMNS[0]):
        having = [s.label for s, d in zip(sources, datasets) if column in d.column_names]
        if having and column == TOKEN_COLUMNS[0] and len(having) < len(datasets):
            raise DataError(f"Only some sources of the mixture are pre-tokenised ({having} have {list(TOKEN_COLUMNS)})"
                            "; train them apart, or drop the id columns to tokenise every source from its text.")
        if having and len(having) < len(datasets):
            raise DataError(f"Only some sources of the mixture have a {column!r} column ({having}); TRL applies it "
                            "per row, so give every source the column (empty values are fine) or none.")
    datasets = one_schema(datasets, sources)
    weights = [s.weight for s in sources]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            raise DataError("Set `weight` on every source of the mixture or on none of them.")
        shares = [w / sum(weights) for w in weights]
        total = min(len(d) / share for d, share in zip(datasets, shares))
        datasets = [d.select(range(round(share * total))) for d, share in zip(datasets, shares)]
    return concatenate_datasets(datasets) if len(datasets) > 1 else datasets[0]


def _is_conversational(row: dict) -> bool:
    return isinstance(row.get("chosen"), list)


# --- One format and one schema for every source -----------------------------------------------------------------


def with_system_messages(datasets: list[Dataset], sources: list[PreferenceSource]) -> tuple[list[Dataset], list[str]]:
    """Sources with a `system` column become conversational: [system (when its text is not empty), user] prompt
    messages, one assistant message per completion. When any source has one, the other text sources become messages
    too (no system message), so the whole mixture goes through the chat template. Returns the datasets and one note
    per converted source for the data check."""
    if not any(SYSTEM in d.column_names for d in datasets):
        return datasets, []
    converted, notes = [], []
    for dataset, source in zip(datasets, sources):
        if SYSTEM not in dataset.column_names and len(dataset) and _is_conversational(dataset[0]):
            converted.append(dataset)  # already messages, with no system text to add
            continue
        dataset, note = _to_messages(dataset, source)
        converted.append(dataset)
        notes.append(note)
    return converted, notes


def _to_messages(dataset: Dataset, source: PreferenceSource) -> tuple[Dataset, str]:
    desc = f"Building chat messages ({source.label})"
    if SYSTEM not in dataset.column_names:
        return dataset.map(_as_messages, desc=desc), (
            f"{source.label}: text rows -> user/assistant chat messages (no system message), to match the "
            "mixture's sources with a `system` column.")
    _check_system_column(dataset, source)
    with_message = sum(map(_is_text, dataset[SYSTEM]))
    return dataset.map(_as_messages, remove_columns=[SYSTEM], desc=desc), (
        f"{source.label}: `system` column -> chat messages (a system message in {with_message} of {len(dataset)} "
        "rows; empty system texts add none), completions as assistant messages; the chat template formats them.")


def _check_system_column(dataset: Dataset, source: PreferenceSource):
    for index, value in enumerate(dataset[SYSTEM]):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source.label}, row {index}, column 'system': expected text, got "
                            f"{type(value).__name__} {value!r:.40}.")


def _as_messages(row: dict) -> dict:
    """One row as messages. Values that are not text are left as they are, for `check_row` to report."""
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    system = row.get(SYSTEM)
    if _is_text(system) and isinstance(messages, list):
        messages = [{"role": "system", "content": system}, *messages]
    completions = {c: [{"role": "assistant", "content": row[c]}] if isinstance(row[c], str) else row[c]
                   for c in ("chosen", "rejected")}
    return {"prompt": messages, **completions}


def _is_text(system) -> bool:
    """A system text that adds a message: not None (a csv's empty cell), not empty or blank."""
    return isinstance(system, str) and bool(system.strip())


def require_chat_template(dataset: Dataset, sources: list[PreferenceSource], tokenizer):
    """Conversational rows are formatted by the tokenizer's chat template: without one, stop now, naming why."""
    if not len(dataset) or not _is_conversational(dataset[0]) or getattr(tokenizer, "chat_template", None):
        return
    labels = ", ".join(s.label for s in sources)
    raise DataError(f"{labels}: the rows are chat messages (a `system` column, or message lists), which the "
                    "tokenizer's chat template formats, but this tokenizer has no chat template. Use a tokenizer "
                    "with one (a chat/instruct model's), or keep a text source as text by mapping its system column "
                    "away (`column_map: {system: unused_system}`).")


def one_schema(datasets: list[Dataset], sources: list[PreferenceSource]) -> list[Dataset]:
    """Cast every source to one schema: builders differ in how they type the same data (csv and parquet give
    `large_string`, json `string`; message fields come in any order), which `concatenate_datasets` refuses."""
    if len(datasets) < 2:
        return datasets
    plain = [Features({k: _plain(v) for k, v in d.features.items()}) for d in datasets]
    target = {}
    for column in dict.fromkeys(k for features in plain for k in features):
        types = {s.label: f[column] for f, s in zip(plain, sources) if column in f and not _is_null(f[column])}
        if len({repr(_sorted(t)) for t in types.values()}) > 1:
            found = "; ".join(f"{label}: {t}" for label, t in types.items())
            raise DataError(f"The mixture's sources type column {column!r} differently ({found}). Give it the same "
                            "content in every source (text, or messages with the same fields).")
        target[column] = next(iter(types.values()), Value("null"))
    cast = []
    for dataset in datasets:
        features = Features({k: target[k] for k in dataset.column_names})
        cast.append(dataset if dataset.features.arrow_schema == features.arrow_schema else dataset.cast(features))
    return cast


def _plain(feature):
    """The feature with `large_string` as `string` and large lists as lists, recursively."""
    if isinstance(feature, Value) and feature.dtype == "large_string":
        return Value("string")
    if isinstance(feature, (List, LargeList)):
        return List(_plain(feature.feature))
    if isinstance(feature, dict):
        return {k: _plain(v) for k, v in feature.items()}
    return feature


def _sorted(feature):
    """For comparing types: message fields in any order are the same type."""
    if isinstance(feature, List):
        return List(_sorted(feature.feature))
    if isinstance(feature, dict):
        return {k: _sorted(feature[k]) for k in sorted(feature)}
    return feature


def _is_null(feature) -> bool:
    return (isinstance(feature, Value) and feature.dtype == "null") or (
        isinstance(feature, List) and _is_null(feature.feature))


# --- Row checks -------------------------------------------------------------------------------------------------

SKIPPABLE = ("empty completion", "chosen identical to rejected", "prompt fills max_length")


def explicit_prompt(row: dict) -> dict:
    """Give an implicit-prompt row an explicit prompt: TRL's shared-prefix extraction. A string prompt next to
    conversational completions (UltraFeedback) is a copy of the first turn, so it is re-extracted too."""
    if row.get("prompt") is not None and _is_conversational(row) == isinstance(row["prompt"], list):
        return row
    if not _same_kind(row.get("chosen"), row.get("rejected")):
        return row  # reported by check_row
    return extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})


def _same_kind(a, b) -> bool:
    return (isinstance(a, str) and isinstance(b, str)) or (isinstance(a, list) and isinstance(b, list))


def check_row(row: dict) -> tuple[str, str] | None:
    """(column, problem) for the first problem in an explicit-prompt row, or None. Problems in SKIPPABLE may be
    dropped; any other is structural."""
    conversational = isinstance(row.get("chosen"), list)
    for column in PREFERENCE_COLUMNS:
        value = row.get(column)
        if value is None:
            return column, ("empty completion" if column != "prompt" else "missing prompt (None)")
        if conversational:
            problem = _message_problem(value, allow_empty=column != "prompt")
        elif not isinstance(value, str):
            problem = f"expected text, got {type(value).__name__} {value!r:.40}"
        else:
            problem = None
        if problem:
            return column, problem
    if TOKEN_COLUMNS[0] in row:
        return _ids_problem(row)
    for column in ("chosen", "rejected"):
        if not _text_of(row[column]).strip():
            return column, "empty completion"
    if row["chosen"] == row["rejected"]:
        return "chosen", "chosen identical to rejected"
    return None


def _ids_problem(row: dict) -> tuple[str, str] | None:
    """check_row for a pre-tokenised row: its ids are what trains (an EOS-only completion is not empty)."""
    for column in TOKEN_COLUMNS:
        ids = row[column]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return column, f"expected a list of token ids, got {ids!r:.40}"
        if not ids:
            return column, "empty completion" if column != "prompt_ids" else "empty prompt_ids"
    if row["chosen_ids"] == row["rejected_ids"]:
        return "chosen_ids", "chosen identical to rejected"
    return None


def _message_problem(messages, allow_empty: bool) -> str | None:
    if not isinstance(messages, list):
        return f"expected a list of messages, got {type(messages).__name__}"
    if not messages and not allow_empty:
        return "empty message list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            return f"message {i} is not a {{role, content}} mapping: {message!r:.60}"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; expected one of {sorted(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {i} content is {type(message['content']).__name__}, not text"
    return None


def _text_of(value) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


@dataclass
class DataReport:
    """What the checks found in one split: rows kept, and rows dropped per reason with example row indices."""

    name: str
    rows: int
    dropped: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was done to the sources (e.g. system messages)

    @property
    def kept(self) -> int:
        return self.rows - sum(len(v) for v in self.dropped.values())

    def __str__(self) -> str:
        notes = "".join(f"\n    {note}" for note in self.notes)
        if not self.dropped:
            return f"{self.name}: {self.rows} rows, all valid.{notes}"
        parts = [f"{reason}: {len(rows)} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
                 for reason, rows in self.dropped.items()]
        return f"{self.name}: {self.rows} rows, dropped {self.rows - self.kept}: " + "; ".join(parts) + notes


def check_dataset(dataset: Dataset, name: str, tokenizer=None, max_length: int | None = None,
                  invalid_rows: str = "drop") -> tuple[Dataset, DataReport]:
    """Check every row (see module docstring). Returns the kept rows and a report; raises DataError otherwise."""
    if invalid_rows not in ("drop", "error"):
        raise DataError(f"`invalid_rows` must be 'drop' or 'error', got {invalid_rows!r}.")
    dataset = dataset.map(explicit_prompt, desc=f"Extracting prompts ({name})") if _needs_extraction(dataset) else dataset
    problems = {}
    for index, row in enumerate(dataset):
        problem = check_row(row)
        if problem is not None:
            problems[index] = problem
    if tokenizer is not None and max_length is not None:
        for index in _prompts_filling(dataset, tokenizer, max_length, skip=problems):
            problems[index] = ("prompt", "prompt fills max_length")

    dropped = defaultdict(list)
    for index, (column, problem) in sorted(problems.items()):
        if problem not in SKIPPABLE or invalid_rows == "error":
            hint = "" if problem not in SKIPPABLE else " (or set `invalid_rows: drop` to skip such rows)"
            if problem == "prompt fills max_length":
                hint = f" Raise `max_length` (now {max_length}) or set `invalid_rows: drop`."
            raise DataError(f"{name}, row {index}, column {column!r}: {problem}.{hint}")
        dropped[problem].append(index)
    report = DataReport(name=name, rows=len(dataset), dropped=dict(dropped))
    if report.kept == 0:
        reasons = "; ".join(f"{reason}: {len(rows)}" for reason, rows in report.dropped.items())
        raise DataError(f"{name}: no valid rows left after the checks ({reasons}). Fix the data or the settings "
                        "named above (e.g. raise `max_length`).")
    if problems:
        keep = sorted(set(range(len(dataset))) - set(problems))
        dataset = dataset.select(keep)
    return dataset, report


def _needs_extraction(dataset: Dataset) -> bool:
    if "prompt" not in dataset.column_names:
        return True
    return len(dataset) > 0 and _is_conversational(dataset[0]) != isinstance(dataset[0]["prompt"], list)


def _prompts_filling(dataset: Dataset, tokenizer, max_length: int, skip: dict) -> list[int]:
    """Row indices whose prompt alone has >= max_length tokens (TRL would train on no completion token there)."""
    full = []
    for index, row in enumerate(dataset):
        if index in skip:
            continue
        prompt = row["prompt"]
        if row.get(TOKEN_COLUMNS[0]) is not None:  # pre-tokenised: these ids are what trains
            ids = row[TOKEN_COLUMNS[0]]
        elif isinstance(prompt, list):  # with the row's tools and template kwargs, as TRL tokenizes it
            tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, tools=tools,
                                                **(row.get("chat_template_kwargs") or {}))
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding (a UserDict, not a dict)
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_length:
            full.append(index)
    return full


def summarize(reports: list[DataReport]) -> str:
    return "Data check:\n" + "\n".join(f"  {r}" for r in reports)

