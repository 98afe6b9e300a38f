"""VOC devkit AP: hand-computed cases and the loop-by-loop devkit oracle."""

from pathlib import Path

import numpy as np
import pytest

from detect.data.records import ImageRecord
from detect.evaluation.voc import VOC07_RECALL_THRESHOLDS, evaluate_voc
from tests.devkit_reference import devkit_ap


def rec(image_id, voc_boxes, labels=None, difficult=None):
    """A record from VOC-pixel boxes (the library stores xmin-1, ymin-1, xmax, ymax)."""
    b = np.array(voc_boxes, dtype=np.float32).reshape(-1, 4)
    b[:, :2] -= 1
    n = len(b)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 100, 100, b,
                       np.zeros(n, np.int64) if labels is None else labels,
                       np.zeros(n, bool) if difficult is None else np.array(difficult, bool))


def det(voc_boxes, scores, labels=None):
    b = np.array(voc_boxes, dtype=np.float64).reshape(-1, 4)
    b[:, :2] -= 1
    return {"boxes": b, "scores": np.array(scores, np.float64),
            "labels": np.zeros(len(scores), np.int64) if labels is None else np.array(labels)}


def test_duplicate_and_background_detections():
    records = [rec("a", [[1, 1, 10, 10], [21, 21, 40, 40]])]
    dets = {"a": det([[1, 1, 10, 10], [1, 1, 10, 10], [60, 60, 70, 70]], [0.9, 0.8, 0.7])}
    # tp = [1, 0, 0]; recall 0.5 throughout; precision 1, 1/2, 1/3
    assert evaluate_voc(records, dets, ["x"], "voc10")["mAP"] == pytest.approx(0.5)
    assert evaluate_voc(records, dets, ["x"], "voc07")["mAP"] == pytest.approx(6 / 11)


def test_difficult_objects_are_neither_hits_nor_misses():
    records = [rec("a", [[1, 1, 10, 10], [31, 31, 50, 50]], difficult=[False, True])]
    dets = {"a": det([[31, 31, 50, 50], [1, 1, 10, 10]], [0.9, 0.5])}
    out = evaluate_voc(records, dets, ["x"], "voc10")
    # the difficult hit is ignored: one positive, found by the only counted detection
    assert out["mAP"] == pytest.approx(1.0)
    # without the flag the same detections give precision 1 at recall 0.5, then 1 at recall 1
    plain = [rec("a", [[1, 1, 10, 10], [31, 31, 50, 50]])]
    assert evaluate_voc(plain, dets, ["x"], "voc10")["mAP"] == pytest.approx(1.0)
    miss = {"a": det([[1, 1, 10, 10]], [0.5])}
    assert evaluate_voc(plain, miss, ["x"], "voc10")["mAP"] == pytest.approx(0.5)
    assert evaluate_voc(records, miss, ["x"], "voc10")["mAP"] == pytest.approx(1.0)


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    records = [rec("a", [[1, 1, 10, 10]], labels=np.array([0]))]
    dets = {"a": det([[1, 1, 10, 10], [5, 5, 20, 20]], [0.9, 0.8], labels=[0, 1])}
    out = evaluate_voc(records, dets, ["x", "y"], "voc07")
    assert out["per_class"]["x"] == pytest.approx(1.0)
    assert np.isnan(out["per_class"]["y"])
    assert out["mAP"] == pytest.approx(1.0)


def test_images_without_detections_lower_recall():
    records = [rec("a", [[1, 1, 10, 10]]), rec("b", [[1, 1, 10, 10]]), rec("c", [])]
    dets = {"a": det([[1, 1, 10, 10]], [0.9])}
    assert evaluate_voc(records, dets, ["x"], "voc10")["mAP"] == pytest.approx(0.5)
    assert evaluate_voc(records, {}, ["x"], "voc10")["mAP"] == 0.0
    assert evaluate_voc(records, {}, ["x"], "voc07")["mAP"] == 0.0


def test_equal_scores_keep_file_order_like_matlab():
    records = [rec("a", [[1, 1, 10, 10]])]
    fp_first = {"a": det([[50, 50, 60, 60], [1, 1, 10, 10]], [0.5, 0.5])}
    tp_first = {"a": det([[1, 1, 10, 10], [50, 50, 60, 60]], [0.5, 0.5])}
    assert evaluate_voc(records, fp_first, ["x"], "voc10")["mAP"] == pytest.approx(0.5)
    assert evaluate_voc(records, tp_first, ["x"], "voc10")["mAP"] == pytest.approx(1.0)


def test_overlap_of_exactly_one_half_matches_in_devkit_but_not_in_python_port():
    records = [rec("a", [[1, 1, 10, 10]])]           # 10 x 10 pixels
    dets = {"a": det([[1, 1, 10, 5]], [0.9])}         # 10 x 5 pixels inside: IoU = 50 / 100
    assert evaluate_voc(records, dets, ["x"], "voc10")["mAP"] == pytest.approx(1.0)
    assert evaluate_voc(records, dets, ["x"], "voc10", python_port=True)["mAP"] == 0.0


def test_eleven_point_thresholds_are_matlab_doubles():
    assert VOC07_RECALL_THRESHOLDS[7] == 0.7 and VOC07_RECALL_THRESHOLDS[6] == 0.6
    assert np.arange(0, 1.1, 0.1)[7] > 0.7         # numpy's differs, which the port inherits
    # 10 objects, 7 found with precision 1, then only false positives: recall reaches exactly 0.7
    records = [rec(f"i{k}", [[1, 1, 10, 10]]) for k in range(10)]
    dets = {f"i{k}": det([[1, 1, 10, 10]], [1.0 - k / 100]) for k in range(7)}
    devkit = evaluate_voc(records, dets, ["x"], "voc07")["mAP"]
    port = evaluate_voc(records, dets, ["x"], "voc07", python_port=True)["mAP"]
    assert devkit == pytest.approx(8 / 11)           # thresholds 0 .. 0.7 inclusive
    assert port == pytest.approx(7 / 11)


def _random_case(rng, num_images=30, num_classes=3):
    records, dets, gt_ref, det_ref = [], {}, [dict() for _ in range(num_classes)], [[] for _ in range(num_classes)]
    for i in range(num_images):
        n = rng.integers(0, 5)
        xy = rng.integers(1, 60, size=(n, 2))
        wh = rng.integers(3, 40, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(float)
        labels = rng.integers(0, num_classes, n)
        difficult = rng.random(n) < 0.2
        records.append(rec(f"img{i}", boxes, labels, difficult))
        for c in range(num_classes):
            gt_ref[c][f"img{i}"] = [(*b, d) for b, l, d in zip(boxes, labels, difficult) if l == c]
        m = rng.integers(0, 8)
        pick = rng.integers(0, max(n, 1), m)
        dbox = (boxes[pick] if n else np.zeros((m, 4)) + [1, 1, 20, 20]) + rng.integers(-6, 7, size=(m, 4))
        dbox[:, 2:] = np.maximum(dbox[:, 2:], dbox[:, :2] + 1)
        dlab = np.where(rng.random(m) < 0.8, labels[pick] if n else 0, rng.integers(0, num_classes, m))
        score = rng.integers(0, 6, m) / 5.0          # coarse scores: many ties
        dets[f"img{i}"] = det(dbox, score, dlab)
        for b, s, l in zip(dbox, score, dlab):
            det_ref[int(l)].append((f"img{i}", float(s), *b))
    return records, dets, gt_ref, det_ref


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_matches_loop_by_loop_devkit_on_random_cases(seed, metric):
    rng = np.random.default_rng(seed)
    records, dets, gt_ref, det_ref = _random_case(rng)
    out = evaluate_voc(records, dets, ["a", "b", "c"], metric)
    for c, name in enumerate(["a", "b", "c"]):
        expected = devkit_ap(gt_ref[c], det_ref[c], use_07=(metric == "voc07"))
        if np.isnan(expected):
            assert np.isnan(out["per_class"][name])
        else:
            assert out["per_class"][name] == pytest.approx(expected, abs=1e-12)
