"""``detect-convert`` / ``tools/convert.py``: VOC <-> COCO annotations.

    tools/convert.py voc2coco --voc ROOT --split test --out test.json [--classes auto]
    tools/convert.py coco2voc --coco instances.json --images IMAGE_DIR --out VOC_ROOT --split val
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v2c = sub.add_parser("voc2coco", help="a VOC split -> COCO instances JSON")
    v2c.add_argument("--voc", type=Path, required=True)
    v2c.add_argument("--split", required=True)
    v2c.add_argument("--out", type=Path, required=True)
    v2c.add_argument("--classes", default="auto", help="comma-separated names, 'voc' or 'auto'")
    c2v = sub.add_parser("coco2voc", help="COCO instances JSON -> a VOC tree")
    c2v.add_argument("--coco", type=Path, required=True)
    c2v.add_argument("--images", type=Path, required=True, help="folder the JSON's file_name entries are relative to")
    c2v.add_argument("--out", type=Path, required=True)
    c2v.add_argument("--split", required=True)
    c2v.add_argument("--classes", default="auto")
    c2v.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    for command in (v2c, c2v):
        add_runtime_args(command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from detect.data.convert import coco_to_voc, voc_to_coco

        apply_runtime(args)
        classes = args.classes if args.classes in ("auto", "voc") else args.classes.split(",")
        if args.command == "voc2coco":
            data = voc_to_coco(args.voc, args.split, args.out, classes=classes)
            print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
                  f"{len(data['categories'])} categories")
        else:
            n = coco_to_voc(args.coco, args.images, args.out, args.split, classes=classes, link_images=not args.copy)
            print(f"wrote {args.out}: {n} images in split '{args.split}'")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
