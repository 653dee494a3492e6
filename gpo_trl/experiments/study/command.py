"""`gpo-trl study` / `python -m gpo_trl.experiments.study`: run a study, or redraw its outputs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import load_config
from .report import write_outputs
from .run import run_study


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="gpo-trl study", description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study file (configs/studies/*.yaml)")
    parser.add_argument("--out", required=True, help="where results, tables and plots are written")
    parser.add_argument("--seed", type=int, help="overrides the file's seed")
    parser.add_argument("--replot", action="store_true",
                        help="redraw tables and plots from the results already in --out, without training")
    args = parser.parse_args(argv)
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
