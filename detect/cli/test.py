"""``detect-test`` / ``tools/test.py``: evaluate a trained detector on a split.

    tools/test.py --checkpoint runs/x/model_final.pt [--split test] [--metric voc07|voc10|coco|all] [--out DIR]

Writes into ``--out`` (default ``<checkpoint folder>/test_<split>``) the VOC results files
``comp4_det_<split>_<class>.txt``, the COCO results JSON ``coco_results.json`` and
``metrics.json``; prints AP per class, the mAP and the inference speed (images/s and
seconds per image in each stage). ``tools/eval.py`` on the written files gives the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect import distributed
from detect.cli.common import add_runtime_args, apply_runtime, format_ap, run_distributed_cli
from detect.errors import CheckpointError

METRICS = ("voc07", "voc10", "coco", "all")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a training output folder")
    parser.add_argument("--split", default=None, help="split to evaluate (default: test.split, else data.test_split)")
    parser.add_argument("--metric", choices=METRICS, default=None, help="default: the config's test.metric")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: <checkpoint dir>/test_<split>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the stored config, e.g. --set data.root=/data/VOC2007")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def _fmt(ap: float) -> str:
    return f"{format_ap(ap):>6s}"


def speed_report(timings: dict) -> dict:
    """Images/s and mean seconds per image of each stage the model reported."""
    images = max(int(timings.get("images", 0)), 1)
    total = timings.get("total", 0.0)
    stages = {k: v / images for k, v in timings.items() if k not in ("images", "total")}
    other = total / images - sum(stages.values())
    if stages and other > 0:
        stages["other"] = other   # what the model's stage timers do not cover (batching, transfers)
    return {"images": int(timings.get("images", 0)), "images_per_s": images / total if total > 0 else 0.0,
            "seconds_per_image": total / images, "stage_seconds_per_image": stages}


def run(args: argparse.Namespace) -> dict:
    """Evaluate as ``args`` say; returns the metrics dict written to ``metrics.json``."""
    apply_runtime(args)
    from detect.build import model_from_checkpoint
    from detect.runtime import is_exported, model_from_exported
    from detect.data.loader import build_dataset
    from detect.data.loader import eval_loader
    from detect.engine import evaluate
    from detect.evaluation import evaluate as score
    from detect.evaluation import records_to_coco, write_coco_results, write_voc_results
    from detect.runlog import json_safe
    from detect.utils.io import atomic_write_json

    info = distributed.init_from_env(args.device)
    if is_exported(args.checkpoint):       # an .onnx / .pt2 from tools/export.py runs on the CPU
        model, cfg, ckpt = model_from_exported(args.checkpoint, overrides=args.overrides)
    else:
        model, cfg, ckpt = model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=info.device)
    split = args.split or cfg.test.split or cfg.data.test_split
    metric = args.metric or cfg.test.metric
    out = args.out or Path(ckpt["path"]).parent / f"test_{split}"
    if distributed.is_main():
        from detect.recipes import prepare_out_dir

        prepare_out_dir(out, resume=True, overwrite=False)
    dataset = build_dataset(cfg, split, strict=args.strict)
    if dataset.class_names != list(ckpt["class_names"]):
        raise CheckpointError(f"{ckpt['path']}: trained for classes {list(ckpt['class_names'])}, but split '{split}' "
                              f"of the dataset has classes {dataset.class_names}")
    loader = eval_loader(dataset, batch_size=cfg.test.images_per_batch, workers=cfg.train.workers,
                         rank=distributed.get_rank(), world_size=distributed.get_world_size())
    timings: dict = {}
    detections = evaluate(model, loader, device=info.device, timings=timings, progress=not args.no_progress,
                          log=lambda m: print(m, file=sys.stderr) if distributed.is_main() else None)
    if not distributed.is_main():
        return {}

    names = dataset.class_names
    write_voc_results(out, detections, names, split, image_ids=[r.image_id for r in dataset.records])
    image_ids, category_ids = dataset.coco_ids or records_to_coco(dataset.records, names)[1:]
    write_coco_results(out / "coco_results.json", detections, image_ids, category_ids)
    results = score(dataset.records, detections, names, metric)
    by_metric = results if metric == "all" else {metric: results}
    speed = speed_report(timings)
    report = {"checkpoint": str(ckpt["path"]), "split": split, "images": len(dataset.records),
              "detected_images": len(detections), "metrics": by_metric, "speed": speed}
    atomic_write_json(out / "metrics.json", json_safe(report))

    print(f"{'class':>20s}  " + "  ".join(f"{m:>6s}" for m in by_metric))
    for name in names:
        print(f"{name:>20s}  " + "  ".join(_fmt(r["per_class"].get(name)) for r in by_metric.values()))
    print(f"{'mAP':>20s}  " + "  ".join(_fmt(r["mAP"]) for r in by_metric.values()))
    stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in speed["stage_seconds_per_image"].items())
    print(f"speed: {speed['images_per_s']:.2f} images/s on {info.device} "
          f"({speed['seconds_per_image'] * 1000:.1f} ms/image{'; ' + stages if stages else ''})")
    print(f"results written to {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_distributed_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
