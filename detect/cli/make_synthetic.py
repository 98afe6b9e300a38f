"""``detect-make-synthetic``: write the synthetic shapes dataset (PASCAL VOC layout)."""

from __future__ import annotations

import argparse
import sys

from detect.cli.common import add_runtime_args, apply_runtime
from detect.data.synthetic import STYLES, SYNTHETIC_CLASSES, generate_synthetic
from detect.errors import DetectError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-make-synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset root to write (created when missing)")
    parser.add_argument("--images", type=int, default=200, help="number of images (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default: 0)")
    parser.add_argument("--min-side", type=int, default=192, help="smallest image side in pixels (default: 192)")
    parser.add_argument("--max-side", type=int, default=320, help="largest image side in pixels (default: 320)")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects per image (default: 6)")
    parser.add_argument("--empty-fraction", type=float, default=0.08, help="share of images without objects (default: 0.08)")
    parser.add_argument("--style", choices=STYLES, default="cluttered",
                        help="cluttered: every texture, distractor lines and blobs; plain: flat or noisy fills on a "
                             "smooth background (default: cluttered)")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (same files; default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset made with other parameters")
    add_runtime_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    apply_runtime(args)
    try:
        root = generate_synthetic(args.out, args.images, args.seed, min_side=args.min_side, max_side=args.max_side,
                                  max_objects=args.max_objects, empty_fraction=args.empty_fraction,
                                  style=args.style, workers=args.workers, overwrite=args.overwrite)
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"synthetic dataset: {root} ({args.images} images, seed {args.seed}, classes: {', '.join(SYNTHETIC_CLASSES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
