"""PR curves and AP tables: the devkit's numbers, and which objects each subset counts."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.analysis.curves import SIZE_RANGES, ap_from_tp_fp, breakdown, plot_pr_curves, rank_classes, subset_ap
from detect.data.records import ImageRecord
from tests.devkit_reference import devkit_ap

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


def devkit_aps(records, dets, num_classes: int, use_07: bool) -> list[float]:
    """AP per class from the loop-by-loop devkit transcription, boxes converted to VOC pixels here."""
    aps = []
    for c in range(num_classes):
        gt = {r.image_id: [(float(b[0]) + 1, float(b[1]) + 1, float(b[2]), float(b[3]), bool(d))
                           for b, l, d in zip(r.boxes, r.labels, r.difficult) if l == c] for r in records}
        dl = [(r.image_id, float(s), float(b[0]) + 1, float(b[1]) + 1, float(b[2]), float(b[3]))
              for r in records for b, s, l in zip(dets[r.image_id]["boxes"], dets[r.image_id]["scores"],
                                                  dets[r.image_id]["labels"]) if l == c]
        aps.append(devkit_ap(gt, dl, use_07))
    return aps


@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_ranked_classes_and_tp_fp_ap_match_the_devkit(metric):
    """Catches any change to the devkit's rules in the shared evaluator (e.g. the IoU threshold set to 0.3)."""
    records, dets = _random_case(5)       # a seed where both classes have AP well inside (0, 1)
    reference = devkit_aps(records, dets, len(NAMES), metric == "voc07")
    assert all(0.2 < ap < 0.4 for ap in reference)
    ranked = rank_classes(records, dets, NAMES, metric=metric)
    for rc, expected in zip(ranked, reference):
        assert rc.ap == pytest.approx(expected, abs=1e-12)
        assert ap_from_tp_fp(rc.tp, rc.fp, rc.npos, metric) == pytest.approx(rc.ap)
        assert np.all(np.diff(rc.scores) <= 0) and len(rc.boxes) == len(rc.scores)
    rows = breakdown(records, dets, NAMES, metric=metric)
    assert rows["all"]["mAP"] == pytest.approx(float(np.mean(reference)), abs=1e-12)
    assert [rows["all"]["per_class"][n] for n in NAMES] == pytest.approx(reference, abs=1e-12)
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


def test_pr_curve_plot(tmp_path, monkeypatch):
    """Catches a plot of the wrong data: another class's curve, recall and precision swapped, a wrong AP label."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)      # keep the figure to read its lines back
    records, dets = _random_case(1)
    ranked = rank_classes(records, dets, NAMES + ["never_seen"])
    path = plot_pr_curves(ranked, tmp_path / "pr.png", title="test")
    (fig,) = figures
    try:
        axes = [ax for ax in fig.axes if ax.axison]
        assert [ax.get_title() for ax in axes] == [f"{rc.name} ({rc.npos} objects)" for rc in ranked]
        expected_ap = devkit_aps(records, dets, len(NAMES), use_07=True) + [None]
        npos = [sum(int(np.sum((r.labels == c) & ~r.difficult)) for r in records) for c in range(3)]
        assert [rc.npos for rc in ranked] == npos and min(npos[:2]) > 3
        for ax, rc, ap in zip(axes, ranked, expected_ap):
            (line,) = ax.get_lines()
            assert line.get_label() == ("AP n/a" if ap is None else f"AP {ap:.3f}")
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label()]
            if ap is None:
                assert len(line.get_xdata()) == 0
                continue
            # the curve of the ranked detections: recall tp/npos, precision tp/(tp+fp), cumulated, where defined
            tp, fp = np.cumsum(rc.tp), np.cumsum(rc.fp)
            keep = tp + fp > 0
            assert len(line.get_xdata()) == keep.sum() > 3
            assert np.array_equal(line.get_xdata(), tp[keep] / rc.npos)
            assert np.allclose(line.get_ydata(), tp[keep] / (tp + fp)[keep], rtol=0, atol=1e-12)
    finally:
        close(fig)
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 500 and height > 150
    assert (pixels != 255).any()       # something was drawn
