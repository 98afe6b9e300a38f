"""COCO evaluation: records_to_coco's exact output, and AP/AR and per-class AP against pycocotools run directly.

The reference side builds its ground-truth dict and results list from the literal boxes below, not
through records_to_coco or detections_to_coco, and gets each class's AP from a COCOeval restricted
to that category (found by mutation testing: nothing checked the per-class values before).
"""

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detect.data.records import ImageRecord
from detect.evaluation import evaluate
from detect.evaluation.coco import STAT_NAMES, evaluate_coco, records_to_coco

NAMES = ["cat", "dog", "bird"]          # no bird in the ground truth: its AP is NaN


def _case():
    """Three images: 12 cats of every size in one (so 14 detections there, more than maxDets=10), two
    dogs (one difficult) and a large cat in another, nothing in the third but a bird and a dog detection."""
    rng = np.random.default_rng(0)
    sides = np.array([8, 12, 20, 28, 36, 45, 60, 75, 90, 110, 130, 150], np.float64)
    xy = rng.uniform(0, 40, (12, 2))
    cats = np.concatenate([xy, xy + sides[:, None] * [1.0, 0.8]], 1)
    gt = [(cats, np.zeros(12, int), np.zeros(12, bool)),
          (np.array([[10, 10, 60, 50], [70, 20, 110, 90], [0, 100, 150, 190]], np.float64), np.array([1, 1, 0]),
           np.array([False, True, False])),
          (np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, bool))]
    records = [ImageRecord(f"im{i}", Path(f"im{i}.jpg"), 200, 200, b.astype(np.float32), l, d)
               for i, (b, l, d) in enumerate(gt)]
    jitter = rng.normal(0, 2.0, (12, 4))
    dets = {"im0": {"boxes": np.concatenate([cats + jitter, [[150, 150, 190, 190], [5, 5, 15, 15]]]),
                    "scores": rng.random(14), "labels": np.zeros(14, int)},
            "im1": {"boxes": np.array([[12, 9, 61, 52], [70, 20, 110, 90], [2, 98, 149, 185], [100, 100, 140, 140]],
                                      np.float64),
                    "scores": np.array([0.9, 0.8, 0.7, 0.6]), "labels": np.array([1, 1, 0, 0])},
            "im2": {"boxes": np.array([[10, 10, 50, 50], [60, 60, 90, 90]], float), "scores": np.array([0.5, 0.4]),
                    "labels": np.array([2, 1])}}
    # The reference inputs, written out directly: COCO ids 1.., category = label + 1, difficult = crowd.
    gt_dict = {"images": [{"id": i + 1, "width": 200, "height": 200, "file_name": f"im{i}.jpg"} for i in range(3)],
               "categories": [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)], "annotations": []}
    for i, (b, l, d) in enumerate(gt):
        for box, label, diff in zip(b.astype(np.float32).astype(np.float64), l, d):
            w, h = box[2] - box[0], box[3] - box[1]
            gt_dict["annotations"].append({"id": len(gt_dict["annotations"]) + 1, "image_id": i + 1,
                                           "category_id": int(label) + 1, "bbox": [box[0], box[1], w, h],
                                           "area": w * h, "iscrowd": int(diff)})
    results = [{"image_id": i + 1, "category_id": int(label) + 1, "score": float(s),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
               for i, d in enumerate(dets.values())
               for (x1, y1, x2, y2), s, label in zip(d["boxes"], d["scores"], d["labels"])]
    return records, dets, gt_dict, results


def _pycocotools(gt_dict, results, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_stats_and_per_class_ap_equal_pycocotools():
    # Kills: per-class AP read at the wrong area range or maxDets, -1 entries counted, classes without
    # ground truth not NaN (or NaN with a "mean of empty slice" warning), the metric name mutated.
    records, dets, gt_dict, results = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = evaluate(records, dets, NAMES, "coco")
    expected = _pycocotools(gt_dict, results)
    assert out["metric"] == "coco"
    assert [out["stats"][k] for k in STAT_NAMES] == pytest.approx(list(expected), abs=1e-12)
    assert out["mAP"] == pytest.approx(expected[0], abs=1e-12)
    for c, name in enumerate(NAMES[:2]):
        assert out["per_class"][name] == pytest.approx(_pycocotools(gt_dict, results, [c + 1])[0], abs=1e-12)
    assert 0.2 < out["per_class"]["cat"] < 0.9 and out["per_class"]["dog"] > 0.5   # neither trivial
    assert np.isnan(out["per_class"]["bird"])


def test_gt_as_coco_object_and_default_class_names():
    # Kills: a COCO object not used as given; category ids and class names not taken from the ground
    # truth when not passed.
    records, _, gt_dict, results = _case()
    by_dict = evaluate_coco(gt_dict, results, class_names=NAMES, category_ids=[1, 2, 3])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
    by_object = evaluate_coco(coco_gt, results)
    assert list(by_object["per_class"]) == NAMES
    assert [by_object["per_class"][n] for n in NAMES[:2]] == [by_dict["per_class"][n] for n in NAMES[:2]]
    assert by_object["stats"] == by_dict["stats"]


def test_pycocotools_output_only_when_verbose(capsys):
    # Kills: verbose on by default, the captured summary lost or printed with a different end.
    _, _, gt_dict, results = _case()
    quiet = evaluate_coco(gt_dict, results)
    assert capsys.readouterr().out == ""
    evaluate_coco(gt_dict, results, verbose=True)
    printed = capsys.readouterr().out
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = " in printed
    assert printed.endswith(f"] = {quiet['stats']['ARl']:0.3f}\n") and not printed.endswith("\n\n")


def test_records_to_coco_output():
    # Kills: image/annotation ids not 1.. in order, file_name, width/height/voc_id/ignore/supercategory
    # keys, float32 box arithmetic, area as w / h, difficult not crowd.
    box = np.array([[10.3, 20.7, 50.1, 60.9], [0, 0, 30, 40]], np.float32)
    records = [ImageRecord("a", Path("imgs/a.jpg"), 100, 80, box, np.array([1, 0]), np.array([False, True])),
               ImageRecord("b", "dir/b.jpg", 50, 40, np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, bool))]
    dataset, image_ids, category_ids = records_to_coco(records, ["cat", "dog"])
    x1, y1, x2, y2 = (float(v) for v in box[0])
    w, h = x2 - x1, y2 - y1
    assert w != float(box[0, 2] - box[0, 0])        # float64 differs from float32 arithmetic here
    assert dataset == {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80, "voc_id": "a"},
                   {"id": 2, "file_name": "dir/b.jpg", "width": 50, "height": 40, "voc_id": "b"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [x1, y1, w, h], "area": w * h,
                         "iscrowd": 0, "ignore": 0},
                        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 30.0, 40.0], "area": 1200.0,
                         "iscrowd": 1, "ignore": 1}],
        "categories": [{"id": 1, "name": "cat", "supercategory": "none"},
                       {"id": 2, "name": "dog", "supercategory": "none"}]}
    assert image_ids == {"a": 1, "b": 2} and category_ids == [1, 2]
