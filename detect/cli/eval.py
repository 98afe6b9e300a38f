"""``detect-eval`` / ``tools/eval.py``: mAP of results files against VOC or COCO ground truth.

    tools/eval.py --voc ROOT --split test --detections DIR --metric voc07 [--json OUT]
    tools/eval.py --coco ANNOTATIONS.json --detections RESULTS.json --metric coco
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from detect.cli.common import add_runtime_args, apply_runtime, format_ap, run_cli
from detect.data.voc import from_voc_pixels
from detect.errors import DetectError

METRICS = ("voc07", "voc10", "coco", "all")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--voc", type=Path, help="VOC-format dataset root")
    source.add_argument("--coco", type=Path, help="COCO instances JSON")
    parser.add_argument("--split", default="test", help="VOC split (ImageSets/Main/<split>.txt)")
    parser.add_argument("--detections", type=Path, required=True,
                        help="VOC: folder of <prefix>_det_<split>_<class>.txt files; COCO: results JSON")
    parser.add_argument("--metric", choices=METRICS, default=None, help="default: voc07 with --voc, coco with --coco")
    parser.add_argument("--classes", default="auto",
                        help="comma-separated class names, 'voc' (the 20 VOC classes) or 'auto' (from the annotations)")
    parser.add_argument("--prefix", default=None, help="results file prefix (default: found automatically, e.g. comp4)")
    parser.add_argument("--python-port", action="store_true",
                        help="reproduce py-faster-rcnn's voc_eval.py (IoU > 0.5 strictly, unstable sort) instead of the devkit")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.metric is None:
        args.metric = "coco" if args.coco is not None else "voc07"
    return args


def _classes(text: str) -> list[str] | str:
    return text if text in ("auto", "voc") else [c.strip() for c in text.split(",") if c.strip()]


def _load(args: argparse.Namespace):
    """Ground-truth records, class names, COCO-side dataset and detections as per-class VOC arrays and COCO records."""
    from detect.data.coco import COCODataset
    from detect.data.voc import VOCDataset
    from detect.evaluation.coco import records_to_coco
    from detect.evaluation.results import read_coco_results, read_voc_results
    from detect.evaluation.voc import ClassDetections

    if args.voc is not None:
        dataset = VOCDataset(args.voc, args.split, classes=_classes(args.classes), strict=True)
        records, names = dataset.records, dataset.class_names
        class_dets = read_voc_results(args.detections, args.split, names, records, prefix=args.prefix)
        coco_gt, image_ids, category_ids = records_to_coco(records, names)
        coco_results = []
        for label, dets in enumerate(class_dets):
            lib = from_voc_pixels(dets.boxes)
            for i, score, box in zip(dets.image_index, dets.scores, lib):
                coco_results.append({"image_id": image_ids[records[i].image_id], "category_id": category_ids[label],
                                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
        return records, names, coco_gt, category_ids, class_dets, coco_results
    dataset = COCODataset(args.coco, args.coco.parent, classes=_classes(args.classes))
    records, names = dataset.records, dataset.class_names
    index = {cid: i for i, cid in enumerate(dataset.image_ids.values())}
    coco_results = read_coco_results(args.detections, image_ids=index,
                                     category_ids=[c["id"] for c in dataset.data["categories"]])
    label_of = {cid: k for k, cid in enumerate(dataset.category_ids)}
    per_class: list[list[tuple[int, float, list[float]]]] = [[] for _ in names]
    for det in coco_results:
        if det["category_id"] not in label_of:
            continue     # a category of the file left out by --classes
        x, y, w, h = det["bbox"]
        per_class[label_of[det["category_id"]]].append((index[det["image_id"]], float(det["score"]), [x, y, x + w, y + h]))
    class_dets = []
    for items in per_class:
        boxes = np.array([b for _, _, b in items], dtype=np.float64).reshape(-1, 4)
        boxes[:, :2] += 1.0   # library convention -> VOC pixels
        class_dets.append(ClassDetections(np.array([i for i, _, _ in items], np.int64),
                                          np.array([s for _, s, _ in items], np.float64), boxes))
    return records, names, dataset.data, dataset.category_ids, class_dets, coco_results


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def format_table(result: dict) -> str:
    """Per-class AP table and the mean, as plain text."""
    width = max([len(n) for n in result["per_class"]] + [5])
    lines = [f"{'class':<{width}}  AP ({result['metric']})"]
    for name, ap in result["per_class"].items():
        lines.append(f"{name:<{width}}  {format_ap(ap)}")
    lines.append(f"{'mAP':<{width}}  {format_ap(result['mAP'])}")
    if "stats" in result:
        lines.append("  ".join(f"{k}={v:.4f}" for k, v in result["stats"].items()))
    return "\n".join(lines)


def evaluate_files(args: argparse.Namespace) -> dict:
    from detect.evaluation.coco import evaluate_coco
    from detect.evaluation.voc import evaluate_voc

    records, names, coco_gt, category_ids, class_dets, coco_results = _load(args)
    results = {}
    for metric in (("voc07", "voc10", "coco") if args.metric == "all" else (args.metric,)):
        if metric == "coco":
            results[metric] = evaluate_coco(coco_gt, coco_results, class_names=names, category_ids=category_ids,
                                            source=str(args.detections))
        else:
            results[metric] = evaluate_voc(records, {}, names, metric, class_dets=class_dets, python_port=args.python_port)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from detect.utils.io import atomic_write_json

        apply_runtime(args)
        results = evaluate_files(args)
        for result in results.values():
            print(format_table(result))
            print()
        if args.json is not None:
            payload = next(iter(results.values())) if len(results) == 1 else {"metric": "all", **results}
            try:
                atomic_write_json(args.json, _json_safe(payload))
            except OSError as exc:
                raise DetectError(f"cannot write {args.json}: {exc.strerror}") from None
            print(f"wrote {args.json}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
