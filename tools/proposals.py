#!/usr/bin/env python
"""Source-checkout entry of `detect-proposals`: `python tools/proposals.py compute|merge|eval|show --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proposals.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
