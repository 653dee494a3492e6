"""The examples of README.md and docs/*.md run, so they cannot drift from the code.

Every fenced block of the pages is one of:
- ```bash: commands, run in a shell at the repository root (offline); they must exit 0.
- ```console: `$ command` lines followed by the output the page shows; every shown output line must appear, as is,
  in what the command prints (exit status free: an error message is a valid example).
- ```yaml: parsed; a recipe (or recipe fragment) goes through the recipe check `gpo-trl train` runs before
  anything loads (`gpo_trl.recipe.parse_args`), a generation-evaluation file through its loader. Preceded by
  `<!-- file: PATH -->` the block must be the shipped file PATH, which is checked by its own loader (sweep, iterate,
  generation file or recipe).
- ```python: run as a script in a fresh interpreter.
- a block without a language: output or formulas, never run; it must not hold a command.
A block that trains for long or needs a GPU, a cluster or the Hub is preceded by `<!-- not-run: REASON -->`; the
reason is required. The paths a command names (configs/..., scripts/..., tests/..., docs/...) must exist in the
repository, in run and not-run blocks alike, except where a flag names an output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TAG = re.compile(r"^<!--\s*(not-run|file)\s*:?\s*(.*?)\s*-->$")
LANGUAGES = {"bash", "console", "yaml", "python", "text", ""}
TOP_DIRS = ("configs/", "scripts/", "tests/", "docs/", "gpo_trl/", "benchmarks/", ".ci/")
# Flags whose value is something the command writes, not a file the repository must ship.
OUTPUT_FLAGS = {"--out", "--output_dir", "--json", "--record", "--markdown", "--metrics_file", "--emit-slurm"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    tag: str | None = None  # not-run | file
    tag_value: str = ""

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.relative_to(REPO)}:{i + 1}: unclosed code block"
        block = Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n")
        tag = TAG.match(lines[i - 1].strip()) if i else None
        if tag:
            block.tag, block.tag_value = tag.group(1), tag.group(2)
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def blocks_of(*languages: str, runnable: bool | None = None) -> list:
    chosen = [b for b in BLOCKS if b.language in languages]
    if runnable is not None:
        chosen = [b for b in chosen if (b.tag != "not-run") == runnable]
    return [pytest.param(b, id=b.id) for b in chosen]


def environment() -> dict:
    """This checkout's gpo_trl and console script first; offline, as the tests always are."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_shell(command: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


# --- Every page's blocks are well formed ------------------------------------------------------------------------


def test_pages_have_blocks_and_known_tags():
    assert len(PAGES) >= 10 and len(BLOCKS) >= 30, (len(PAGES), len(BLOCKS))
    for page in PAGES:  # a tag that is misspelt, or not right above a fence, would silently not apply
        lines = page.read_text().split("\n")
        for number, line in enumerate(lines, 1):
            if re.match(r"^<!--\s*(not-run|file|keys-only|not run|notrun|run)", line.strip()):
                assert TAG.match(line.strip()) and number < len(lines) and lines[number].startswith("```"), \
                    f"{page.relative_to(REPO)}:{number}: a tag must be `<!-- KIND: ... -->` right above a code block"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_block_language_and_tag(block):
    assert block.language in LANGUAGES, f"{block.id}: unknown block language {block.language!r}"
    if block.tag == "not-run":
        assert len(block.tag_value.split()) >= 2, f"{block.id}: `<!-- not-run: REASON -->` needs a reason"
    if block.tag == "file":
        assert (REPO / block.tag_value).is_file(), f"{block.id}: {block.tag_value} is not in the repository"
    if block.language == "":  # output and formulas: a command hidden here would never be tested
        first = block.text.lstrip().split("\n")[0]
        assert not re.match(r"^(\$ |gpo-trl |python |pip |accelerate |sbatch |bash )", first), \
            f"{block.id}: a command in a block without a language; use ```bash or ```console"
    assert block.tag != "file" or block.language == "yaml", f"{block.id}: `file:` is for YAML blocks"


# --- Paths named by commands exist ------------------------------------------------------------------------------


def named_paths(command_text: str) -> list[str]:
    words = re.findall(r"[^\s\"'`=]+", re.sub(r"#[^\n]*", "", command_text))
    paths = []
    for previous, word in zip(["", *words], words):
        if previous in OUTPUT_FLAGS or not word.startswith(TOP_DIRS):
            continue
        paths.append(word.rstrip(",;)"))
    return paths


def command_text(block: Block) -> str:
    if block.language == "console":
        return "\n".join(line[2:] for line in block.text.split("\n") if line.startswith("$ "))
    return block.text


@pytest.mark.parametrize("block", blocks_of("bash", "console"))
def test_named_paths_exist(block):
    missing = [p for p in named_paths(command_text(block)) if not (REPO / p).exists()]
    assert not missing, f"{block.id}: names {missing}, which the repository does not have"


def test_named_paths_finds_paths():
    """The path scan above must see paths, or it would pass on anything."""
    found = named_paths("gpo-trl train --config configs/demo.yaml --out docs/study # configs/not/here.yaml")
    assert found == ["configs/demo.yaml"]


# --- Shell blocks run -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("bash", runnable=True))
def test_bash_block_runs(block):
    result = run_shell(block.text)
    assert result.returncode == 0, f"{block.id} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """[(command, shown output lines)] of a console block."""
    pairs = []
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            assert pairs, f"console block output before any `$ ` command: {line!r}"
            pairs[-1][1].append(line.rstrip())
    return pairs


@pytest.mark.parametrize("block", blocks_of("console", runnable=True))
def test_console_block_output(block):
    for command, shown in console_commands(block.text):
        result = run_shell(command)
        printed = {line.rstrip() for line in (result.stdout + result.stderr).split("\n")}
        missing = [line for line in shown if line.strip() and line not in printed]
        assert shown and not missing, (f"{block.id}: `{command}` (exit {result.returncode}) no longer prints "
                                       f"{missing}; it printed:\n{result.stdout}{result.stderr}")


# --- Python blocks run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("python", runnable=True))
def test_python_block_runs(block):
    result = subprocess.run([sys.executable, "-c", block.text], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{block.id}:\n{result.stderr}"


# --- YAML blocks are valid configs ------------------------------------------------------------------------------


def check_recipe(path: Path):
    from gpo_trl.recipe import parse_args

    # use_cpu: TRL's defaults ask for bf16, which a machine without a GPU refuses in the check.
    parse_args(["--config", str(path), "--use_cpu", "true"])


def check_config_file(path: Path, content: dict):
    """The check the command that reads this kind of file runs before any model loads."""
    if {"base", "grid"} <= set(content):
        from gpo_trl.experiments.sweep import load_sweep

        load_sweep(str(path))
    elif {"base", "rounds"} <= set(content):
        from gpo_trl.online.iterate import load_plan

        load_plan(str(path))
    elif {"prompts", "judge"} <= set(content):
        from gpo_trl.online.generate_eval import load_settings

        load_settings(str(path))
    else:
        check_recipe(path)


@pytest.mark.parametrize("block", blocks_of("yaml"))
def test_yaml_block(block, tmp_path):
    content = yaml.safe_load(block.text)
    assert isinstance(content, dict), f"{block.id}: not a YAML mapping"
    if block.tag == "not-run":
        return  # parsed above; the reason says why it cannot be checked further
    if block.tag == "file":
        shipped = REPO / block.tag_value
        assert content == yaml.safe_load(shipped.read_text()), f"{block.id} differs from {block.tag_value}"
        check_config_file(shipped, content)
    else:
        path = tmp_path / "example.yaml"
        path.write_text(block.text)
        check_config_file(path, content)


def test_yaml_check_catches_a_typo(tmp_path):
    """The recipe check the YAML blocks go through refuses what a page must not show."""
    from gpo_trl.errors import ConfigError

    path = tmp_path / "typo.yaml"
    path.write_text("gpo_loss: logistic\nbta: 0.1\n")
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        check_config_file(path, yaml.safe_load(path.read_text()))


# --- The CLI reference covers every command ---------------------------------------------------------------------


def test_cli_reference_lists_every_command():
    """docs/cli.md is rendered from COMMANDS (scripts/docs_cli_reference.py, at build time): every command that
    `gpo-trl --help` offers must be there."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import docs_cli_reference
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from gpo_trl.cli import COMMANDS

    top = run_shell("gpo-trl --help")  # lists each command as `name: what it does`
    offered = {name for name in COMMANDS if re.search(rf"(?<![\w-]){name}: ", top.stdout)}
    assert top.returncode == 0 and offered == set(COMMANDS), top.stdout + top.stderr
    documented = {argv[0] for argv, _ in docs_cli_reference.COMMANDS if argv[0] != "--help"}
    assert documented == offered, (documented, offered)
    assert docs_cli_reference.MARKER in (REPO / "docs" / "cli.md").read_text()


# --- The landing page -------------------------------------------------------------------------------------------


def test_readme_is_a_landing_page_whose_links_resolve():
    """mkdocs checks the site's links; README.md is outside the site, so its relative links are checked here."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.split("\n")) <= 300
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"^[a-z]+://", link)]
    assert len(local) >= 10 and not [link for link in local if not (REPO / link).exists()], local


def test_demo_output_is_shown_the_same_everywhere():
    """The demo's summary appears in README.md and docs/getting-started.md; both copies must agree (the numbers
    are the ones the demo printed; tests/test_cli.py runs the demo)."""
    shown = [b.text for b in BLOCKS if b.language == "" and b.text.startswith("Data check:\n  runs/demo/")]
    assert len(shown) == 2 and shown[0] == shown[1], shown
