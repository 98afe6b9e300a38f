#!/usr/bin/env python
"""Speed of VOC evaluation: 5,000 images, 20 classes, 200,000 detections, one core.

Prints the seconds of the devkit-exact evaluator against two references measured in the
same run: a per-detection loop in the style of py-faster-rcnn's voc_eval.py (numpy per
detection), timed on a sample of classes and scaled, and our own evaluator's time per image.
Goal: under 2 s for the whole set.

    python tools/benchmark_eval.py [--images 5000] [--classes 20] [--detections 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from detect.data.records import ImageRecord  # noqa: E402
from detect.evaluation.voc import evaluate_voc  # noqa: E402


def make_case(num_images: int, num_classes: int, num_dets: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    records, dets = [], {}
    per_image = rng.multinomial(num_dets, np.ones(num_images) / num_images)
    for i in range(num_images):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 400, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n, 2))], 1).astype(np.float32)
        labels = rng.integers(0, num_classes, n)
        records.append(ImageRecord(f"{i:06d}", Path(f"{i:06d}.jpg"), 600, 600, boxes, labels, rng.random(n) < 0.1))
        m = int(per_image[i])
        pick = rng.integers(0, n, m)
        dbox = boxes[pick] + rng.normal(0, 8, (m, 4))
        dbox[:, 2:] = np.maximum(dbox[:, 2:], dbox[:, :2] + 1)
        dlab = np.where(rng.random(m) < 0.5, labels[pick], rng.integers(0, num_classes, m))
        dets[f"{i:06d}"] = {"boxes": dbox, "scores": rng.random(m), "labels": dlab}
    return records, dets


def loop_reference(records, dets, num_classes, classes_to_time):
    """py-faster-rcnn style: numpy overlaps per detection, Python loop over detections."""
    for c in classes_to_time:
        gt = {r.image_id: (r.boxes[r.labels == c].astype(float), r.difficult[r.labels == c], np.zeros((r.labels == c).sum(), bool))
              for r in records}
        ids, scores, boxes = [], [], []
        for r in records:
            d = dets[r.image_id]
            keep = d["labels"] == c
            ids += [r.image_id] * int(keep.sum())
            scores.append(d["scores"][keep])
            boxes.append(d["boxes"][keep])
        scores, boxes = np.concatenate(scores), np.concatenate(boxes)
        order = np.argsort(-scores, kind="stable")
        for d in order:
            bbgt, diff, det = gt[ids[d]]
            bb = boxes[d]
            if len(bbgt):
                iw = np.maximum(np.minimum(bbgt[:, 2], bb[2]) - np.maximum(bbgt[:, 0], bb[0]) + 1.0, 0.0)
                ih = np.maximum(np.minimum(bbgt[:, 3], bb[3]) - np.maximum(bbgt[:, 1], bb[1]) + 1.0, 0.0)
                inter = iw * ih
                uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0) - inter
                ov = inter / uni
                j = int(np.argmax(ov))
                if ov[j] >= 0.5 and not diff[j] and not det[j]:
                    det[j] = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--detections", type=int, default=200000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    records, dets = make_case(args.images, args.classes, args.detections)
    names = [f"c{k}" for k in range(args.classes)]
    times = {}
    for metric in ("voc07", "voc10"):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = evaluate_voc(records, dets, names, metric)
            best = min(best, time.perf_counter() - start)
        times[metric] = best
        print(f"{metric}: mAP {result['mAP']:.4f}")
    import tempfile

    from detect.evaluation.results import read_voc_results, write_voc_results

    with tempfile.TemporaryDirectory() as tmp:
        write_voc_results(tmp, dets, names, "test", image_ids=[r.image_id for r in records])
        start = time.perf_counter()
        class_dets = read_voc_results(tmp, "test", names, records)
        from_files = evaluate_voc(records, {}, names, "voc07", class_dets=class_dets)
        times["voc07, from results files (parse + evaluate)"] = time.perf_counter() - start
        in_memory = evaluate_voc(records, dets, names, "voc07")["mAP"]
        print(f"voc07 from files: mAP {from_files['mAP']:.4f} (in memory {in_memory:.4f}, identical: {from_files['mAP'] == in_memory})")
    sample = [0, 1]
    start = time.perf_counter()
    loop_reference(records, dets, args.classes, sample)
    loop_time = (time.perf_counter() - start) * args.classes / len(sample)
    print()
    print(f"| evaluator ({args.images} images, {args.classes} classes, {args.detections} detections, 1 thread) | seconds | vs goal 2 s | vs per-detection loop |")
    print("|---|---|---|---|")
    for metric, t in times.items():
        print(f"| ours, {metric} | {t:.3f} | {2.0 / t:.1f}x under | {loop_time / t:.1f}x faster |")
    print(f"| per-detection numpy loop (py-faster-rcnn style, scaled from {len(sample)} classes) | {loop_time:.3f} | | 1.0x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
