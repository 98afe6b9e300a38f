"""Error analysis (Hoiem et al.): hand-made detections land in exactly the expected category."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.analysis.error_analysis import (ERROR_TYPES, VOC_SIMILAR_GROUPS, cumulative_shares,
                                            default_similar_groups, diagnose, parse_similar_groups,
                                            plot_error_shares, similar_matrix)
from detect.config import VOC_CLASSES
from detect.data.records import ImageRecord
from detect.errors import ConfigError
from detect.evaluation import evaluate_voc

NAMES = ["cat", "dog", "car"]
GROUPS = {"animals": ["cat", "dog"]}


def _records() -> list[ImageRecord]:
    a = ImageRecord("a", Path("a.jpg"), 300, 300,
                    boxes=[[10, 10, 60, 60], [100, 10, 150, 60], [160, 10, 210, 60], [100, 100, 150, 150]],
                    labels=[0, 1, 2, 0], difficult=[False, False, False, True])
    empty = ImageRecord("b", Path("b.jpg"), 300, 300)
    return [a, empty]


# (box, score, expected type) of "cat" detections in image a:
# cat (10,10,60,60), dog (100,10,150,60), car (160,10,210,60), difficult cat (100,100,150,150).
CAT_DETECTIONS = [
    ([200, 200, 240, 240], 0.95, "background"),     # touches nothing
    ([10, 10, 60, 60], 0.90, "correct"),
    ([11, 10, 60, 60], 0.85, "localization"),       # duplicate: IoU 0.98 with the cat already found
    ([10, 10, 30, 60], 0.80, "localization"),       # IoU 0.4 with the cat
    ([10, 10, 60, 15], 0.75, "localization"),       # IoU exactly 0.1 with the cat
    ([100, 10, 150, 60], 0.70, "similar"),          # on the dog (same group)
    ([160, 10, 210, 60], 0.65, "other"),            # on the car
    ([10, 30, 60, 130], 0.60, "localization"),      # IoU 1500 / 6000 = 0.25 with the cat
    ([120, 10, 190, 60], 0.55, "similar"),          # IoU 1/3 with both dog and car: similar is tested first
    ([0, 0, 12, 12], 0.50, "background"),           # IoU 4 / 2640 with the cat
    ([100, 100, 150, 150], 0.45, None),             # the difficult cat: ignored, as by the devkit
]


def _detections(entries, label: int = 0, image: str = "a") -> dict:
    boxes = np.array([e[0] for e in entries], dtype=np.float32).reshape(-1, 4)
    return {image: {"boxes": boxes, "scores": np.array([e[1] for e in entries], dtype=np.float32),
                    "labels": np.full(len(entries), label, dtype=np.int64)}}


def test_each_detection_gets_exactly_its_category():
    entries = CAT_DETECTIONS
    dets = _detections(entries)
    dets["b"] = {"boxes": np.array([[5, 5, 50, 50]], np.float32), "scores": np.array([0.99], np.float32),
                 "labels": np.array([0])}                         # an image without objects: background
    diag = diagnose(_records(), dets, NAMES, groups=GROUPS, metric="voc10")
    cat = diag.classes[0]
    expected = ["background"] + [e[2] for e in entries if e[2] is not None]
    assert [ERROR_TYPES[k] for k in cat.kinds] == expected
    assert cat.npos == 1 and len(cat.scores) == len(entries)     # 12 detections, one ignored
    assert cat.matched[cat.kinds == 0].tolist() == [0]           # the correct one matched object 0 of image a
    assert cat.image_index[0] == 1                               # ranked first: the 0.99 one of image b


def test_similar_and_other_follow_the_groups():
    entries = [([100, 10, 150, 60], 0.7, "other")]
    diag = diagnose(_records(), _detections(entries), NAMES, groups={}, metric="voc10")   # no groups: dog is "other"
    assert [ERROR_TYPES[k] for k in diag.classes[0].kinds] == ["other"]
    diag = diagnose(_records(), _detections(entries, label=2), NAMES, groups=GROUPS, metric="voc10")
    assert [ERROR_TYPES[k] for k in diag.classes[2].kinds] == ["other"]   # a car detection on the dog


def test_ap_cost_of_each_error_type():
    # ranked: background 0.95, correct 0.9, localization 0.85 -> AP (voc10) 0.5; without background 1.0.
    entries = CAT_DETECTIONS[:3]
    diag = diagnose(_records(), _detections(entries), NAMES, groups=GROUPS, metric="voc10")
    cat = diag.classes[0]
    reference = evaluate_voc(_records(), _detections(entries), NAMES, "voc10")["per_class"]["cat"]
    assert cat.ap == pytest.approx(0.5) and reference == pytest.approx(0.5)
    assert cat.ap_without["background"] == pytest.approx(1.0)
    assert cat.ap_without["localization"] == pytest.approx(0.5)
    assert cat.ap_without["similar"] == pytest.approx(0.5)
    assert cat.ap_without["all false positives"] == pytest.approx(1.0)
    impact = diag.impact()     # dog and car have objects but no detections: AP 0 each
    assert impact["none removed"]["mAP"] == pytest.approx(0.5 / 3)
    assert impact["background"]["gain"] == pytest.approx(0.5 / 3)
    assert impact["localization"]["gain"] == pytest.approx(0.0)


def test_shares_of_top_ranked_detections():
    diag = diagnose(_records(), _detections(CAT_DETECTIONS), NAMES, groups=GROUPS, metric="voc07")
    cat = diag.classes[0]
    assert cat.shares(1) == {"correct": 0.0, "localization": 0.0, "similar": 0.0, "other": 0.0, "background": 1.0}
    assert cat.shares(2)["correct"] == 0.5
    shares = cumulative_shares(cat.kinds)
    assert shares.shape == (10, 5) and np.allclose(shares.sum(axis=1), 1.0)
    assert shares[-1].tolist() == pytest.approx([0.1, 0.4, 0.2, 0.1, 0.2])
    scores, kinds = diag.pooled()
    assert len(kinds) == 10 and np.all(np.diff(scores) <= 0)
    summary = diag.to_json()
    assert summary["per_class"]["cat"]["counts"] == {"correct": 1, "localization": 4, "similar": 2, "other": 1,
                                                     "background": 2}


def _kept_figures(monkeypatch) -> list:
    """Make ``plt.close`` keep the figures it is given, so that a test can read back what was drawn."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def _layer_spans(ax, x: int) -> list[set[float]]:
    """The y values of each stacked layer's outline at ``x`` (a layer's outline holds its bottom and its top)."""
    return [{round(float(y), 9) for vx, y in c.get_paths()[0].vertices if vx == x} for c in ax.collections]


def test_no_detections_and_the_plot(tmp_path, monkeypatch):
    """Catches a plot stacking the wrong shares, a wrong class or object count in a panel, a misplaced npos line."""
    import matplotlib.pyplot as plt

    figures = _kept_figures(monkeypatch)
    diag = diagnose(_records(), {}, NAMES, groups=GROUPS)
    assert all(len(d.kinds) == 0 for d in diag.classes)
    assert diag.impact()["background"]["gain"] == 0.0
    path = plot_error_shares(diag, tmp_path / "empty.png")
    assert Image.open(path).size[0] > 100
    assert [[t.get_text() for t in ax.texts] for ax in figures[0].axes] == [["no detections"]] * 4
    diag = diagnose(_records(), _detections(CAT_DETECTIONS), NAMES, groups=GROUPS)
    path = plot_error_shares(diag, tmp_path / "shares.png")
    width, height = Image.open(path).size
    assert width > 400 and height > 100
    fig = figures[1]
    overall, cat, dog, car = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["overall (3 objects)", "cat (1 objects)", "dog (1 objects)",
                                                   "car (1 objects)"]
    assert [t.get_text() for t in dog.texts + car.texts] == ["no detections"] * 2
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(ERROR_TYPES)
    # the planted ranking, ignored detection left out: share of each type among the top n, stacked in ERROR_TYPES order
    ranked = [e[2] for e in CAT_DETECTIONS if e[2] is not None]
    for ax, npos in ((overall, 3), (cat, 1)):
        assert [c.get_label() for c in ax.collections] == list(ERROR_TYPES)
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [npos, npos]          # the dashed line at as many detections as objects
        for n in range(1, len(ranked) + 1):
            top = [sum(ranked[:n].count(t) for t in ERROR_TYPES[: k + 1]) / n for k in range(len(ERROR_TYPES))]
            for spans, low, high in zip(_layer_spans(ax, n), [0.0] + top[:-1], top):
                assert {round(low, 9), round(high, 9)} <= spans, (ax.get_title(), n)
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_groups_default_inline_file_and_errors(tmp_path):
    voc = default_similar_groups(VOC_CLASSES)
    assert set(voc) == set(VOC_SIMILAR_GROUPS) and "person" in voc["animals"]
    assert default_similar_groups(["circle", "square"]) == {}
    assert default_similar_groups(["cat", "dog", "car"]) == {"animals": ["cat", "dog"]}   # VOC subset
    assert parse_similar_groups("animals=cat,dog", NAMES) == GROUPS
    assert parse_similar_groups("cat,dog;car", NAMES) == {"group1": ["cat", "dog"], "group2": ["car"]}
    assert parse_similar_groups("none", NAMES) == {}
    (tmp_path / "groups.yaml").write_text("pets: [cat, dog]\n")
    assert parse_similar_groups(str(tmp_path / "groups.yaml"), NAMES) == {"pets": ["cat", "dog"]}
    with pytest.raises(ConfigError, match="unknown classes \\['cow'\\]"):
        parse_similar_groups("animals=cat,cow", NAMES)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json"):
        parse_similar_groups(str(tmp_path / "bad.json"), NAMES)
    matrix = similar_matrix(NAMES, GROUPS)
    assert matrix.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
