"""`python -m gpo_trl ...` is the `gpo-trl` command."""

import sys

from .cli import main

sys.exit(main())
