"""Every user mistake we know of gets one clear line naming the path or key, an exit code, and no traceback, before
any model is sampled or trained. One table holds them all (`USER_MISTAKES`); each row runs the command in-process
(as `gpo-trl ...` would: `gpo_trl.cli.main`, or the training recipe's entry point `gpo_trl.recipe.run`).

To add a case: append a `Mistake` to USER_MISTAKES. `argv(w)` builds the command line from the workspace `w` (a
trained LoRA adapter, its base, bases of another shape or another seed, prompt and config files); `setup(w)` may
create what the case needs first; `untouched(w)` returns paths that must not exist afterwards (nothing written)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from gpo_trl.cli import main as cli
from gpo_trl.recipe import main as recipe_main
from gpo_trl.recipe import run as recipe_run
from test_pipeline import demo_args

DEMO = str(REPO / "configs" / "demo.yaml")


@dataclass
class Mistake:
    id: str
    argv: Callable  # workspace -> the command's arguments (after `gpo-trl`, or the recipe's with runner="recipe")
    code: int  # expected exit code
    message: str  # a substring of the one-line message
    setup: Callable = lambda w: None
    runner: str = "cli"  # "cli": gpo_trl.cli.main; "recipe": gpo_trl.recipe.run (what `gpo-trl train` launches)
    untouched: Callable = field(default=lambda w: [])


class Workspace:
    """Paths shared by the cases; `fresh` is a per-case folder."""

    def __init__(self, root: Path):
        self.root = root
        self.adapter = root / "run" / "out"
        self.base = root / "run" / "assets" / "model"
        self.data = root / "run" / "assets" / "data"
        self.fresh = root

    def adapter_on(self, base, name: str, keep_record: bool = True, record: str | None = None) -> Path:
        """A copy of the trained adapter whose adapter_config.json names another base (and, given `record`, whose
        gpo_run.json holds that text)."""
        copy = self.fresh / name
        shutil.copytree(self.adapter, copy, ignore=shutil.ignore_patterns("checkpoint-*", ".gpo-trl"))
        config = json.loads((copy / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (copy / "adapter_config.json").write_text(json.dumps(config))
        if not keep_record:
            (copy / "gpo_run.json").unlink()
        if record is not None:
            (copy / "gpo_run.json").write_text(record)
        return copy

    def generate_yaml(self, **changes) -> str:
        spec = {"prompts": {"data_files": str(self.root / "prompts.jsonl")}, "judge": {"aux": "length"},
                "samples_per_prompt": 1, "generation": {"max_new_tokens": 4}, **changes}
        path = self.fresh / "generate.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    def sweep_yaml(self) -> str:
        spec = {"base": DEMO, "output_dir": str(self.fresh / "sweep"), "grid": {"beta": [0.1]},
                "overrides": {"model_name_or_path": str(self.base), "dataset_name": str(self.data),
                              "prepare_demo_assets": False}}
        path = self.fresh / "sweep.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def train_args(w, *extra) -> list[str]:
    return ["--config", DEMO, "--model_name_or_path", str(w.base), "--dataset_name", str(w.data),
            "--output_dir", str(w.fresh / "out"), "--prepare_demo_assets", "false", *extra]


USER_MISTAKES = [
    # evaluate --generate / --compare
    Mistake("generate: prompts file missing", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter),
            "--config", w.generate_yaml(prompts={"data_files": str(w.fresh / "nope.jsonl")})], 2,
            "nope.jsonl does not exist"),
    Mistake("generate: prompts file empty", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter),
            "--config", w.generate_yaml(prompts={"data_files": str(write(w.fresh / "empty.jsonl", ""))})], 2,
            "empty.jsonl is empty"),
    Mistake("generate: prompts file of blank lines", lambda w: ["evaluate", "--generate", "--adapter_path",
            str(w.adapter), "--config", w.generate_yaml(prompts={"data_files": str(write(w.fresh / "b.jsonl",
                                                                                         "\n\n"))})], 2,
            "b.jsonl is empty"),
    Mistake("generate: reward model missing", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter),
            "--config", w.generate_yaml(judge={"reward_model": str(w.fresh / "rm")})], 2,
            "`judge.reward_model`: {fresh}/rm does not exist"),
    Mistake("generate: model: missing", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter),
            "--config", w.generate_yaml(model=str(w.fresh / "base"))], 2, "`model:` in {fresh}/generate.yaml: "
            "{fresh}/base does not exist"),
    Mistake("generate: model: not a Hub id", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter),
            "--config", w.generate_yaml(model="no such model!")], 2, "no such model! is neither an existing folder "
            "nor a Hub id"),
    Mistake("generate: model: Hub id not cached offline", lambda w: ["evaluate", "--generate", "--adapter_path",
            str(w.adapter), "--config", w.generate_yaml(model="nobody/nothing")], 2,
            "nobody/nothing is not a local folder, and not in the Hub cache"),
    Mistake("generate: policy missing", lambda w: ["evaluate", "--generate", "--adapter_path", str(w.fresh / "pol"),
            "--config", w.generate_yaml()], 2, "The policy {fresh}/pol does not exist"),
    Mistake("generate: --out holds the user's files",
            lambda w: ["evaluate", "--generate", "--adapter_path", str(w.adapter), "--config", w.generate_yaml(),
                       "--out", str(w.fresh / "mine")], 2,
            "{fresh}/mine holds files gpo-trl did not write there (samples.jsonl, summary.json)",
            setup=lambda w: [write(w.fresh / "mine" / n, "mine") for n in ("summary.json", "samples.jsonl")]),
    Mistake("compare: second policy missing, found before the first is evaluated",
            lambda w: ["evaluate", "--compare", "--config", w.generate_yaml(), str(w.adapter_on(w.base, "first")),
                       str(w.fresh / "second")], 2, "The policy {fresh}/second does not exist",
            untouched=lambda w: [w.fresh / "first" / "generate_eval", Path("generate_compare")]),
    Mistake("evaluate: adapter missing", lambda w: ["evaluate", "--config", DEMO, "--adapter_path",
            str(w.fresh / "gone")], 2, "`--adapter_path`: {fresh}/gone does not exist"),
    # merge
    Mistake("merge: base missing", lambda w: ["merge", "--adapter_path", str(w.adapter_on(w.fresh / "b", "a")),
            "--output_dir", str(w.fresh / "merged")], 2, "base_model_name_or_path in {fresh}/a/adapter_config.json)"
            ": {fresh}/b does not exist", untouched=lambda w: [w.fresh / "merged"]),
    Mistake("merge: base a Hub id not cached offline", lambda w: ["merge", "--adapter_path",
            str(w.adapter_on("someone/base", "a")), "--output_dir", str(w.fresh / "m")], 2,
            "someone/base is not a local folder, and not in the Hub cache"),
    Mistake("merge: base of another shape (recorded)", lambda w: ["merge", "--adapter_path",
            str(w.adapter_on(w.root / "wide", "a")), "--output_dir", str(w.fresh / "m")], 2,
            "does not have the shape of the one {fresh}/a was trained on (intermediate_size: trained 128, base 256)",
            untouched=lambda w: [w.fresh / "m"]),
    Mistake("merge: base of another shape (no record)", lambda w: ["merge", "--adapter_path",
            str(w.adapter_on(w.root / "wide", "a", keep_record=False)), "--output_dir", str(w.fresh / "m")], 2,
            "does not fit the base model {root}/wide (another shape: size mismatch",
            untouched=lambda w: [w.fresh / "m"]),
    Mistake("merge: another base of the same shape", lambda w: ["merge", "--adapter_path",
            str(w.adapter_on(w.root / "other", "a")), "--output_dir", str(w.fresh / "m")], 2,
            "The base model {root}/other is not the model {fresh}/a was trained on", untouched=lambda w: [w.fresh / "m"]),
    Mistake("merge: output_dir is a file", lambda w: ["merge", "--adapter_path", str(w.adapter), "--output_dir",
            str(write(w.fresh / "file", "x"))], 2, "{fresh}/file is a file, not a folder"),
    Mistake("merge: output_dir holds the user's files", lambda w: ["merge", "--adapter_path", str(w.adapter),
            "--output_dir", str(w.fresh)], 2, "holds files gpo-trl did not write there (notes.txt)",
            setup=lambda w: write(w.fresh / "notes.txt", "mine")),
    Mistake("merge: --tolerance -1", lambda w: ["merge", "--adapter_path", str(w.adapter), "--output_dir",
            str(w.fresh / "m"), "--tolerance", "-1"], 2, "`--tolerance` must be a number > 0, got -1"),
    Mistake("merge: --tolerance 0", lambda w: ["merge", "--adapter_path", str(w.adapter), "--output_dir",
            str(w.fresh / "m"), "--tolerance", "0"], 2, "`--tolerance` must be a number > 0, got 0"),
    Mistake("merge: corrupt gpo_run.json", lambda w: ["merge", "--adapter_path",
            str(w.adapter_on(w.base, "a", record='{"gpo_loss": "logis')), "--output_dir", str(w.fresh / "m")], 2,
            "{fresh}/a/gpo_run.json is not valid JSON"),
    # sweep
    Mistake("sweep --collect: corrupt gpo_run.json", lambda w: ["sweep", "--config", w.sweep_yaml(), "--collect"],
            2, "{fresh}/sweep/beta=0.1/gpo_run.json is not a finished run's record",
            setup=lambda w: write(w.fresh / "sweep" / "beta=0.1" / "gpo_run.json", '{"metrics": {"eval_lo')),
    Mistake("sweep --collect: corrupt result.json", lambda w: ["sweep", "--config", w.sweep_yaml(), "--collect"],
            2, "{fresh}/sweep/beta=0.1/result.json is not a point's result",
            setup=lambda w: write(w.fresh / "sweep" / "beta=0.1" / "result.json", "[1, 2")),
    # train (the recipe, as `gpo-trl train` runs it)
    Mistake("train: output_dir holds the user's files", lambda w: ["train", *train_args(w)], 2,
            "`output_dir` {fresh}/out holds files gpo-trl did not write there (thesis.tex)",
            setup=lambda w: write(w.fresh / "out" / "thesis.tex", "mine")),
    Mistake("train: output_dir is a file", lambda w: ["train", *train_args(w)], 2, "`output_dir` {fresh}/out is a file",
            setup=lambda w: write(w.fresh / "out", "x")),
    Mistake("train (the recipe itself): output_dir holds the user's files", lambda w: train_args(w), 1,
            "`output_dir` {fresh}/out holds files gpo-trl did not write there (thesis.tex)",
            setup=lambda w: write(w.fresh / "out" / "thesis.tex", "mine"), runner="recipe"),
    Mistake("train: model missing", lambda w: train_args(w, "--model_name_or_path", str(w.fresh / "nomodel")), 1,
            "`model_name_or_path`: {fresh}/nomodel does not exist", runner="recipe"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_rows) -> Workspace:
    """A 1-step LoRA run on the demo assets; a base of another shape (wide) and one of another seed (other)."""
    root = tmp_path_factory.mktemp("mistakes")
    w = Workspace(root)
    recipe_main(*demo_args(root / "run", "--max_steps", "1"))
    config = AutoConfig.from_pretrained(w.base)
    tokenizer = AutoTokenizer.from_pretrained(w.base)
    for name, change in (("wide", {"intermediate_size": 2 * config.intermediate_size}), ("other", {})):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(w.base, **change))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write(root / "prompts.jsonl", "".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in demo_rows["test"]))
    return w


@pytest.mark.parametrize("mistake", USER_MISTAKES, ids=[m.id for m in USER_MISTAKES])
def test_a_user_mistake_gets_one_line_and_no_traceback(mistake, workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workspace.fresh = tmp_path
    mistake.setup(workspace)
    argv = mistake.argv(workspace)
    started = time.time()
    try:
        code = cli(argv) if mistake.runner == "cli" else recipe_run(argv)
    except SystemExit as exit:  # the recipe exits with its message, as `gpo-trl train` does
        code, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code, "")
        print(message, file=sys.stderr)
    err = capsys.readouterr().err
    expected = mistake.message.format(fresh=tmp_path, root=workspace.root)
    assert code == mistake.code, err
    assert "Traceback" not in err and expected in err, err
    line = next(line for line in err.splitlines() if expected[:30] in line)
    assert expected in line  # the message is one line
    assert time.time() - started < 20  # before any sampling or training
    for path in mistake.untouched(workspace):
        assert not (tmp_path / path).exists(), path


def test_a_different_base_can_be_merged_when_asked(workspace, tmp_path):
    """`--allow_different_base`: the check is an informed choice, not a wall."""
    workspace.fresh = tmp_path
    adapter = workspace.adapter_on(workspace.root / "other", "a")
    assert cli(["merge", "--adapter_path", str(adapter), "--output_dir", str(tmp_path / "m"),
                "--allow_different_base"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
