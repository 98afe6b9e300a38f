"""VOC devkit AP: hand-computed cases and the loop-by-loop devkit oracle."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from detect.data.records import ImageRecord
from detect.evaluation.voc import (VOC07_RECALL_THRESHOLDS, ClassDetections, ClassGroundTruth, ap_from_pr,
                                  evaluate_class, evaluate_voc, matlab_colon)
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


# ---- cases found by mutation testing (mutmut over detect/evaluation/voc.py): each test names the mutant it kills

def test_matlab_colon_computes_each_half_from_its_own_end():
    # Kills: every mutant of matlab_colon (it only runs at import, so nothing called it with a mutant active).
    def halves(a, d, b, n):      # odd n, so there is no middle element
        return [a + k * d for k in range(n // 2 + 1)] + [b - j * d for j in range(n // 2, -1, -1)]
    for a, d, b in ((0.0, 0.1, 0.7), (1.0, 0.1, 1.7), (2.0, 0.25, 3.25)):
        n = round((b - a) / d)
        assert matlab_colon(a, d, b).tolist() == halves(a, d, b, n)
    devkit = [k * 0.1 if k < 5 else 1.0 - (10 - k) * 0.1 for k in range(11)]
    assert matlab_colon(0.0, 0.1, 1.0).tolist() == devkit == VOC07_RECALL_THRESHOLDS.tolist()


def test_ap_from_pr_and_evaluate_class_default_to_the_devkit():
    # Kills: python_port=True as the default of ap_from_pr and of evaluate_class (analysis/curves.py
    # calls both without the argument).
    recall, precision = np.arange(1, 8) / 10.0, np.ones(7)       # recall reaches exactly 0.7
    assert ap_from_pr(recall, precision, True) == pytest.approx(8 / 11)
    assert ap_from_pr(recall, precision, True, python_port=True) == pytest.approx(7 / 11)
    half = ClassDetections(np.array([0]), np.array([0.9]), np.array([[1.0, 1.0, 10.0, 5.0]]))   # IoU exactly 0.5
    gt = ClassGroundTruth(np.array([0]), np.array([[1.0, 1.0, 10.0, 10.0]]), np.array([False]))
    assert evaluate_class(half, gt, 1, use_07_metric=False)["ap"] == 1.0
    assert evaluate_class(half, gt, 1, use_07_metric=False, python_port=True)["ap"] == 0.0


def test_default_metric_is_voc07_and_an_unknown_one_is_an_error():
    # Kills: the default metric "voc07" mutated, and the error message dropped.
    records = [rec("a", [[1, 1, 10, 10], [21, 21, 40, 40]])]
    dets = {"a": det([[1, 1, 10, 10], [1, 1, 10, 10], [60, 60, 70, 70]], [0.9, 0.8, 0.7])}
    out = evaluate_voc(records, dets, ["x"])
    assert out["metric"] == "voc07" and out["mAP"] == pytest.approx(6 / 11)
    with pytest.raises(ValueError, match=r"metric must be one of \('voc07', 'voc10'\), got 'voc12'"):
        evaluate_voc(records, dets, ["x"], "voc12")


def test_iou_threshold_is_used():
    # Kills: evaluate_voc not passing iou_thresh on to evaluate_class.
    records = [rec("a", [[1, 1, 10, 10]])]
    dets = {"a": det([[1, 1, 10, 6]], [0.9])}                  # 60 of 100 pixels: IoU 0.6
    assert evaluate_voc(records, dets, ["x"], "voc10", iou_thresh=0.5)["mAP"] == 1.0
    assert evaluate_voc(records, dets, ["x"], "voc10", iou_thresh=0.7)["mAP"] == 0.0


def test_returned_curves_hold_the_ranked_values():
    # Kills: curves dropped or renamed, the "scores" key renamed.
    records = [rec("a", [[1, 1, 10, 10], [21, 21, 40, 40]])]
    dets = {"a": det([[60, 60, 70, 70], [1, 1, 10, 10], [1, 1, 10, 10]], [0.7, 0.9, 0.8])}
    curve = evaluate_voc(records, dets, ["x"], "voc10", return_curves=True)["curves"]["x"]
    assert curve["scores"].tolist() == [0.9, 0.8, 0.7]
    assert curve["tp"].tolist() == [1, 0, 0] and curve["fp"].tolist() == [0, 1, 1] and curve["npos"] == 2
    assert curve["recall"].tolist() == [0.5, 0.5, 0.5]
    assert curve["precision"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert curve["ap"] == pytest.approx(0.5)


def test_no_positives_anywhere_is_nan_without_warnings():
    # Kills: the mean taken over no valid class (a RuntimeWarning), float("nan") mutated, the empty-records
    # branch of ground_truth_by_class (np.concatenate of nothing), and the NaN recall curve of a class
    # without positives replaced by a scalar.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = evaluate_voc([], {}, ["x", "y"], "voc10")
        assert np.isnan(empty["mAP"]) and all(np.isnan(v) for v in empty["per_class"].values())
        only_difficult = [rec("a", [[1, 1, 10, 10]], difficult=[True])]
        out = evaluate_voc(only_difficult, {"a": det([[1, 1, 10, 10]], [0.9])}, ["x"], "voc07", return_curves=True)
    assert np.isnan(out["mAP"]) and np.isnan(out["per_class"]["x"])
    assert out["curves"]["x"]["recall"].shape == (1,) and np.isnan(out["curves"]["x"]["recall"][0])


def test_detections_of_unknown_images_are_an_error_naming_five():
    # Kills: the unknown-image check disabled, its message dropped or listing more than five.
    records = [rec("a", [[1, 1, 10, 10]])]
    dets = {f"u{k}": det([[1, 1, 10, 10]], [0.5]) for k in range(6)}
    with pytest.raises(ValueError, match=r"not in the ground truth: \['u0', 'u1', 'u2', 'u3', 'u4'\]$"):
        evaluate_voc(records, dets, ["x"])


def test_one_pixel_wide_and_tall_objects_are_found():
    # Kills: "iw > 0" -> "iw > 1" and "ih > 0" -> "ih > 1" (a 1-pixel intersection is a valid overlap).
    records = [rec("a", [[5, 5, 5, 20]]), rec("b", [[5, 5, 20, 5]])]
    dets = {"a": det([[5, 5, 5, 20]], [0.9]), "b": det([[5, 5, 20, 5]], [0.8])}
    assert evaluate_voc(records, dets, ["x"], "voc10")["mAP"] == 1.0


def test_difficult_first_and_zero_union_pairs_warn_nothing():
    # Kills: the errstate guards dropped (0/0 precision before the first counted detection; a far pair
    # of 1-pixel boxes whose devkit "union" is 0).
    records = [rec("a", [[1, 1, 10, 10], [30, 30, 40, 40]], difficult=[True, False]), rec("b", [[3, 4, 3, 4]])]
    dets = {"a": det([[1, 1, 10, 10], [30, 30, 40, 40]], [0.9, 0.5]), "b": det([[1, 1, 1, 1]], [0.3])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate_voc(records, dets, ["x"], "voc10", return_curves=True)
    assert np.isnan(out["curves"]["x"]["precision"][0])
    assert out["mAP"] == pytest.approx(0.5)                 # recall 0.5 at precision 1, then a false positive


def test_column_shaped_scores_and_labels_count_as_flat():
    # Kills: reshape(-1) of scores and labels in detections_by_class.
    records = [rec("a", [[1, 1, 10, 10], [21, 21, 40, 40]])]
    flat = det([[1, 1, 10, 10], [1, 1, 10, 10], [60, 60, 70, 70]], [0.7, 0.9, 0.8])
    column = dict(flat, scores=flat["scores"].reshape(-1, 1), labels=flat["labels"].reshape(-1, 1))
    expected = evaluate_voc(records, {"a": flat}, ["x"], "voc10")["mAP"]
    assert expected == pytest.approx(0.5)
    assert evaluate_voc(records, {"a": column}, ["x"], "voc10")["mAP"] == expected


def voc_eval_port_ap(gt: dict, dets: list, use_07: bool, thresh: float = 0.5) -> float:
    """py-faster-rcnn's voc_eval.py for one class, loop by loop: numpy's default (unstable) argsort,
    a match needs IoU > thresh, precision guarded by eps, 11 points from np.arange. Same inputs as devkit_ap."""
    npos = sum(1 for objs in gt.values() for o in objs if not o[4])
    order = np.argsort(-np.array([d[1] for d in dets], dtype=np.float64))
    detected = {k: [False] * len(v) for k, v in gt.items()}
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, d in enumerate(order):
        image_id, _, *bb = dets[d]
        objs = gt[image_id]
        ovmax, jmax = -np.inf, -1
        if objs:
            g = np.array([o[:4] for o in objs], dtype=np.float64)
            iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inter)
            ov = inter / union
            ovmax, jmax = ov.max(), int(ov.argmax())
        if ovmax > thresh:
            if not objs[jmax][4]:
                if not detected[image_id][jmax]:
                    tp[rank], detected[image_id][jmax] = 1.0, True
                else:
                    fp[rank] = 1.0
        else:
            fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec_, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        return sum((np.max(prec[rec_ >= t]) if np.any(rec_ >= t) else 0.0) / 11.0 for t in np.arange(0.0, 1.1, 0.1))
    mrec, mpre = np.concatenate(([0.0], rec_, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_python_port_matches_voc_eval_py_on_random_tied_cases(seed, metric):
    # Kills: the port's unstable sort replaced by the stable one (ties of more than 16 detections are
    # ordered differently), and its precision computed from tp - fp.
    rng = np.random.default_rng(100 + seed)
    records, dets, gt_ref, det_ref = _random_case(rng, num_images=40, num_classes=2)
    out = evaluate_voc(records, dets, ["a", "b"], metric, python_port=True)
    for c, name in enumerate(["a", "b"]):
        if not any(not o[4] for objs in gt_ref[c].values() for o in objs):
            assert np.isnan(out["per_class"][name])
            continue
        assert out["per_class"][name] == pytest.approx(voc_eval_port_ap(gt_ref[c], det_ref[c], metric == "voc07"), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_ground_truth_not_grouped_by_image_keeps_the_first_of_tied_boxes(seed):
    # Kills: the stable argsort that groups ground truth by image replaced by numpy's default one: with
    # ground truth interleaved across images, duplicate boxes (one difficult) must still resolve to the
    # first of them in file order, as the devkit's scan does.
    rng = np.random.default_rng(seed)
    num_images, shapes = 4, np.array([[1, 1, 20, 20], [10, 10, 40, 30], [5, 30, 25, 60]], dtype=np.float64)
    image_index = rng.permutation(np.repeat(np.arange(num_images), 10))
    boxes = shapes[rng.integers(0, 3, len(image_index))]
    difficult = rng.random(len(image_index)) < 0.4
    gt = ClassGroundTruth(image_index, boxes, difficult)
    det_image = np.repeat(np.arange(num_images), 4)
    det_boxes = shapes[rng.integers(0, 3, len(det_image))]
    scores = rng.integers(0, 4, len(det_image)) / 4.0
    result = evaluate_class(ClassDetections(det_image, scores, det_boxes), gt, num_images, use_07_metric=False)
    gt_ref = {i: [(*b, d) for b, g, d in zip(boxes, image_index, difficult) if g == i] for i in range(num_images)}
    det_ref = [(i, float(s), *b) for i, s, b in zip(det_image, scores, det_boxes)]
    assert result["ap"] == pytest.approx(devkit_ap(gt_ref, det_ref, use_07=False), abs=1e-12)
