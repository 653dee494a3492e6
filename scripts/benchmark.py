"""`python scripts/benchmark.py ...` is `python -m benchmarks ...`: the benchmark lives in the package benchmarks/
(one module per part; see benchmarks/__init__.py); this file keeps the documented command working from anywhere."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, where benchmarks/ is

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
