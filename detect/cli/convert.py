"""``detect-convert`` / ``tools/convert.py``: VOC <-> COCO annotations.

    tools/convert.py voc2coco --voc ROOT --split test --out test.json [--classes auto]
    tools/convert.py coco2voc --coco instances.json --images IMAGE_DIR --out VOC_ROOT --split val
    tools/convert.py splits --voc ROOT [--test 0.2] [--val 0.2] [--seed 0]    # ImageSets/Main/*.txt for a VOC folder
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
    spl = sub.add_parser("splits", help="write ImageSets/Main/{train,val,trainval,test}.txt for a VOC folder")
    spl.add_argument("--voc", type=Path, required=True, help="folder with Annotations/ and JPEGImages/")
    spl.add_argument("--test", type=float, default=0.2, help="fraction of the images for test (default 0.2)")
    spl.add_argument("--val", type=float, default=0.2, help="fraction of the images for val (default 0.2)")
    spl.add_argument("--seed", type=int, default=0)
    spl.add_argument("--overwrite", action="store_true", help="replace existing split files")
    for command in (v2c, c2v, spl):
        add_runtime_args(command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        apply_runtime(args)
        from detect.data.convert import coco_to_voc, make_splits, voc_to_coco

        if args.command == "splits":
            splits = make_splits(args.voc, test_fraction=args.test, val_fraction=args.val, seed=args.seed,
                                 overwrite=args.overwrite)
            print(f"wrote {args.voc / 'ImageSets' / 'Main'}: "
                  + ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()) + " images")
            return 0
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
