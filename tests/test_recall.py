"""Recall, MABO and AR on a tiny hand-made set whose numbers can be worked out by hand."""

import numpy as np
import pytest

from detect.data.records import ImageRecord
from proposals.recall import AR_THRESHOLDS, best_overlaps, evaluate_recall, format_report, plot_recall


def test_best_overlaps_by_count():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    proposals = np.array([[0, 0, 10, 5],        # IoU 0.5 with gt 0
                          [20, 20, 30, 28],     # IoU 0.8 with gt 1
                          [0, 0, 10, 9]],       # IoU 0.9 with gt 0
                         np.float32)
    overlaps = best_overlaps(gt, proposals, [1, 2, 3, 10])
    np.testing.assert_allclose(overlaps, [[0.5, 0.5, 0.9, 0.9], [0.0, 0.8, 0.8, 0.8]], atol=1e-6)
    assert best_overlaps(gt, np.zeros((0, 4)), [1, 5]).tolist() == [[0, 0], [0, 0]]
    assert best_overlaps(np.zeros((0, 4)), proposals, [1]).shape == (0, 1)


@pytest.fixture
def tiny_set():
    """Two images, classes a/b; every best overlap is known (a difficult object is left out)."""
    records = [
        ImageRecord("one", "one.jpg", 100, 100, boxes=[[0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]],
                    labels=[0, 1, 1], difficult=[False, False, True]),
        ImageRecord("two", "two.jpg", 100, 100, boxes=[[0, 0, 20, 20]], labels=[0]),
    ]
    proposals = {
        "one": np.array([[0, 0, 10, 6],          # a: 0.6
                         [50, 50, 60, 59],       # b: 0.9
                         [0, 0, 10, 8],          # a: 0.8 (third)
                         [80, 80, 90, 90]], np.float32),   # the difficult box: must not count
        "two": np.array([[0, 0, 20, 10]], np.float32),     # a: 0.5
    }
    return records, proposals


def test_recall_mabo_and_ar(tiny_set):
    records, proposals = tiny_set
    report = evaluate_recall(records, proposals, ["a", "b"], top_k=None)
    # best overlaps: a -> 0.8 and 0.5, b -> 0.9
    assert report["num_objects"] == 3 and report["num_images"] == 2
    assert report["recall@0.5"] == pytest.approx(1.0)
    assert report["recall@0.7"] == pytest.approx(2 / 3)
    assert report["per_class"]["a"]["abo"] == pytest.approx(0.65)
    assert report["per_class"]["b"]["abo"] == pytest.approx(0.9)
    assert report["mabo"] == pytest.approx((0.65 + 0.9) / 2)
    assert report["abo"] == pytest.approx((0.8 + 0.5 + 0.9) / 3)
    expected_ar = np.mean([np.mean([o >= t for o in (0.8, 0.5, 0.9)]) for t in AR_THRESHOLDS])
    assert report["average_recall"] == pytest.approx(expected_ar)
    assert report["proposals_per_image"] == pytest.approx(2.5)


def test_top_k_uses_the_first_proposals(tiny_set):
    records, proposals = tiny_set
    report = evaluate_recall(records, proposals, ["a", "b"], top_k=2)
    # the 0.8 box of image one is third: a -> 0.6 and 0.5
    assert report["per_class"]["a"]["abo"] == pytest.approx(0.55)
    assert report["recall@0.7"] == pytest.approx(1 / 3)
    curve = report["recall_vs_count"]
    assert curve["count"][:2] == [1, 2] and curve["count"][-1] == 4
    assert curve["recall@0.5"][0] == pytest.approx(2 / 3)      # first boxes only: a 0.6, b 0, a 0.5
    assert curve["recall@0.7"][-1] == pytest.approx(2 / 3)
    assert all(np.diff(curve["recall@0.5"]) >= 0)


def test_missing_images_count_as_no_proposals(tiny_set):
    records, proposals = tiny_set
    report = evaluate_recall(records, {"one": proposals["one"]}, ["a", "b"])
    assert report["missing_images"] == 1
    assert report["per_class"]["a"]["abo"] == pytest.approx(0.4)   # 0.8 and 0
    assert "without proposals" in format_report(report)


def test_recall_vs_iou_curve_and_plot(tiny_set, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    records, proposals = tiny_set
    report = evaluate_recall(records, proposals, ["a", "b"])
    curve = dict(zip(report["recall_vs_iou"]["iou"], report["recall_vs_iou"]["recall"]))
    assert curve[0.5] == pytest.approx(1.0) and curve[0.85] == pytest.approx(1 / 3) and curve[0.95] == 0.0
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    path = plot_recall({"tiny": report}, tmp_path / "recall.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # the plotted lines are the report's curves (catches a plot of other data under the right labels)
    left, right = figures[0].axes
    np.testing.assert_allclose(left.lines[0].get_xydata(),
                               np.column_stack([report["recall_vs_iou"]["iou"], report["recall_vs_iou"]["recall"]]))
    by_count = report["recall_vs_count"]
    for line, key in zip(right.lines, ("recall@0.7", "recall@0.5")):
        assert line.get_label() == f"tiny IoU {key[-3:]}"
        np.testing.assert_allclose(line.get_xydata(), np.column_stack([by_count["count"], by_count[key]]))
