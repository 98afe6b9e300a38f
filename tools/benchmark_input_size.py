#!/usr/bin/env python
"""Source-checkout entry of `detect-benchmark-input-size`: `python tools/benchmark_input_size.py --config C --set data.root=DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detect.cli.benchmark_input_size import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
