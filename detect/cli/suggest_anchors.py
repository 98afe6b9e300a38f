"""``detect-suggest-anchors``: object sizes at the network input, and the input size and anchors that fit them.

Anchors that do not cover a dataset's objects leave them without positive
anchors at IoU 0.7 (Faster R-CNN Sec. 3.1.2), and an input size that shrinks
objects to a few pixels loses them before any anchor is tried: small-object
datasets suffer most. This tool resizes every box as the model would (shorter
side ``min_size``, longer at most ``max_size``), reports the object sizes per
class, clusters log sizes and log aspect ratios with k-means (scikit-learn),
reports how many boxes the configured and the suggested anchors cover, and
recommends an input size by the rule of :mod:`detect.input_size` (95% of
the objects at least 16 px), with anchors for it.

    detect-suggest-anchors --voc ROOT [--split trainval] [--config C] [--set model.input.min_size=[800]]
    detect-suggest-anchors --config C --set data.root=DIR      # the config's dataset (VOC or COCO)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.input_size import (anchor_coverage, resized_box_shapes, size_statistics, suggest_anchors,
                                  suggest_input_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-suggest-anchors", description=__doc__.splitlines()[0])
    parser.add_argument("--voc", default=None, metavar="ROOT",
                        help="PASCAL VOC-format dataset root (default: the dataset of --config's data section)")
    parser.add_argument("--split", default=None, help="split to read (default: trainval, or the config's train split)")
    parser.add_argument("--config", default=None, help="config whose input sizes and anchors to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.input.min_size=[800] (repeatable)")
    parser.add_argument("--sizes", type=int, default=None, help="anchor sizes to suggest (default: as configured)")
    parser.add_argument("--ratios", type=int, default=None, help="aspect ratios to suggest (default: as configured)")
    add_runtime_args(parser)
    return parser


def _load(args):
    """``(cfg, records, class_names, where)`` for the dataset the arguments name."""
    from detect.config import load_config
    from detect.data.loader import load_records
    from detect.data.voc import VOCDataset

    cfg = load_config(args.config, overrides=args.overrides)
    if args.voc is not None:
        split = args.split or "trainval"
        data = VOCDataset(args.voc, split, classes="auto")
        return cfg, data.records, data.class_names, f"{args.voc} ({split})"
    split = args.split or cfg.data.train_split
    records, class_names, _ = load_records(cfg, split)
    return cfg, records, class_names, f"{cfg.data.root or cfg.data.format} ({split})"


def _print_sizes(records, class_names, min_size: int, max_size: int) -> None:
    print(f"object size sqrt(w*h) at the network input, px ({min_size} / {max_size}):")
    print(f"  {'class':>16s}  {'count':>6s}  {'median':>6s}  {'5th pct':>7s}  {'<16 px':>6s}  {'<32 px':>6s}")
    for row in size_statistics(records, class_names, min_size=min_size, max_size=max_size):
        if row.count == 0:
            print(f"  {row.name:>16s}  {0:>6d}  {'-':>6s}  {'-':>7s}  {'-':>6s}  {'-':>6s}")
            continue
        print(f"  {row.name:>16s}  {row.count:>6d}  {row.median:>6.1f}  {row.p5:>7.1f}  "
              f"{row.under_16:>6.1%}  {row.under_32:>6.1%}")


def _report(cfg, records, class_names, where: str, num_sizes: int, num_ratios: int) -> None:
    min_size, max_size = cfg.model.input.min_size[0], cfg.model.input.max_size
    w, h = resized_box_shapes(records, min_size, max_size)
    sizes, ratios = suggest_anchors(w, h, num_sizes, num_ratios)
    side = np.sqrt(w * h)
    print(f"{len(w)} boxes in {where} after resizing to shorter side {min_size}, longer <= {max_size}")
    _print_sizes(records, class_names, min_size, max_size)
    print("box size sqrt(w*h) percentiles 5/25/50/75/95: "
          + " / ".join(f"{v:.0f}" for v in np.percentile(side, [5, 25, 50, 75, 95])))
    print("aspect ratio h/w percentiles 5/50/95: " + " / ".join(f"{v:.2f}" for v in np.percentile(h / w, [5, 50, 95])))
    for name, (s, r) in {"configured": (cfg.model.anchors.sizes, cfg.model.anchors.ratios),
                         "suggested": (sizes, ratios)}.items():
        best = anchor_coverage(w, h, s, r)
        print(f"{name:>10}: sizes {list(s)} ratios {list(r)}: boxes with a centred anchor at IoU >= 0.7: "
              f"{(best >= 0.7).mean():.1%}, >= 0.5: {(best >= 0.5).mean():.1%}")

    choice = suggest_input_size(records, min_side=cfg.model.input.auto_min_object,
                                max_size=cfg.model.input.auto_max_size)
    print(f"\nrecommended input size: {choice.describe()}")
    print(f"  (at the configured {min_size} / {max_size}: {(side >= choice.min_side).mean():.1%} of the objects "
          f">= {choice.min_side:g} px)")
    if (choice.min_size, choice.max_size) != (min_size, max_size):
        _print_sizes(records, class_names, choice.min_size, choice.max_size)
    w, h = resized_box_shapes(records, choice.min_size, choice.max_size)
    sizes, ratios = suggest_anchors(w, h, num_sizes, num_ratios)
    best = anchor_coverage(w, h, sizes, ratios)
    print(f"anchors for it: sizes {sizes} ratios {ratios}: boxes with a centred anchor at IoU >= 0.7: "
          f"{(best >= 0.7).mean():.1%}")
    print("\nmodel:\n  input:\n"
          f"    min_size: [{choice.min_size}]\n    max_size: {choice.max_size}\n    test_min_size: {choice.min_size}\n"
          "  anchors:\n"
          f"    sizes: [{', '.join(f'{s:g}' for s in sizes)}]\n    ratios: [{', '.join(f'{r:g}' for r in ratios)}]")
    print("(or let training choose them: model.input.auto: true, model.anchors.auto: true)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2

    def body() -> int:
        apply_runtime(args)
        cfg, records, class_names, where = _load(args)
        _report(cfg, records, class_names, where, args.sizes or len(cfg.model.anchors.sizes),
                args.ratios or len(cfg.model.anchors.ratios))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
