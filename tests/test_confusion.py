"""Class confusion, precision / recall / F1 at a threshold and the best-F1 threshold, on hand-made detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detect.analysis.confusion import (best_f1_threshold, class_confusion, match_any_class, precision_recall_at,
                                       suggest_thresholds)
from detect.analysis.curves import rank_classes
from detect.data.records import ImageRecord

NAMES = ["cat", "dog", "cow"]


def _record(image_id: str, boxes, labels, difficult=None) -> ImageRecord:
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 100, 100, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                       labels=labels, difficult=difficult if difficult is not None else [False] * len(labels))


def _dets(rows) -> dict:
    """rows: (score, label, box) -> the detections dict of one image."""
    return {"scores": np.array([r[0] for r in rows], np.float32),
            "labels": np.array([r[1] for r in rows], np.int64),
            "boxes": np.array([r[2] for r in rows], np.float32).reshape(-1, 4)}


def _confusion_case():
    a = _record("a", [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], [0, 1, 0, 1],
                [False, False, True, False])
    b = _record("b", [[0, 0, 20, 20]], [2])
    c = _record("c", [], [])
    dets = {"a": _dets([(0.9, 0, [0, 0, 10, 10]),      # cat on the cat: right
                        (0.8, 0, [20, 0, 30, 10]),     # cat on the dog: a confusion
                        (0.7, 1, [41, 0, 51, 10]),     # on the difficult cat: not counted
                        (0.6, 1, [80, 80, 90, 90]),    # on nothing: background
                        (0.5, 0, [0, 1, 10, 11]),      # a second cat on the taken cat, at the threshold: background
                        (0.3, 1, [60, 0, 70, 10])]),   # under the threshold: the dog at 60 is missed
            "b": _dets([]),                            # the cow is missed
            "c": _dets([(0.9, 2, [10, 10, 40, 40])]),  # a cow in an image without objects
            "elsewhere": _dets([(0.9, 0, [0, 0, 10, 10])])}   # an image not in the split: ignored
    return [a, b, c], dets


def test_confusion_matrix_counts_each_case_once():
    records, dets = _confusion_case()
    result = class_confusion(records, dets, NAMES, score_thresh=0.5)
    assert result.rows == ["cat", "dog", "cow", "background"] and result.columns == ["cat", "dog", "cow", "missed"]
    assert result.matrix.tolist() == [[1, 0, 0, 0],      # cat: found as cat
                                      [1, 0, 0, 1],      # dog: called cat once, missed once
                                      [0, 0, 0, 1],      # cow: missed
                                      [1, 1, 1, 0]]      # background: the second cat, the stray dog, the cow
    # at a threshold under 0.3 the dog at 60 is found
    low = class_confusion(records, dets, NAMES, score_thresh=0.2).matrix
    assert low[1].tolist() == [1, 1, 0, 0] and low[3].tolist() == [1, 1, 1, 0]
    assert result.to_json()["matrix"][3] == [1, 1, 1, 0] and result.to_json()["score_thresh"] == 0.5


def test_difficult_objects_are_neither_found_nor_missed():
    record = _record("a", [[0, 0, 10, 10]], [0], [True])
    assert class_confusion([record], {"a": _dets([])}, NAMES).matrix.sum() == 0
    found = class_confusion([record], {"a": _dets([(0.9, 1, [0, 0, 10, 10])])}, NAMES).matrix
    assert found.sum() == 0                     # not background either: it matched the difficult object
    empty = class_confusion([], {}, NAMES)
    assert empty.matrix.shape == (4, 4) and empty.matrix.sum() == 0


def test_matching_is_one_to_one_and_maximises_the_summed_iou():
    """Catches a greedy match: the first detection (IoU 0.54 with both objects) must not take the object the
    second one covers exactly, or the second (IoU 0.25 with the other) would go unmatched."""
    gt = np.array([[0, 0, 10, 10], [6, 0, 16, 10]], np.float32)
    det = np.array([[3, 0, 13, 10], [0, 0, 10, 10]], np.float32)
    gi, di = match_any_class(gt, det)
    assert sorted(zip(gi.tolist(), di.tolist())) == [(0, 1), (1, 0)]
    gi, di = match_any_class(gt, np.array([[30, 30, 40, 40]], np.float32))
    assert len(gi) == len(di) == 0
    gi, di = match_any_class(gt, det, iou_thresh=0.6)           # only the exact one is left at 0.6
    assert list(zip(gi.tolist(), di.tolist())) == [(0, 1)]


def _threshold_case():
    objects = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 60, 80, 80]]
    record = _record("a", objects, [0, 0, 0, 1])
    far = [[90, 90, 99, 99], [85, 85, 95, 95], [80, 90, 90, 99]]
    dets = {"a": _dets([(0.9, 0, objects[0]), (0.8, 0, far[0]), (0.7, 0, objects[1]), (0.5, 0, far[1]),
                        (0.4, 0, objects[2]),                         # cat: TP FP TP FP TP (0.5: at the threshold)
                        (0.8, 1, objects[3]), (0.8, 1, far[2]),       # dog: a true and a false one, same score
                        (0.95, 2, far[0])])}                          # cow: no object at all
    return [record], dets


def test_precision_recall_f1_at_a_threshold():
    records, dets = _threshold_case()
    rows = {r.name: r for r in precision_recall_at(rank_classes(records, dets, NAMES), 0.5)}
    cat = rows["cat"]
    assert (cat.npos, cat.tp, cat.fp) == (3, 2, 2)
    assert cat.precision == pytest.approx(0.5) and cat.recall == pytest.approx(2 / 3)
    assert cat.f1 == pytest.approx(4 / 7)                      # 2TP / (2TP + FP + FN) = 4 / (4 + 2 + 1)
    assert (rows["dog"].tp, rows["dog"].fp) == (1, 1) and rows["dog"].f1 == pytest.approx(2 / 3)
    cow = rows["cow"]                                           # detections but nothing to find
    assert cow.precision == 0.0 and np.isnan(cow.recall) and cow.f1 == 0.0
    total = rows["all"]
    assert (total.npos, total.tp, total.fp) == (4, 3, 4) and total.f1 == pytest.approx(6 / 11)
    high = {r.name: r for r in precision_recall_at(rank_classes(records, dets, NAMES), 0.99)}
    assert np.isnan(high["cat"].precision) and high["cat"].recall == 0.0 and high["cat"].f1 == 0.0


def test_suggested_threshold_is_the_best_f1_and_groups_equal_scores():
    """Catches a best threshold taken between two detections of equal score (dog: precision 1 'at 0.8' after its
    true positive alone, though no threshold keeps one of the two without the other)."""
    records, dets = _threshold_case()
    rows = {r.name: r for r in suggest_thresholds(rank_classes(records, dets, NAMES), 0.5)}
    cat = rows["cat"]      # F1 by threshold: 0.9: 1/2, 0.8: 2/5, 0.7: 2/3, 0.6: 4/7, 0.4: 3/4
    assert cat.best_thresh == pytest.approx(0.4) and cat.best_f1 == pytest.approx(0.75)
    assert cat.best_precision == pytest.approx(0.6) and cat.best_recall == pytest.approx(1.0)
    dog = rows["dog"]
    assert dog.best_thresh == pytest.approx(0.8) and dog.best_precision == pytest.approx(0.5)
    assert dog.best_f1 == pytest.approx(2 / 3)
    assert np.isnan(rows["cow"].best_thresh)             # nothing to find: no threshold to suggest
    pooled = rows["all"]   # 0.95: 0, 0.9: 1/3, 0.8: 4/9, 0.7: 3/5, 0.5: 6/11, 0.4: 2/3
    assert pooled.best_thresh == pytest.approx(0.4) and pooled.best_f1 == pytest.approx(2 / 3)
    assert rows["cat"].f1 == pytest.approx(4 / 7)        # the at-threshold numbers stay


def test_best_f1_prefers_the_higher_threshold_on_ties():
    scores = np.array([0.9, 0.5, 0.3])
    tp, fp = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])
    # npos 1: F1 1 at 0.9, 2/3 at 0.5; npos 2: 2/3 at 0.9, 1/2 at 0.5, 4/5 at 0.3
    assert best_f1_threshold(scores, tp, fp, 1) == pytest.approx((0.9, 1.0, 1.0, 1.0))
    assert best_f1_threshold(scores, tp, fp, 2) == pytest.approx((0.3, 2 / 3, 1.0, 0.8))
    # npos 2: 2/3 at 0.9, 2/5 at 0.8, 2/3 again at 0.7: the higher threshold keeps fewer detections for the same F1
    tie = best_f1_threshold(np.array([0.9, 0.8, 0.8, 0.7]), np.array([1.0, 0.0, 0.0, 1.0]),
                            np.array([0.0, 1.0, 1.0, 0.0]), 2)
    assert tie == pytest.approx((0.9, 1.0, 0.5, 2 / 3))
    assert all(np.isnan(best_f1_threshold(scores, np.zeros(3), np.ones(3), 2)))
