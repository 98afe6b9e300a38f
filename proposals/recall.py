"""How well proposals cover the ground truth: recall, (M)ABO, average recall, and their curves.

Definitions (Uijlings et al. 2013, Sec. 4; Hosang et al., "What makes for effective detection
proposals?", PAMI 2016):

- best overlap of an object: the highest IoU of any proposal with its box;
- recall@t: the fraction of objects whose best overlap is at least t;
- ABO of a class: the mean best overlap of its objects; MABO: the mean of the class ABOs;
- average recall (AR): recall averaged over IoU thresholds 0.5, 0.55, ..., 0.95.

VOC "difficult" objects are left out, as in the paper. IoU comes from ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from detect.data.records import ImageRecord
from detect.utils.io import save_figure

DEFAULT_COUNTS = (1, 10, 20, 50, 100, 200, 300, 500, 1000, 1500, 2000, 3000, 5000, 10000)
AR_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
CURVE_THRESHOLDS = np.round(np.linspace(0.5, 1.0, 51), 2)


def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Best IoU of each object among the first ``c`` proposals, for every ``c`` in ``counts``.

    Args:
        gt_boxes: (G, 4) xyxy.
        proposals: (N, 4) xyxy, best-ranked first.
        counts: increasing proposal counts.

    Returns:
        (G, len(counts)) float64; 0 where there are no proposals.
    """
    # float64: an IoU of exactly 0.7 must count at the 0.7 threshold
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(gt_boxes), len(counts)), dtype=np.float64)
    if len(gt_boxes) == 0 or len(proposals) == 0:
        return out
    iou = box_iou(torch.from_numpy(gt_boxes), torch.from_numpy(proposals)).numpy()
    running = np.maximum.accumulate(iou, axis=1)                      # (G, N): best among the first j+1
    columns = np.minimum(np.asarray(counts, dtype=np.int64), len(proposals)) - 1
    return running[:, columns]


def _recall(overlaps: np.ndarray, threshold: float) -> float:
    return float((overlaps >= threshold).mean()) if overlaps.size else 0.0


def evaluate_recall(records: Iterable[ImageRecord], proposals: Mapping[str, np.ndarray],
                    class_names: Sequence[str], *, top_k: int | None = None,
                    counts: Sequence[int] = DEFAULT_COUNTS) -> dict:
    """Recall of ``proposals`` against the non-difficult objects of ``records``.

    Args:
        records: ground truth; ``record.image_id`` keys ``proposals``.
        proposals: image id -> (N, 4) boxes best first; an image without an entry counts as having none.
        class_names: label i is ``class_names[i]``.
        top_k: the headline numbers use the first ``top_k`` proposals (None: all).
        counts: proposal counts of the recall-vs-count curve (``top_k`` and "all" are added).

    Returns:
        A JSON-ready dict: ``num_images``, ``num_objects``, ``missing_images``, ``proposals_per_image``,
        ``top_k``, ``recall@0.5``, ``recall@0.7``, ``average_recall``, ``mabo``, ``abo``, ``per_class``
        (name -> ``num_objects``, ``abo``, ``recall@0.5``, ``recall@0.7``), ``recall_vs_iou``
        (``iou``, ``recall``) and ``recall_vs_count`` (``count``, ``recall@0.5``, ``recall@0.7``,
        ``average_recall``, ``mabo``).
    """
    records = list(records)
    curve_counts = sorted({int(c) for c in counts if c > 0})
    max_boxes = max((len(proposals[r.image_id]) for r in records if r.image_id in proposals), default=0)
    all_count = max(max_boxes, 1)
    head = int(top_k) if top_k and top_k > 0 else all_count
    columns = sorted({c for c in curve_counts if c < all_count} | {min(head, all_count), all_count})
    head_col = columns.index(min(head, all_count))
    per_object, labels, missing, kept = [], [], 0, []
    for record in records:
        keep = ~record.difficult
        boxes = proposals.get(record.image_id)
        if boxes is None:
            missing += 1
            boxes = np.zeros((0, 4), np.float32)
        kept.append(min(len(boxes), head))
        per_object.append(best_overlaps(record.boxes[keep], boxes, columns))
        labels.append(record.labels[keep])
    overlaps = np.concatenate(per_object) if per_object else np.zeros((0, len(columns)))
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)

    def summary(column: np.ndarray) -> dict:
        abo = {name: float(column[labels == c].mean()) for c, name in enumerate(class_names) if (labels == c).any()}
        return {"recall@0.5": _recall(column, 0.5), "recall@0.7": _recall(column, 0.7),
                "average_recall": float(np.mean([_recall(column, t) for t in AR_THRESHOLDS])),
                "mabo": float(np.mean(list(abo.values()))) if abo else 0.0,
                "abo": float(column.mean()) if column.size else 0.0, "class_abo": abo}

    best = overlaps[:, head_col]
    head_summary = summary(best)
    per_class = {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = {"num_objects": int(mask.sum()), "abo": head_summary["class_abo"][name],
                               "recall@0.5": _recall(best[mask], 0.5), "recall@0.7": _recall(best[mask], 0.7)}
    curve = [summary(overlaps[:, i]) for i in range(len(columns))]
    return {
        "num_images": len(records), "num_objects": int(len(labels)), "missing_images": missing,
        "proposals_per_image": float(np.mean(kept)) if kept else 0.0, "top_k": top_k,
        **{key: head_summary[key] for key in ("recall@0.5", "recall@0.7", "average_recall", "mabo", "abo")},
        "per_class": per_class,
        "recall_vs_iou": {"iou": CURVE_THRESHOLDS.tolist(), "recall": [_recall(best, t) for t in CURVE_THRESHOLDS]},
        "recall_vs_count": {"count": columns, **{key: [c[key] for c in curve]
                                                 for key in ("recall@0.5", "recall@0.7", "average_recall", "mabo")}},
    }


def format_report(report: dict) -> str:
    """A few readable lines: headline numbers, then per-class ABO and recall."""
    k = report["top_k"] or "all"
    lines = [f"{report['num_images']} images, {report['num_objects']} objects, "
             f"{report['proposals_per_image']:.0f} proposals/image (top {k})"
             + (f", {report['missing_images']} images without proposals" if report["missing_images"] else ""),
             f"recall@0.5 {report['recall@0.5']:.4f}  recall@0.7 {report['recall@0.7']:.4f}  "
             f"AR {report['average_recall']:.4f}  MABO {report['mabo']:.4f}  ABO {report['abo']:.4f}"]
    for name, stats in report["per_class"].items():
        lines.append(f"  {name:>20s}: {stats['num_objects']:5d} objects  ABO {stats['abo']:.4f}  "
                     f"recall@0.5 {stats['recall@0.5']:.4f}  recall@0.7 {stats['recall@0.7']:.4f}")
    curve = report["recall_vs_count"]
    lines.append("  #proposals: " + "  ".join(f"{c}:{r:.3f}" for c, r in zip(curve["count"], curve["recall@0.7"]))
                 + "  (recall@0.7)")
    return "\n".join(lines)


def plot_recall(reports: Mapping[str, dict], path: str | Path) -> Path:
    """Write a PNG with recall-vs-IoU and recall-vs-#proposals curves, one line per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, report in reports.items():
        left.plot(report["recall_vs_iou"]["iou"], report["recall_vs_iou"]["recall"], label=label)
        curve = report["recall_vs_count"]
        line, = right.plot(curve["count"], curve["recall@0.7"], label=f"{label} IoU 0.7")
        right.plot(curve["count"], curve["recall@0.5"], linestyle="--", color=line.get_color(),
                   label=f"{label} IoU 0.5")
    k = next(iter(reports.values()))["top_k"] if reports else None
    left.set(xlabel="IoU threshold", ylabel="recall", title=f"recall vs IoU (top {k or 'all'} proposals)",
             xlim=(0.5, 1.0), ylim=(0, 1.01))
    right.set(xlabel="number of proposals", ylabel="recall", title="recall vs number of proposals",
              xscale="log", ylim=(0, 1.01))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
