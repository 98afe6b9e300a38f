"""Which class a detector calls each object, and the score threshold to run it at.

* :func:`class_confusion`: detections above a score threshold are matched one-to-one to the
  ground truth of ANY class at IoU >= 0.5 (the assignment that maximises the summed IoU,
  by ``scipy.optimize.linear_sum_assignment``); the matrix counts, per true class, which
  class the matched detection predicted, with a "background" row for detections that
  match nothing and a "missed" column for objects no detection matched
  (``sklearn.metrics.confusion_matrix`` does the counting). Difficult objects take part in
  the matching so a detection of one is not called background, but neither they nor the
  detections matched to them are counted.
* :func:`precision_recall_at` and :func:`suggest_thresholds`: precision, recall and F1 per
  class at a score threshold, with the devkit's per-class matching (the ranked detections
  of :func:`detect.analysis.curves.rank_classes`), and the threshold of the highest F1.
  scikit-learn's ``precision_recall_curve`` does not fit: its recall divides by the positive
  samples it is given, while here objects that no detection found count too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import confusion_matrix
from torchvision.ops import box_iou

from detect.analysis.curves import RankedClass
from detect.data.records import ImageRecord


@dataclass
class ClassConfusion:
    """A class-confusion matrix.

    Attributes:
        matrix: (C + 1, C + 1) counts; row = true class (last row: background, a detection that
            matched no object), column = predicted class (last column: missed, an object no
            detection matched). The background/missed corner is always 0.
        class_names: the C classes.
        score_thresh: detections counted from this score.
        iou_thresh: the matching IoU.
    """

    matrix: np.ndarray
    class_names: list[str]
    score_thresh: float
    iou_thresh: float

    @property
    def rows(self) -> list[str]:
        return [*self.class_names, "background"]

    @property
    def columns(self) -> list[str]:
        return [*self.class_names, "missed"]

    def to_json(self) -> dict:
        return {"score_thresh": self.score_thresh, "iou_thresh": self.iou_thresh, "rows": self.rows,
                "columns": self.columns, "matrix": self.matrix.tolist()}


def match_any_class(gt_boxes: np.ndarray, det_boxes: np.ndarray, *,
                    iou_thresh: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches at IoU >= ``iou_thresh``, whatever the classes, maximising the summed IoU.

    Args:
        gt_boxes: (G, 4) xyxy.
        det_boxes: (D, 4) xyxy.

    Returns:
        ``(gt_index, det_index)``: (M,) each, the matched pairs.
    """
    none = np.zeros(0, np.int64)
    if not len(gt_boxes) or not len(det_boxes):
        return none, none
    iou = box_iou(torch.as_tensor(np.asarray(gt_boxes, np.float64)),
                  torch.as_tensor(np.asarray(det_boxes, np.float64))).numpy()
    # pairs below the threshold weigh 0, so the assignment never trades a valid pair for one of them
    weight = np.where(iou >= iou_thresh, iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = weight[rows, cols] > 0
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def class_confusion(records: list[ImageRecord], detections: dict, class_names: list[str], *,
                    score_thresh: float = 0.5, iou_thresh: float = 0.5) -> ClassConfusion:
    """The class-confusion matrix of ``detections`` (image_id -> boxes/scores/labels) on ``records``."""
    num = len(class_names)
    true, pred = [], []
    for record in records:
        det = detections.get(record.image_id)
        keep = np.zeros(0, bool) if det is None else np.asarray(det["scores"]).reshape(-1) >= score_thresh
        d_boxes = np.zeros((0, 4)) if det is None else np.asarray(det["boxes"]).reshape(-1, 4)[keep]
        d_labels = np.zeros(0, np.int64) if det is None else np.asarray(det["labels"]).reshape(-1)[keep]
        g_labels = np.asarray(record.labels, np.int64).reshape(-1)
        difficult = np.asarray(record.difficult, bool).reshape(-1)
        gi, di = match_any_class(np.asarray(record.boxes).reshape(-1, 4), d_boxes, iou_thresh=iou_thresh)
        counted = ~difficult[gi]
        true += g_labels[gi][counted].tolist()
        pred += d_labels[di][counted].tolist()
        missed = np.setdiff1d(np.flatnonzero(~difficult), gi)
        true += g_labels[missed].tolist()
        pred += [num] * len(missed)
        background = np.setdiff1d(np.arange(len(d_labels)), di)
        true += [num] * len(background)
        pred += d_labels[background].tolist()
    matrix = confusion_matrix(true, pred, labels=list(range(num + 1))) if true \
        else np.zeros((num + 1, num + 1), np.int64)
    return ClassConfusion(matrix.astype(np.int64), list(class_names), float(score_thresh), float(iou_thresh))


@dataclass
class ClassThreshold:
    """Precision, recall and F1 of one class at a score threshold, and the threshold of its best F1.

    Attributes:
        name: the class ("all" for the sum over classes).
        npos: objects that count (VOC: not difficult).
        tp, fp: detections from ``score_thresh`` that are true / false positives (the devkit's matching).
        precision, recall, f1: at ``score_thresh`` (NaN where undefined: no detection, no object).
        best_thresh: the score threshold with the highest F1 (NaN when no detection is correct).
        best_precision, best_recall, best_f1: at ``best_thresh``.
    """

    name: str
    npos: int
    tp: int
    fp: int
    precision: float
    recall: float
    f1: float
    best_thresh: float = math.nan
    best_precision: float = math.nan
    best_recall: float = math.nan
    best_f1: float = math.nan


def _prf(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 = 2 TP / (2 TP + FP + FN) (0 when nothing is found, NaN with nothing to find)."""
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = tp / npos if npos > 0 else np.full_like(tp, np.nan)
        f1 = np.where(tp + fp + npos > 0, 2 * tp / (tp + fp + npos), np.nan)     # 2TP + FP + FN = TP + FP + npos
    return precision, recall, f1


def precision_recall_at(ranked: list[RankedClass], score_thresh: float) -> list[ClassThreshold]:
    """One :class:`ClassThreshold` per class (best threshold filled by :func:`suggest_thresholds`), then "all"."""
    out = []
    for rc in ranked:
        keep = rc.scores >= score_thresh
        tp, fp = int(rc.tp[keep].sum()), int(rc.fp[keep].sum())
        p, r, f = (float(v[0]) for v in _prf(np.array([tp]), np.array([fp]), rc.npos))
        out.append(ClassThreshold(rc.name, rc.npos, tp, fp, p, r, f))
    npos, tp, fp = (sum(getattr(c, k) for c in out) for k in ("npos", "tp", "fp"))
    p, r, f = (float(v[0]) for v in _prf(np.array([tp]), np.array([fp]), npos))
    out.append(ClassThreshold("all", npos, tp, fp, p, r, f))
    return out


def best_f1_threshold(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray,
                      npos: int) -> tuple[float, float, float, float]:
    """``(threshold, precision, recall, f1)`` at the score threshold of the highest F1.

    Args:
        scores: (D,) decreasing, as ranked; tp, fp: (D,) 0/1 flags (both 0: ignored).

    The candidates are the distinct scores (a threshold keeps every detection with that score);
    of equal F1s the highest threshold wins. All NaN when no detection is a true positive.
    """
    if npos <= 0 or not np.any(tp):
        return math.nan, math.nan, math.nan, math.nan
    ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])     # last detection of each distinct score
    precision, recall, f1 = _prf(np.cumsum(tp)[ends], np.cumsum(fp)[ends], npos)
    k = int(np.nanargmax(f1))
    return float(scores[ends[k]]), float(precision[k]), float(recall[k]), float(f1[k])


def suggest_thresholds(ranked: list[RankedClass], score_thresh: float) -> list[ClassThreshold]:
    """:func:`precision_recall_at` with each class's best-F1 threshold (the "all" row: the F1-best common one)."""
    rows = precision_recall_at(ranked, score_thresh)
    for row, rc in zip(rows, ranked):
        row.best_thresh, row.best_precision, row.best_recall, row.best_f1 = best_f1_threshold(
            rc.scores, rc.tp, rc.fp, rc.npos)
    if ranked:
        scores = np.concatenate([rc.scores for rc in ranked])
        order = np.argsort(-scores, kind="stable")
        tp, fp = (np.concatenate([getattr(rc, k) for rc in ranked])[order] for k in ("tp", "fp"))
        all_row = rows[-1]
        all_row.best_thresh, all_row.best_precision, all_row.best_recall, all_row.best_f1 = best_f1_threshold(
            scores[order], tp, fp, all_row.npos)
    return rows
