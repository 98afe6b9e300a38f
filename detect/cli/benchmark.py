"""``tools/benchmark.py ladder``: R-CNN, Fast R-CNN and Faster R-CNN side by side on the same test images.

    tools/benchmark.py ladder --rcnn runs/rcnn/model_final.pt --fast runs/fast/model_final.pt \\
        --faster runs/faster/model_final.pt [--split test] [--limit 50] [--out ladder.md] [--device cpu|cuda]

For each pipeline: seconds per image split into proposals, features and heads, the total,
and VOC07 mAP, as one markdown table (printed and written to ``--out``). The three
checkpoints must share a backbone and a class list. Selective search runs once per test
image, timed, and the same boxes feed R-CNN and Fast R-CNN; its time is their
"proposals" column (the papers count it when comparing with Faster R-CNN, whose RPN
time is its own "proposals"). Ratios follow the table: Fast R-CNN vs R-CNN without
proposal time (Fast R-CNN Table 4: 146x, 213x with SVD, VGG16 on a GPU), and Faster vs
Fast R-CNN with it (Faster R-CNN Table 5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from detect.cli.common import run_cli
from detect.errors import ConfigError

PIPELINES = (("rcnn", "R-CNN"), ("fast", "Fast R-CNN"), ("faster", "Faster R-CNN"))
# Faster R-CNN reports its stages as backbone / rpn / roi_heads.
STAGE_NAMES = {"backbone": "features", "rpn": "proposals", "roi_heads": "heads"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("torchvision", add_help=False,
                   help="this toolkit's Faster R-CNN against torchvision's, configured alike (see `torchvision --help`)")
    ladder = sub.add_parser("ladder", help="the three pipelines, same backbone, same images: time and mAP")
    ladder.add_argument("--rcnn", type=Path, help="R-CNN checkpoint")
    ladder.add_argument("--fast", type=Path, help="Fast R-CNN checkpoint")
    ladder.add_argument("--faster", type=Path, help="Faster R-CNN checkpoint")
    ladder.add_argument("--split", default=None, help="test split (default: the first checkpoint's test split)")
    ladder.add_argument("--limit", type=int, default=0, help="only the first N images")
    ladder.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ladder.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every stored config, e.g. data.root=/data/VOC2007")
    ladder.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def _selective_search(cfg, dataset, count: int) -> tuple[dict, float]:
    """Selective search on each test image with the config's parameters: (boxes by id, seconds per image)."""
    from detect.proposal_sources import SelectiveSearchProposals, search_params_from_config

    source = SelectiveSearchProposals(params=search_params_from_config(cfg), top_k=cfg.proposals.top_k, memo_size=0)
    boxes, seconds = {}, 0.0
    for index in range(count):
        item = dataset[index]
        if not isinstance(item, tuple):
            continue
        image, target = item
        start = time.perf_counter()
        boxes[target["image_id"]] = source.one(image).numpy()
        seconds += time.perf_counter() - start
    return boxes, seconds / max(len(boxes), 1)


def run(args: argparse.Namespace) -> dict:
    from detect.checkpoint import model_from_checkpoint
    from detect.data.loader import build_dataset
    from detect.distributed import resolve_device
    from detect.evaluation import evaluate
    from detect.fast_rcnn import predict_split
    from detect.proposal_sources import FixedProposals
    from detect.utils.io import atomic_write_text

    paths = {key: getattr(args, key) for key, _ in PIPELINES if getattr(args, key) is not None}
    if not paths:
        raise ConfigError("ladder: give at least one of --rcnn, --fast, --faster")
    device = resolve_device(args.device)
    models = {}
    for key, path in paths.items():
        model, cfg, ckpt = model_from_checkpoint(path, overrides=args.overrides, device=device)
        expected = {"rcnn": "rcnn", "fast": "fast_rcnn", "faster": "faster_rcnn"}[key]
        if cfg.model.pipeline != expected:
            raise ConfigError(f"--{key} {path}: that checkpoint is a '{cfg.model.pipeline}' model, not '{expected}'")
        models[key] = (model, cfg, ckpt)
    first_cfg = next(iter(models.values()))[1]
    backbones = {k: cfg.model.backbone.name for k, (_, cfg, _) in models.items()}
    if len(set(backbones.values())) > 1:
        raise ConfigError(f"ladder: the checkpoints have different backbones {backbones}; compare like with like")
    classes = {k: tuple(ckpt["class_names"]) for k, (_, _, ckpt) in models.items()}
    if len(set(classes.values())) > 1:
        raise ConfigError(f"ladder: the checkpoints were trained for different classes {classes}")
    split = args.split or first_cfg.test.split or first_cfg.data.test_split
    dataset = build_dataset(first_cfg, split)
    count = min(len(dataset), args.limit) if args.limit > 0 else len(dataset)
    records = dataset.records[:count]
    proposals, ss_seconds = ({}, 0.0)
    if "rcnn" in models or "fast" in models:
        print(f"selective search on {count} images ...", file=sys.stderr)
        proposals, ss_seconds = _selective_search(first_cfg, dataset, count)
    rows = {}
    for key, label in PIPELINES:
        if key not in models:
            continue
        model, cfg, _ = models[key]
        if key != "faster":
            model.proposals = FixedProposals(boxes_by_id=proposals)    # the boxes timed above
        timings: dict = {}
        print(f"{label}: predicting {count} images ...", file=sys.stderr)
        detections = predict_split(model, dataset, device=device, timings=timings, limit=count,
                                   log=lambda m: print(m, file=sys.stderr))
        images = max(timings.pop("images", 0), 1)
        total = timings.pop("total", 0.0)
        stages = {STAGE_NAMES.get(k, k): v / images for k, v in timings.items()}
        without = total / images - stages.get("proposals", 0.0)     # minus the RPN, or the (free) box lookup
        if key != "faster":
            stages["proposals"] = ss_seconds
        result = evaluate(records, detections, dataset.class_names, "voc07")
        rows[key] = {"label": label, "proposals": stages.get("proposals", 0.0), "features": stages.get("features", 0.0),
                     "heads": stages.get("heads", 0.0), "no_proposals": without,
                     "total": without + stages.get("proposals", 0.0), "mAP": result["mAP"]}
    table = format_table(rows, backbone=next(iter(backbones.values())), split=split, count=count, device=str(device))
    print(table)
    if args.out is not None:
        atomic_write_text(args.out, table + "\n")
        print(f"table written to {args.out}", file=sys.stderr)
    return rows


def format_table(rows: dict, *, backbone: str, split: str, count: int, device: str) -> str:
    """The ladder as markdown, with the papers' speed ratios below it."""
    lines = [f"Backbone `{backbone}`, {count} images of '{split}', {device}; seconds per image.", "",
             "| pipeline | proposals | features | heads | total w/o proposals | total | VOC07 mAP |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['proposals']:.4f} | {row['features']:.4f} | {row['heads']:.4f} | "
                     f"{row['no_proposals']:.4f} | {row['total']:.4f} | {row['mAP']:.4f} |")
    lines.append("")
    if "rcnn" in rows and "fast" in rows:
        ratio = rows["rcnn"]["no_proposals"] / max(rows["fast"]["no_proposals"], 1e-12)
        lines.append(f"- Fast R-CNN vs R-CNN, test time without proposals: {ratio:.1f}x faster "
                     f"(goal >= 50x; the paper: 146x, 213x with truncated SVD, VGG16 on a GPU)")
    if "fast" in rows and "faster" in rows:
        ratio = rows["fast"]["total"] / max(rows["faster"]["total"], 1e-12)
        lines.append(f"- Faster R-CNN vs Fast R-CNN, with proposal time: {ratio:.1f}x faster "
                     f"(the paper: 1.83 s -> 0.198 s per image, VGG16 on a GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchvision"]:   # ours against torchvision's FasterRCNN: detect/cli/benchmark_torchvision.py
        from detect.cli.benchmark_torchvision import main as torchvision_main

        return torchvision_main(argv[1:])
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
