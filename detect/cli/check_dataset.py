"""``detect-check-dataset``: report annotation problems in one split of a VOC-format dataset.

Exit status: 0 clean, 1 problems found, 2 usage error (missing root/split, bad arguments).
"""

from __future__ import annotations

import argparse
import sys

from detect.cli.common import add_runtime_args, apply_runtime
from detect.data.checks import check_voc
from detect.errors import DetectError
from detect.utils.io import atomic_write_json


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-check-dataset", description=__doc__.splitlines()[0])
    parser.add_argument("--voc", required=True, metavar="ROOT", help="dataset root (Annotations/, ImageSets/, JPEGImages/)")
    parser.add_argument("--split", default="trainval", help="split file in ImageSets/Main (default: trainval)")
    parser.add_argument("--classes", default="auto",
                        help="comma-separated class names, 'voc' (20 PASCAL classes) or 'auto' (default)")
    parser.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    parser.add_argument("--no-decode", action="store_true", help="do not decode images (faster; skips corrupt/size checks)")
    parser.add_argument("--strict", action="store_true",
                        help="notes (empty images, boxes crossing the border) count as problems")
    parser.add_argument("--max-per-kind", type=int, default=20, help="lines printed per kind of problem (default: 20)")
    add_runtime_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:      # argparse already printed the usage message
        return 0 if exc.code == 0 else 2
    apply_runtime(args)
    classes = args.classes if args.classes in ("auto", "voc") else [c.strip() for c in args.classes.split(",") if c.strip()]
    try:
        if not classes:
            raise DetectError("--classes is empty; give names separated by commas, 'voc' or 'auto'")
        report = check_voc(args.voc, args.split, classes, check_images=not args.no_decode)
        print(report.format(max_per_kind=args.max_per_kind))
        if args.json:
            atomic_write_json(args.json, report.to_json())
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = not report.clean or (args.strict and bool(report.problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
