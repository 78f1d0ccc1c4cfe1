"""`python -m pymach ...`: the `pymach` command (cli/main.py), for when the console
script is not on PATH."""

from __future__ import annotations

import sys

from pymach.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
