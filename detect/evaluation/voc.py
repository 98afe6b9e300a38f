"""PASCAL VOC average precision, computed exactly as the official devkit does.

``VOCevaldet.m`` (VOC2007-2012 devkits), for one class:

1. detections are sorted by decreasing confidence with MATLAB's *stable* sort,
   so equal scores keep the order of the results file;
2. each detection takes the ground-truth box of its image with the largest
   overlap (the first one on ties), counting only pairs whose ``+1``-pixel
   intersection has positive width and height;
3. overlap >= 0.5: a true positive if that box is not ``difficult`` and not yet
   detected, ignored if it is difficult, a false positive (duplicate) otherwise;
   overlap below 0.5: a false positive;
4. AP from the precision/recall curve: 11-point interpolated (VOC2007) or the
   area under the monotone precision envelope at every recall change (VOC2010+).

The widespread Python port (``voc_eval.py`` of py-faster-rcnn) differs in two
ways, reproduced by ``python_port=True``: an unstable sort, and a match on
``IoU > 0.5`` strictly.

Step 3 is sequential in the devkit; because a detection only ever competes with
earlier detections *of the same image*, "true positive" is equivalent to "the
first detection, in sorted order, whose best non-difficult match is this
ground-truth box", which numpy computes without a Python loop per detection.
Overlaps are computed on VOC 1-based pixel coordinates in float64, as MATLAB does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detect.data.records import ImageRecord
from detect.data.voc import to_voc_pixels

METRICS = ("voc07", "voc10")


@dataclass
class ClassDetections:
    """All detections of one class, in results-file order.

    Attributes:
        image_index: (D,) int, index of each detection's image in the ground-truth list.
        scores: (D,) float64 confidences.
        boxes: (D, 4) float64, VOC 1-based pixel coordinates (as written in a results file).
    """

    image_index: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


@dataclass
class ClassGroundTruth:
    """Ground truth of one class: boxes (G, 4) in VOC pixels, the image of each, and difficult flags."""

    image_index: np.ndarray
    boxes: np.ndarray
    difficult: np.ndarray


def matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
    """MATLAB's ``start:step:stop``: the first half as ``start + k*step``, the second as ``stop - (n-k)*step``.

    The doubles differ from ``numpy.arange`` (e.g. 0.6 and 0.7 in ``0:0.1:1``), which decides
    whether a recall of exactly 0.6 or 0.7 counts at that threshold of the 11-point AP.
    """
    n = int(round((stop - start) / step))
    k = np.arange(n + 1)
    return np.where(k < n / 2.0, start + k * step, stop - (n - k) * step)


VOC07_RECALL_THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)


def ap_from_pr(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool, *, python_port: bool = False) -> float:
    """AP of a precision/recall curve (``VOCap.m`` or the VOC2007 11-point rule).

    MATLAB's ``max`` ignores NaN (precision 0/0 before any counted detection); ``np.fmax`` does the same.
    """
    if use_07_metric:
        thresholds = np.arange(0.0, 1.1, 0.1) if python_port else VOC07_RECALL_THRESHOLDS
        ap = 0.0
        for t in thresholds:
            mask = recall >= t
            ap += (float(np.fmax.reduce(precision[mask])) if np.any(mask) else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.fmax.accumulate(mpre[::-1])[::-1]
    changed = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[changed] - mrec[changed - 1]) * mpre[changed]))


def _best_overlaps(dets: ClassDetections, gt: ClassGroundTruth, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """For each detection: its largest overlap with a ground-truth box of its image, and that box's index."""
    num_dets = len(dets.scores)
    ovmax = np.full(num_dets, -np.inf)
    jmax = np.full(num_dets, -1, dtype=np.int64)
    if num_dets == 0 or len(gt.image_index) == 0:
        return ovmax, jmax
    # Ground truth grouped by image: gt_order lists gt indices image by image, in their original order.
    gt_order = np.argsort(gt.image_index, kind="stable")
    counts = np.bincount(gt.image_index, minlength=num_images)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    per_det = counts[dets.image_index]
    total = int(per_det.sum())
    if total == 0:
        return ovmax, jmax
    det_of_pair = np.repeat(np.arange(num_dets), per_det)
    # Position of each pair inside its detection's run, to index the image's gt block.
    run_start = np.repeat(np.cumsum(per_det) - per_det, per_det)
    offset = np.arange(total) - run_start
    gt_of_pair = gt_order[starts[dets.image_index][det_of_pair] + offset]

    bb = dets.boxes[det_of_pair]
    bg = gt.boxes[gt_of_pair]
    iw = np.minimum(bb[:, 2], bg[:, 2]) - np.maximum(bb[:, 0], bg[:, 0]) + 1.0
    ih = np.minimum(bb[:, 3], bg[:, 3]) - np.maximum(bb[:, 1], bg[:, 1]) + 1.0
    valid = (iw > 0) & (ih > 0)
    inter = iw * ih
    union = ((bb[:, 2] - bb[:, 0] + 1.0) * (bb[:, 3] - bb[:, 1] + 1.0)
             + (bg[:, 2] - bg[:, 0] + 1.0) * (bg[:, 3] - bg[:, 1] + 1.0) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = np.where(valid, inter / union, -np.inf)
    # First maximum per detection, like MATLAB's `if ov > ovmax` scan: sort by (det, -ov, gt position).
    order = np.lexsort((offset, -ov, det_of_pair))
    first = np.concatenate(([True], det_of_pair[order][1:] != det_of_pair[order][:-1]))
    winners = order[first]
    ovmax[det_of_pair[winners]] = ov[winners]
    jmax[det_of_pair[winners]] = np.where(np.isfinite(ov[winners]), gt_of_pair[winners], -1)
    return ovmax, jmax


def evaluate_class(dets: ClassDetections, gt: ClassGroundTruth, num_images: int, *,
                   use_07_metric: bool, iou_thresh: float = 0.5, python_port: bool = False) -> dict:
    """AP of one class. Returns ``{"ap", "recall", "precision", "npos", "tp", "fp"}`` (curves in sorted order)."""
    npos = int(np.sum(~gt.difficult))
    kind = "quicksort" if python_port else "stable"
    order = np.argsort(-dets.scores, kind=kind)
    sorted_dets = ClassDetections(dets.image_index[order], dets.scores[order], dets.boxes[order])
    ovmax, jmax = _best_overlaps(sorted_dets, gt, num_images)
    matched = (ovmax > iou_thresh) if python_port else (ovmax >= iou_thresh)
    is_difficult = np.zeros(len(ovmax), dtype=bool)
    is_difficult[matched] = gt.difficult[jmax[matched]]
    candidate = matched & ~is_difficult
    tp = np.zeros(len(ovmax), dtype=np.float64)
    if np.any(candidate):
        idx = np.flatnonzero(candidate)
        _, first = np.unique(jmax[idx], return_index=True)
        tp[idx[first]] = 1.0
    fp = (~is_difficult).astype(np.float64) - tp
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp_cum / float(npos) if npos > 0 else np.full_like(tp_cum, np.nan)
        if python_port:   # voc_eval.py guards the division instead of producing 0/0
            precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        else:
            precision = tp_cum / (tp_cum + fp_cum)
    ap = ap_from_pr(recall, precision, use_07_metric, python_port=python_port) if npos > 0 else float("nan")
    return {"ap": ap, "recall": recall, "precision": precision, "npos": npos,
            "tp": tp, "fp": fp, "scores": sorted_dets.scores}


def ground_truth_by_class(records: list[ImageRecord], num_classes: int) -> list[ClassGroundTruth]:
    """Split the records' objects by class, boxes converted to VOC pixels once."""
    out = []
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.int64)
    boxes = to_voc_pixels(np.concatenate([r.boxes for r in records])) if records else np.zeros((0, 4))
    difficult = np.concatenate([r.difficult for r in records]) if records else np.zeros(0, bool)
    image_index = np.repeat(np.arange(len(records)), [len(r.labels) for r in records]) if records else np.zeros(0, np.int64)
    for c in range(num_classes):
        mask = labels == c
        out.append(ClassGroundTruth(image_index[mask].astype(np.int64), boxes[mask], difficult[mask]))
    return out


def detections_by_class(records: list[ImageRecord], detections: dict, num_classes: int) -> list[ClassDetections]:
    """Flatten library detections (image_id -> boxes/scores/labels) per class, in record then detection order."""
    index = {r.image_id: i for i, r in enumerate(records)}
    unknown = [k for k in detections if k not in index]
    if unknown:
        raise ValueError(f"detections for images not in the ground truth: {unknown[:5]}")
    parts_img, parts_score, parts_box, parts_label = [], [], [], []
    for i, record in enumerate(records):
        det = detections.get(record.image_id)
        if det is None or len(det["scores"]) == 0:
            continue
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        parts_img.append(np.full(len(scores), i, dtype=np.int64))
        parts_score.append(scores)
        parts_box.append(to_voc_pixels(np.asarray(det["boxes"], dtype=np.float64)))
        parts_label.append(np.asarray(det["labels"], dtype=np.int64).reshape(-1))
    if not parts_score:
        empty = ClassDetections(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))
        return [empty for _ in range(num_classes)]
    img, score, box, label = (np.concatenate(p) for p in (parts_img, parts_score, parts_box, parts_label))
    return [ClassDetections(img[label == c], score[label == c], box[label == c]) for c in range(num_classes)]


def evaluate_voc(records: list[ImageRecord], detections: dict, class_names: list[str], metric: str = "voc07", *,
                 iou_thresh: float = 0.5, python_port: bool = False, class_dets: list[ClassDetections] | None = None,
                 return_curves: bool = False) -> dict:
    """Devkit VOC mAP of detections against records.

    Args:
        records: ground truth, one per image of the split.
        detections: image_id -> {"boxes" (N,4) xyxy library convention, "scores" (N,), "labels" (N,)}.
        class_names: label i is ``class_names[i]``.
        metric: "voc07" (11-point) or "voc10" (all points, VOC2010+).
        python_port: reproduce py-faster-rcnn's ``voc_eval.py`` (unstable sort, IoU > 0.5).
        class_dets: detections already in VOC pixels per class (results files), instead of ``detections``.

    Returns:
        {"metric", "mAP", "per_class": {name: AP}}; a class without (non-difficult) ground truth
        has AP NaN and is left out of the mean. With ``return_curves``, also "curves": {name: dict}.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    num_classes = len(class_names)
    gts = ground_truth_by_class(records, num_classes)
    if class_dets is None:
        class_dets = detections_by_class(records, detections, num_classes)
    per_class, curves = {}, {}
    for c, name in enumerate(class_names):
        result = evaluate_class(class_dets[c], gts[c], len(records), use_07_metric=(metric == "voc07"),
                                iou_thresh=iou_thresh, python_port=python_port)
        per_class[name] = result["ap"]
        curves[name] = result
    valid = [ap for ap in per_class.values() if not np.isnan(ap)]
    out = {"metric": metric, "mAP": float(np.mean(valid)) if valid else float("nan"), "per_class": per_class}
    if return_curves:
        out["curves"] = curves
    return out
