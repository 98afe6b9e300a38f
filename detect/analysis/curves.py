"""Precision-recall curves and AP tables: per class, by object size, by truncated / difficult flag.

AP comes from the devkit-exact code in :mod:`detect.evaluation.voc`; this module
only chooses which objects count. For a subset of objects (e.g. "small"), the
objects outside it are treated like VOC's difficult ones: a detection matching
one is neither right nor wrong. False positives are kept, except that for size
ranges a detection that matches nothing and is itself outside the range is
ignored, as COCO does (``areaRng``). Sizes follow COCO: small < 32², medium
< 96², large otherwise, in input-image pixels (box area).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from detect.data.records import ImageRecord
from detect.evaluation.voc import (ClassGroundTruth, ap_from_pr, detections_by_class,
                                   evaluate_class, ground_truth_by_class)
from detect.utils.io import save_figure

SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
                                               "large": (96.0 ** 2, math.inf)}


@dataclass
class RankedClass:
    """One class's detections in rank order, as the devkit scored them.

    Attributes:
        name: class name.
        gt: the class's ground truth (VOC pixels; ``difficult`` marks the objects that do not count).
        image_index: (D,) image of each detection, best score first.
        boxes: (D, 4) detections in VOC pixels.
        scores: (D,) scores, decreasing.
        tp, fp: (D,) 0/1; both 0 for an ignored detection (it matched an object that does not count).
        npos: objects that count.
        ap: average precision (NaN without objects that count).
        recall, precision: (D,) the curve.
    """

    name: str
    gt: ClassGroundTruth
    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    npos: int
    ap: float
    recall: np.ndarray
    precision: np.ndarray


def ap_from_tp_fp(tp: np.ndarray, fp: np.ndarray, npos: int, metric: str = "voc07") -> float:
    """AP of ranked 0/1 true / false positive flags (entries with both 0 are ignored, as in the devkit)."""
    if npos <= 0:
        return float("nan")
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp_cum / (tp_cum + fp_cum)
    return ap_from_pr(tp_cum / float(npos), precision, metric == "voc07")


def object_flags(records: list[ImageRecord], fn: Callable[[ImageRecord], np.ndarray]) -> np.ndarray:
    """Concatenate a per-object array over the records, in :func:`ground_truth_by_class` order."""
    parts = [np.asarray(fn(r)).reshape(len(r.labels)) for r in records]
    return np.concatenate(parts) if parts else np.zeros(0)


def rank_classes(records: list[ImageRecord], detections: dict, class_names: list[str], *, metric: str = "voc07",
                 counts: np.ndarray | None = None) -> list[RankedClass]:
    """Score every class as the devkit does, keeping the ranked detections.

    Args:
        counts: optional (total objects,) bool over all objects of ``records`` in order: which objects count
            as positives (default: the non-difficult ones); the rest are ignored like difficult objects.
    """
    num = len(class_names)
    gts = ground_truth_by_class(records, num)
    if counts is not None:
        labels = object_flags(records, lambda r: r.labels).astype(np.int64)
        gts = [ClassGroundTruth(g.image_index, g.boxes, ~np.asarray(counts, bool)[labels == c])
               for c, g in enumerate(gts)]
    out = []
    for c, (dets, gt) in enumerate(zip(detections_by_class(records, detections, num), gts)):
        result = evaluate_class(dets, gt, len(records), use_07_metric=metric == "voc07")
        order = np.argsort(-dets.scores, kind="stable")     # the order evaluate_class ranks in
        out.append(RankedClass(class_names[c], gt, dets.image_index[order], dets.boxes[order], dets.scores[order],
                               result["tp"], result["fp"], result["npos"], result["ap"], result["recall"],
                               result["precision"]))
    return out


def _mean(values) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return float(np.mean(valid)) if valid else float("nan")


def subset_ap(records: list[ImageRecord], detections: dict, class_names: list[str], *,
              counts: np.ndarray, area_range: tuple[float, float] | None = None,
              metric: str = "voc07") -> dict:
    """AP when only the objects flagged in ``counts`` are positives.

    Args:
        counts: (total objects,) bool, see :func:`rank_classes`.
        area_range: ``[lo, hi)`` box area; a false positive whose own area lies outside is ignored.

    Returns:
        ``{"mAP", "per_class": {name: AP}, "npos": {name: count}}``.
    """
    ranked = rank_classes(records, detections, class_names, metric=metric, counts=counts)
    per_class, npos = {}, {}
    for rc in ranked:
        fp = rc.fp
        if area_range is not None and len(fp):
            area = (rc.boxes[:, 2] - rc.boxes[:, 0] + 1.0) * (rc.boxes[:, 3] - rc.boxes[:, 1] + 1.0)
            outside = (area < area_range[0]) | (area >= area_range[1])
            fp = np.where(outside, 0.0, fp)
        per_class[rc.name] = ap_from_tp_fp(rc.tp, fp, rc.npos, metric)
        npos[rc.name] = rc.npos
    return {"mAP": _mean(per_class.values()), "per_class": per_class, "npos": npos}


def breakdown(records: list[ImageRecord], detections: dict, class_names: list[str], *,
              metric: str = "voc07") -> dict[str, dict]:
    """AP by object size and by flag: one :func:`subset_ap` result per row.

    Rows: ``all`` (the standard AP: difficult objects ignored), ``small`` / ``medium`` / ``large``,
    ``truncated`` / ``not truncated`` (non-difficult objects with / without the flag),
    ``difficult counted`` (difficult objects count as ordinary ones) and ``difficult only``.
    """
    difficult = object_flags(records, lambda r: r.difficult).astype(bool)
    truncated = object_flags(records, lambda r: r.truncated).astype(bool)
    boxes = [r.boxes for r in records]
    stacked = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    area = (stacked[:, 2] - stacked[:, 0]).astype(np.float64) * (stacked[:, 3] - stacked[:, 1])
    rows = {"all": subset_ap(records, detections, class_names, counts=~difficult, metric=metric)}
    for name, (lo, hi) in SIZE_RANGES.items():
        rows[name] = subset_ap(records, detections, class_names, counts=~difficult & (area >= lo) & (area < hi),
                               area_range=(lo, hi), metric=metric)
    rows["truncated"] = subset_ap(records, detections, class_names, counts=~difficult & truncated, metric=metric)
    rows["not truncated"] = subset_ap(records, detections, class_names, counts=~difficult & ~truncated, metric=metric)
    rows["difficult counted"] = subset_ap(records, detections, class_names, counts=np.ones_like(difficult),
                                         metric=metric)
    rows["difficult only"] = subset_ap(records, detections, class_names, counts=difficult, metric=metric)
    return rows


def plot_pr_curves(ranked: list[RankedClass], path: str | Path, *, title: str = "") -> Path:
    """One small precision-recall plot per class, its AP in the legend (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, len(ranked)))
    rows = max(1, math.ceil(len(ranked) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel()[len(ranked):]:
        ax.axis("off")
    for ax, rc in zip(axes.ravel(), ranked):
        ap = "n/a" if math.isnan(rc.ap) else f"{rc.ap:.3f}"
        if len(rc.recall) and rc.npos > 0:
            keep = ~np.isnan(rc.precision)
            ax.plot(rc.recall[keep], rc.precision[keep], color="tab:blue", label=f"AP {ap}")
        else:
            ax.plot([], [], color="tab:blue", label=f"AP {ap}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{rc.name} ({rc.npos} objects)", xlabel="recall",
               ylabel="precision")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)

