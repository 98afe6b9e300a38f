"""Drawing detections: outlines in the class colour, labels, thresholds, nothing drawn for nothing."""

from __future__ import annotations

import numpy as np

from detect.visualize import class_color, draw_detections

NAMES = ["cat", "dog"]


def test_box_outline_has_the_class_colour_and_inside_stays_untouched():
    image = np.full((100, 120, 3), 40, np.uint8)
    out = draw_detections(image, np.array([[20.0, 50.0, 80.0, 90.0]]), np.array([0.9]), np.array([1]), NAMES)
    color = class_color(1)
    assert tuple(out[70, 20]) == color and tuple(out[70, 79]) == color     # left and right edges
    assert tuple(out[89, 50]) == color                                     # bottom edge
    assert tuple(out[70, 50]) == (40, 40, 40)                              # inside the box
    label_area = out[35:50, 20:60]                                         # label sits above the box
    assert (label_area == np.array(color)).all(axis=-1).sum() > 50
    assert (label_area.max(axis=-1) < 30).sum() > 5                        # dark text on it
    assert (image == 40).all()                                             # the input is not modified


def test_threshold_and_empty_detections_draw_nothing():
    image = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    low = draw_detections(image, np.array([[5.0, 5.0, 30.0, 30.0]]), np.array([0.2]), np.array([0]), NAMES,
                          score_thresh=0.5)
    assert np.array_equal(low, image)
    none = draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), NAMES)
    assert np.array_equal(none, image) and none.shape == image.shape


def test_classes_get_distinct_colours():
    colors = {class_color(i) for i in range(20)}
    assert len(colors) == 20
