"""The docs site's CLI reference, generated from the parsers: an mkdocs hook (mkdocs.yml `hooks:`).

docs/cli.md holds the marker `<!-- cli-help -->`; at build time it becomes the `--help` text of every `gpo-trl`
command, as `gpo-trl` prints it today, so the page cannot drift from the code. The help texts come from one child
process in offline mode (no Hub, no network); a command whose `--help` fails makes the build fail (a warning, which
`mkdocs build --strict` turns into an error).

Run it alone to print the generated Markdown: `python scripts/docs_cli_reference.py`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- cli-help -->"
ROOT = Path(__file__).resolve().parent.parent

# (argv after `gpo-trl`, what the section is about). Every command of `gpo-trl` appears here (tests/test_docs.py).
COMMANDS = [
    (["--help"], "The commands."),
    (["train", "--help"], "Run a YAML recipe (every key of the recipe is an option; see Recipes and data)."),
    (["evaluate", "--help"], "Score a trained adapter on the recipe's test split."),
    (["evaluate", "--generate", "--help"], "Evaluation by generation (`--generate`, `--compare`)."),
    (["iterate", "--help"], "On-policy rounds with a judge."),
    (["sweep", "--help"], "A grid of recipes."),
    (["study", "--help"], "The controlled gold-reward study."),
    (["merge", "--help"], "Fold a LoRA adapter into its base model."),
    (["push", "--help"], "Upload a finished run's output_dir."),
    (["losses", "--help"], "The loss registry."),
]

# Runs in the child: each argv through gpo_trl.cli.main, stdout captured, the exit status kept.
_CHILD = r"""
import contextlib, io, json, sys
from gpo_trl.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append({"argv": argv, "code": code or 0, "text": out.getvalue()})
print("\n@@gpo-cli-help@@" + json.dumps(results))
"""

log = logging.getLogger("mkdocs.plugins.gpo_cli_reference")


def collect(commands: list[list[str]]) -> list[dict]:
    """Every command's help text, from one offline child process run at the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "COLUMNS": "100"}  # argparse wraps at COLUMNS: a fixed width makes the page the same everywhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or "@@gpo-cli-help@@" not in proc.stdout:
        raise RuntimeError(f"collecting the CLI help failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.rsplit("@@gpo-cli-help@@", 1)[1])


def render(results: list[dict], notes: dict[str, str]) -> str:
    sections = []
    for result in results:
        command = " ".join(["gpo-trl", *result["argv"]])
        title = command.removesuffix(" --help")
        body = result["text"].rstrip().replace("```", "'''")
        sections.append(f"## `{title}`\n\n{notes.get(command, '')}\n\n```text\n$ {command}\n{body}\n```\n")
    return "\n".join(sections)


def failures(results: list[dict]) -> list[str]:
    return [f"`gpo-trl {' '.join(r['argv'])}` exited {r['code']}" + ("" if r["text"].strip() else " and printed "
            "nothing on stdout") for r in results if r["code"] != 0 or not r["text"].strip()]


def cli_reference() -> tuple[str, list[str]]:
    results = collect([argv for argv, _ in COMMANDS])
    notes = {" ".join(["gpo-trl", *argv]): note for argv, note in COMMANDS}
    return render(results, notes), failures(results)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    text, failed = cli_reference()
    for problem in failed:
        log.warning(f"CLI reference: {problem}; its --help must work (docs/cli.md).")
    return markdown.replace(MARKER, text)


if __name__ == "__main__":
    text, failed = cli_reference()
    print(text)
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    sys.exit(1 if failed else 0)
