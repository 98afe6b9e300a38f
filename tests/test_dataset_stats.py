"""Class and object-size distributions of a split, on hand-made records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detect.analysis.dataset_stats import (COCO_EDGES, bin_names, class_distribution, object_sides,
                                           plot_distributions, resize_scale, size_histogram)
from detect.data.records import ImageRecord

NAMES = ["cat", "dog", "cow"]


def _records() -> list[ImageRecord]:
    wide = ImageRecord("wide", Path("wide.jpg"), 200, 100, boxes=[[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 100, 100]],
                       labels=[0, 0, 1], difficult=[False, True, False])
    tall = ImageRecord("tall", Path("tall.jpg"), 400, 800, boxes=[[0, 0, 20, 5]], labels=[1])
    unknown = ImageRecord("folder", Path("folder.jpg"), 0, 0, boxes=[[0, 0, 64, 64]], labels=[0])
    empty = ImageRecord("empty", Path("empty.jpg"), 50, 50)
    return [wide, tall, unknown, empty]


def test_objects_difficult_and_images_per_class():
    assert class_distribution(_records(), NAMES) == {"cat": {"objects": 3, "difficult": 1, "images": 2},
                                                     "dog": {"objects": 2, "difficult": 0, "images": 2},
                                                     "cow": {"objects": 0, "difficult": 0, "images": 0}}


def test_sides_in_image_pixels_and_at_the_input_scale():
    labels, sides = object_sides(_records())
    assert labels.tolist() == [0, 0, 1, 1, 0] and sides.tolist() == pytest.approx([10, 40, 100, 10, 64])
    # shorter side to 50 unless the longer exceeds 100: the wide image by 0.5, the tall one by 100 / 800
    assert resize_scale(100, 200, 50, 100) == 0.5 and resize_scale(800, 400, 50, 100) == 0.125
    labels, sides = object_sides(_records(), resize=(50, 100))
    assert labels.tolist() == [0, 0, 1, 1] and sides.tolist() == pytest.approx([5, 20, 50, 1.25])   # unknown size: out


def test_size_histograms_count_each_object_in_its_bin():
    labels, sides = object_sides(_records())
    hist = size_histogram(labels, sides, NAMES)
    assert hist["all"] == [0, 2, 0, 1, 2, 0, 0, 0]         # 10, 10 | 40 | 64 (a bin starts at its edge), 100
    assert hist["per_class"]["cat"] == [0, 1, 0, 1, 1, 0, 0, 0] and hist["per_class"]["cow"] == [0] * 8
    coco = size_histogram(labels, sides, NAMES, edges=COCO_EDGES)
    assert coco["all"] == [2, 2, 1] and coco["per_class"]["dog"] == [1, 0, 1]
    assert bin_names(COCO_EDGES) == ["0-32", "32-96", "96+"]


def test_plot_bars_are_the_class_counts(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    labels, sides = object_sides(_records())
    path = plot_distributions(class_distribution(_records(), NAMES), {"image pixels": sides}, tmp_path / "d.png")
    (fig,) = figures
    try:
        bars = fig.axes[0].patches
        assert [b.get_height() for b in bars] == [3, 2, 0]
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == NAMES
        counts = fig.axes[1].patches[0]          # the step histogram of the one scale
        assert counts.get_label() == "image pixels"
    finally:
        close(fig)
    assert path.is_file() and np.asarray(plt.imread(path)).shape[1] > 500
