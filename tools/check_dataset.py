"""Run ``detect.cli.check_dataset`` from a clone without installing the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detect.cli.check_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
