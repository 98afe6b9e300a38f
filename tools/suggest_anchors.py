#!/usr/bin/env python
"""Source-checkout entry of `detect-suggest-anchors`: `python tools/suggest_anchors.py --voc ROOT --split S`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detect.cli.suggest_anchors import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
