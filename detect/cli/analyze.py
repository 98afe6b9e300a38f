"""``tools/analyze.py``: a self-contained HTML report of a trained detector on one split.

    tools/analyze.py --checkpoint runs/x/model_final.pt --split test --out runs/x/analysis

Writes ``DIR/index.html`` with the images it shows alongside (relative links, no
network needed, no external JS/CSS) and ``DIR/analysis.json``: the split's class and
object-size distributions, training curves from the run's metrics.jsonl (found next to
the checkpoint, or ``--metrics``), AP per class with precision-recall curves, precision /
recall / F1 at ``--score-thresh`` with a suggested threshold per class (best F1), AP by
object size and by truncated/difficult flag, proposal recall (``--proposals`` /
``--rpn-recall``), the error analysis of Hoiem et al. (ECCV 2012), a class-confusion
matrix at ``--score-thresh``, drawn detections (best, worst, missed; 320 px thumbnails
open the full-size drawing), occlusion maps of the top detections and deconvnet
projections of the trunk's strongest channels.

Similar classes (``--similar``): the error analysis calls a false positive "similar" when
it overlaps (IoU >= 0.1) an object of a class in the same group as its own, and "other"
when the class is in no shared group, so the report separates confusions between
look-alike classes from the rest. PASCAL VOC's classes get Hoiem et al.'s groups
(animals, vehicles, furniture, aeroplane+bird) by default; any other class list gets no
groups, so every confusion is "other" until you name groups:

    --similar 'cells=rbc,wbc'                      one group (name=members)
    --similar 'fish=tuna,salmon;sharks=mako,blue'  several groups, ';' between them
    --similar 'tuna,salmon;mako,blue'              unnamed groups
    --similar groups.yaml                          a JSON/YAML mapping: {fish: [tuna, salmon]}
    --similar none                                 no groups (also for VOC classes)

A class may be in several groups; an unknown class name is an error naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import CheckpointError, DetectError


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a training output folder")
    parser.add_argument("--split", default=None, help="split to analyse (default: test.split, else data.test_split)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: <checkpoint dir>/analysis_<split>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the stored config, e.g. --set data.root=/data/VOC2007")
    parser.add_argument("--metric", choices=("voc07", "voc10"), default="voc07")
    parser.add_argument("--max-images", type=int, default=0, help="analyse only the first N images of the split")
    parser.add_argument("--similar", default=None, metavar="GROUPS",
                        help="similar-class groups for the error analysis (see above): "
                             "'animals=cat,dog;vehicles=car,bus', a JSON/YAML file, 'none', or 'default' "
                             "(VOC's groups for VOC classes, none otherwise)")
    parser.add_argument("--samples", type=int, default=6, help="images per gallery (best, worst, missed)")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="score from which detections are drawn and counted in the confusion matrix and in "
                             "precision / recall / F1")
    parser.add_argument("--metrics", default=None, metavar="PATH",
                        help="the run's metrics.jsonl (or its run folder) for the training curves (default: found "
                             "next to the checkpoint; 'none' to leave them out)")
    parser.add_argument("--occlusion", type=int, default=3, help="top detections given an occlusion map (0: none)")
    parser.add_argument("--patch", type=int, default=32, help="occluder side in image pixels")
    parser.add_argument("--stride", type=int, default=16, help="occluder step in image pixels")
    parser.add_argument("--deconv-layer", default=None, help="trunk layer for the deconvnet (default: last conv; "
                                                              "'none' to skip)")
    parser.add_argument("--deconv-channels", type=_ints, default=None, help="channels to show, e.g. 0,5,9")
    parser.add_argument("--deconv-count", type=int, default=4, help="strongest channels shown when none are named")
    parser.add_argument("--deconv-images", type=int, default=50, help="images searched for the top activations")
    parser.add_argument("--proposals", type=Path, default=None,
                        help="proposal store version folder (<store>/<split>/<version>) for recall curves")
    parser.add_argument("--rpn-recall", action="store_true", help="also measure the recall of the model's proposals")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def _training_log(spec: str | None, checkpoint: Path) -> Path | None:
    from detect.analysis.training_log import find_metrics_log

    if spec == "none":
        return None
    if spec is None:
        return find_metrics_log(checkpoint)
    found = find_metrics_log(spec)
    if found is None:
        raise DetectError(f"--metrics {spec}: no metrics.jsonl there")
    return found


def run(args: argparse.Namespace) -> Path:
    """Predict on the split and write the report; returns the path of ``index.html``."""
    apply_runtime(args)
    from detect.analysis.error_analysis import parse_similar_groups
    from detect.analysis.report import ReportOptions, build_report
    from detect.build import model_from_checkpoint
    from detect.recipes import prepare_out_dir
    from detect.data.loader import DetectionDataset, build_dataset, eval_loader
    from detect.distributed import resolve_device
    from detect.engine import evaluate

    for name in ("samples", "occlusion", "deconv_count", "deconv_images", "max_images"):
        if getattr(args, name) < 0:
            raise DetectError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.patch < 1 or args.stride < 1:
        raise DetectError(f"--patch and --stride must be positive, got {args.patch} and {args.stride}")
    device = resolve_device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=device)
    training_log = _training_log(args.metrics, Path(ckpt["path"]))
    split = args.split or cfg.test.split or cfg.data.test_split
    out = args.out or Path(ckpt["path"]).parent / f"analysis_{split}"
    prepare_out_dir(out, resume=True, overwrite=False)
    dataset = build_dataset(cfg, split, strict=args.strict)
    if dataset.class_names != list(ckpt["class_names"]):
        raise CheckpointError(f"{ckpt['path']}: trained for classes {list(ckpt['class_names'])}, but split '{split}' "
                              f"of the dataset has classes {dataset.class_names}")
    records = dataset.records[: args.max_images] if args.max_images else dataset.records
    subset = DetectionDataset(records, dataset.class_names, strict=args.strict)
    log = (lambda m: print(m, file=sys.stderr)) if not args.no_progress else (lambda m: None)
    loader = eval_loader(subset, batch_size=cfg.test.images_per_batch, workers=cfg.train.workers)
    detections = evaluate(model, loader, device=device, progress=not args.no_progress,
                          log=lambda m: print(m, file=sys.stderr))
    options = ReportOptions(
        metric=args.metric, similar_groups=parse_similar_groups(args.similar, dataset.class_names),
        samples=args.samples, score_thresh=args.score_thresh, occlusion=args.occlusion, patch=args.patch,
        stride=args.stride, deconv_layer="" if args.deconv_layer == "none" else args.deconv_layer,
        deconv_channels=args.deconv_channels, deconv_count=args.deconv_count, deconv_images=args.deconv_images,
        proposals=args.proposals, rpn_recall=args.rpn_recall, training_log=training_log)
    info = {"checkpoint": str(ckpt["path"]), "iteration": ckpt.get("iteration", 0), "split": split,
            "backbone": cfg.model.backbone.name, "pipeline": cfg.model.pipeline}
    index = build_report(model, records, dataset.class_names, detections, out, options=options, info=info, log=log)
    print(f"report written to {index}")
    return index


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        run(args)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
