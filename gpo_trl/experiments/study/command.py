"""`gpo-trl study` / `python -m gpo_trl.experiments.study`: run a study, or redraw its outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import load_config
from .report import write_outputs
from .run import run_study


def main(argv=None) -> dict:
    from ...cli import study_parser  # the parser lives with the command line, which builds it without torch

    args = study_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(args.config)
    if args.seed is not None:
        config.seed = args.seed
    if args.replot:
        out = Path(args.out)
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        write_outputs(rows, json.loads((out / "summary.json").read_text()), config, out)
        return {"rows": rows}
    _quiet()
    result = run_study(config, Path(args.out))
    print(f"{len(result['rows'])} runs in {result['summary']['seconds']:.0f}s; results in {args.out}")
    return result


def _quiet():
    """Per-run library chatter (progress bars, dataset maps) would bury the study's own log lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
