"""PR curves and AP tables: the devkit's numbers, and which objects each subset counts."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.analysis.curves import SIZE_RANGES, ap_from_tp_fp, breakdown, plot_pr_curves, rank_classes, subset_ap
from detect.data.records import ImageRecord
from detect.evaluation import evaluate_voc

NAMES = ["a", "b"]


def _random_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    records, dets = [], {}
    for i in range(12):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 150, (n, 2))
        wh = rng.uniform(8, 120, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        records.append(ImageRecord(f"i{i}", Path(f"i{i}.jpg"), 300, 300, boxes, rng.integers(0, 2, n),
                                   rng.random(n) < 0.2, rng.random(n) < 0.3))
        m = int(rng.integers(0, 6))
        # detections: jittered ground truth (some hits, some misses) or random boxes in an image without objects
        base = boxes[rng.integers(0, n, m)] if n else rng.uniform(0, 200, (m, 4))
        x1y1 = base[:, :2] + rng.normal(0, 6, (m, 2))
        size = np.abs(base[:, 2:] - base[:, :2]) + rng.normal(0, 6, (m, 2))
        box = np.concatenate([x1y1, x1y1 + np.maximum(size, 5)], 1)
        dets[f"i{i}"] = {"boxes": box.astype(np.float32), "scores": rng.random(m).astype(np.float32),
                         "labels": rng.integers(0, 2, m)}
    return records, dets


@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_ranked_classes_and_tp_fp_ap_match_the_devkit(metric):
    records, dets = _random_case()
    reference = evaluate_voc(records, dets, NAMES, metric)
    ranked = rank_classes(records, dets, NAMES, metric=metric)
    for rc in ranked:
        assert rc.ap == pytest.approx(reference["per_class"][rc.name])
        assert ap_from_tp_fp(rc.tp, rc.fp, rc.npos, metric) == pytest.approx(rc.ap)
        assert np.all(np.diff(rc.scores) <= 0) and len(rc.boxes) == len(rc.scores)
    rows = breakdown(records, dets, NAMES, metric=metric)
    assert rows["all"]["mAP"] == pytest.approx(reference["mAP"])
    total = sum(rows["all"]["npos"].values())
    assert sum(sum(rows[s]["npos"].values()) for s in SIZE_RANGES) == total
    assert sum(rows["truncated"]["npos"].values()) + sum(rows["not truncated"]["npos"].values()) == total
    assert (sum(rows["difficult counted"]["npos"].values())
            == total + sum(rows["difficult only"]["npos"].values()))


def _sized_case():
    # class a: a small object (20x20, truncated), a large one (120x120) and a difficult one.
    record = ImageRecord("x", Path("x.jpg"), 400, 400,
                         boxes=[[10, 10, 30, 30], [200, 200, 320, 320], [100, 10, 150, 60]], labels=[0, 0, 0],
                         difficult=[False, False, True], truncated=[True, False, False])
    dets = {"x": {"boxes": np.array([[0, 200, 150, 350], [10, 10, 30, 30], [100, 10, 150, 60]], np.float32),
                  "scores": np.array([0.95, 0.9, 0.8], np.float32), "labels": np.array([0, 0, 0])}}
    return [record], dets


def test_ap_by_size_and_flag_counts_the_right_objects():
    records, dets = _sized_case()
    rows = breakdown(records, dets, ["a"], metric="voc10")
    # all: a large false positive first, then the small object found: precision 1/2 at recall 1/2.
    assert rows["all"]["per_class"]["a"] == pytest.approx(0.25)
    # small: only the small object counts; the large unmatched detection is of another size: ignored.
    assert rows["small"]["per_class"]["a"] == pytest.approx(1.0) and rows["small"]["npos"]["a"] == 1
    # large: the large object is never found; the small detection matches an ignored object.
    assert rows["large"]["per_class"]["a"] == pytest.approx(0.0)
    assert np.isnan(rows["medium"]["per_class"]["a"]) and rows["medium"]["npos"]["a"] == 0
    assert rows["truncated"]["per_class"]["a"] == pytest.approx(0.5)      # FP first, then the truncated one
    assert rows["not truncated"]["per_class"]["a"] == pytest.approx(0.0)
    # difficult counted: three objects, found 2nd and 3rd -> precision 1/2, 2/3 at recall 1/3, 2/3; the
    # VOC2010 envelope takes 2/3 for both steps.
    assert rows["difficult counted"]["per_class"]["a"] == pytest.approx(2 * (1 / 3) * (2 / 3))
    # difficult only: the small detection matches an ignored object; precision 1/2 when the difficult one is found.
    assert rows["difficult only"]["per_class"]["a"] == pytest.approx(0.5)


def test_subset_ap_area_range_only_ignores_false_positives():
    records, dets = _sized_case()
    counts = np.array([True, False, False])
    with_range = subset_ap(records, dets, ["a"], counts=counts, area_range=SIZE_RANGES["small"], metric="voc10")
    without = subset_ap(records, dets, ["a"], counts=counts, metric="voc10")
    assert with_range["mAP"] == pytest.approx(1.0) and without["mAP"] == pytest.approx(0.5)


def test_pr_curve_plot(tmp_path):
    records, dets = _random_case(1)
    ranked = rank_classes(records, dets, NAMES + ["never_seen"])
    path = plot_pr_curves(ranked, tmp_path / "pr.png", title="test")
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 500 and height > 150
    assert (pixels != 255).any()       # something was drawn
