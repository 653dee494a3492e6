"""`python -m benchmarks ...` (from the repository root): the benchmark's command line, benchmarks/cli.py."""

import sys

from .cli import main

sys.argv[0] = "python -m benchmarks"  # argparse's usage line would say "__main__.py"
sys.exit(0 if main() else 1)
