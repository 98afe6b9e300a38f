#!/usr/bin/env python
"""Source-checkout entry of `detect-export`: `python tools/export.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detect.cli.export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
