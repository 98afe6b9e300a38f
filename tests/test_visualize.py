"""Drawing detections: outlines in the class colour, labels, thresholds, nothing drawn for nothing."""

from __future__ import annotations

import numpy as np
import pytest

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
    assert (label_area.min(axis=-1) > 225).sum() > 5                       # white text on this dark blue tag
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


# ---------------------------------------------------------------- label placement, contrast, legend
from detect.visualize import (BLACK, WHITE, LabelPlacer, Tag, contrast_ratio, legend_entries,  # noqa: E402
                              relative_luminance, render_detections, text_color_for)

CROWD_NAMES = ["platelets", "rbc", "wbc", "a_rather_long_class_name", "fish", "shark", "ray"]


def _crowd(seed: int, height: int, width: int, n: int):
    """Random boxes (some reaching past the frame) plus a box at each edge and corner and one covering it all."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-20, [width, height], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 0.4 * width, (n, 2))], 1)
    w, h = width, height
    edges = [[0, 0, 40, 30], [w - 40, 0, w, 30], [0, h - 30, 40, h], [w - 40, h - 30, w, h],   # corners
             [w / 2 - 20, 0, w / 2 + 20, 25], [w / 2 - 20, h - 25, w / 2 + 20, h],            # top, bottom
             [0, h / 2 - 15, 30, h / 2 + 15], [w - 12, h / 2 - 15, w, h / 2 + 15],           # left, right
             [0, 0, w, h], [w - 3, h - 3, w + 50, h + 40]]                                     # everything; past it
    boxes = np.concatenate([boxes, np.array(edges, np.float64)])
    return boxes, rng.random(len(boxes)), rng.integers(0, len(CROWD_NAMES), len(boxes))


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("mode", ["auto", "score", "class"])
@pytest.mark.parametrize("size", [(300, 400), (120, 90), (40, 64)])
def test_every_label_lies_inside_the_frame_in_crowded_scenes(mode, size):
    """Catches a tag left unclamped (cut at the right, bottom or top edge) or one missing in a forced mode."""
    height, width = size
    boxes, scores, labels = _crowd(1, height, width, 40)
    image = np.full((height, width, 3), 60, np.uint8)
    drawing = render_detections(image, boxes, scores, labels, CROWD_NAMES, label_mode=mode)
    for placed in drawing.labels:
        x1, y1, x2, y2 = placed.rect
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, placed
    if mode == "auto":     # no free place: left out, never drawn over another tag
        assert len(drawing.labels) + len(drawing.skipped) == len(boxes)
        for i, a in enumerate(drawing.labels):
            assert not any(_overlap(a.rect, b.rect) for b in drawing.labels[i + 1:]), a
    else:                  # every box keeps its tag, inside the frame even where tags must overlap
        assert sorted(p.index for p in drawing.labels) == list(range(len(boxes))) and drawing.skipped == []
    names = {p.index: p.text for p in drawing.labels}
    for i, text in names.items():        # the text names the detection's class (shortened only when too wide)
        full = CROWD_NAMES[labels[i]]
        assert text.startswith(full) or (text.endswith("…") and full.startswith(text[:-1]))
        assert (f"{scores[i]:.2f}" not in text) if mode == "class" else True


def test_tags_take_free_places_when_there_is_room():
    """Catches tags placed without looking at the others (they pile up) and labels skipped although room exists."""
    width, height = 400, 300
    grid = [[x, y, x + 60, y + 40] for x in range(20, 380, 90) for y in range(30, 280, 90)]
    # three side by side with the same top: the first places (above-left) collide; an edge box; a corner box
    row = [[30, 250, 60, 280], [36, 250, 66, 280], [42, 250, 72, 280], [360, 0, 400, 20], [0, 280, 30, 300]]
    boxes = np.array(grid + row, np.float64)
    scores = np.linspace(0.99, 0.5, len(boxes))
    labels = np.arange(len(boxes)) % 3
    drawing = render_detections(np.zeros((height, width, 3), np.uint8), boxes, scores, labels, ["cat", "dog", "cow"])
    assert drawing.skipped == [] and len(drawing.labels) == len(boxes)
    rects = [p.rect for p in drawing.labels]
    assert not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1:])
    for placed in drawing.labels:        # each tag touches its own box (or the band of one tag height around it)
        x1, y1, x2, y2 = boxes[placed.index]
        th = placed.rect[3] - placed.rect[1]
        assert _overlap(placed.rect, (x1, y1 - th, x2, y2 + th)), placed
    names = ["cat", "dog", "cow"]
    texts = {p.index: p.text for p in drawing.labels}
    assert all(texts[i] == f"{names[labels[i]]} {scores[i]:.2f}" for i in range(len(grid)))   # full text with room


def test_a_tag_at_the_right_edge_is_drawn_whole():
    """From the rendered image: the tag of a box at the right edge is as wide as the same tag in the middle
    (it was cut off at the edge before: the tag started at the box's left corner, past the frame)."""
    image = np.zeros((200, 300, 3), np.uint8)
    color = np.array(class_color(0))

    def tag_columns(box) -> np.ndarray:
        out = draw_detections(image, np.array([box], np.float64), np.array([0.87]), np.array([0]), ["a_long_name"])
        rows = slice(0, int(box[1]))       # above the box, where the tag goes
        return np.flatnonzero((out[rows] == color).all(axis=-1).any(axis=0))

    middle = tag_columns([100.0, 100.0, 140.0, 150.0])
    edge = tag_columns([285.0, 100.0, 300.0, 150.0])
    assert len(middle) > 40
    assert len(edge) == len(middle) and edge[-1] == 299      # whole, and right-aligned on the frame


def test_relative_luminance_and_contrast_follow_wcag():
    assert relative_luminance(WHITE) == pytest.approx(1.0) and relative_luminance(BLACK) == 0.0
    assert relative_luminance((255, 0, 0)) == pytest.approx(0.2126)
    assert relative_luminance((0, 255, 0)) == pytest.approx(0.7152)
    assert relative_luminance((128, 128, 128)) == pytest.approx(((128 / 255 + 0.055) / 1.055) ** 2.4)
    assert relative_luminance((10, 10, 10)) == pytest.approx(10 / 255 / 12.92)     # the linear segment
    assert contrast_ratio(BLACK, WHITE) == pytest.approx(21.0) and contrast_ratio((7, 7, 7), (7, 7, 7)) == 1.0


@pytest.mark.parametrize("background,expected", [((0, 0, 255), WHITE), ((40, 40, 160), WHITE), ((255, 255, 0), BLACK),
                                                 ((0, 255, 255), BLACK), ((128, 128, 128), BLACK),
                                                 ((110, 110, 110), WHITE), ((255, 0, 255), BLACK)])
def test_text_colour_is_the_one_with_more_contrast(background, expected):
    # (128,128,128): 5.32 with black against 3.95 with white; (110,110,110): 4.09 against 5.13
    assert text_color_for(background) == expected


def test_every_class_colour_gets_readable_text_and_dark_tags_white_text():
    """Catches black text on every tag (about 2.6:1 on the blue classes, under WCAG's 4.5:1)."""
    for c in range(30):
        color = class_color(c)
        text = text_color_for(color)
        assert contrast_ratio(color, text) >= max(4.5, contrast_ratio(color, WHITE if text == BLACK else BLACK))
    dark = next(c for c in range(30) if text_color_for(class_color(c)) == WHITE)
    drawing = render_detections(np.full((100, 160, 3), 128, np.uint8), np.array([[40.0, 50.0, 120.0, 90.0]]),
                                np.array([0.9]), np.array([dark]), [f"c{i}" for i in range(30)])
    x1, y1, x2, y2 = drawing.labels[0].rect
    tag = drawing.image[y1:y2, x1:x2].reshape(-1, 3).astype(int)
    assert (tag.min(axis=1) > 230).sum() > 5                    # white text pixels on the tag
    assert (tag.max(axis=1) < 25).sum() == 0                    # and no black ones


def test_legend_lists_each_drawn_class_once_and_tags_avoid_it():
    names = ["cat", "dog", "cow", "owl"]
    labels = np.array([2, 0, 2, 1, 0, 3])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])       # the owl is under the threshold
    entries = legend_entries(labels[:5], names)
    assert [(e.label, e.name, e.color) for e in entries] == [(c, names[c], class_color(c)) for c in (0, 1, 2)]
    assert entries[0].hex == "#%02x%02x%02x" % class_color(0)
    # a box in each corner: the legend goes top right (the first corner of equal cover), over the tag's first place
    boxes = np.array([[0, 0, 60, 60], [140, 0, 200, 60], [0, 140, 60, 200], [140, 140, 200, 200],
                      [80, 80, 120, 120], [0, 0, 200, 200]], np.float64)
    drawing = render_detections(np.zeros((200, 200, 3), np.uint8), boxes, scores, labels, names,
                                score_thresh=0.3, legend=True)
    assert [e.name for e in drawing.legend] == ["cat", "dog", "cow"]
    x1, y1, x2, y2 = drawing.legend_rect
    assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 200 and (x2, y1) == (200, 0)
    panel = drawing.image[y1:y2, x1:x2]
    row = (y2 - y1) // 3
    for k, entry in enumerate(drawing.legend):     # one row per class, in its colour, in class order
        band = panel[k * row:(k + 1) * row].reshape(-1, 3)
        assert (band == np.array(entry.color)).all(axis=1).mean() > 0.5
    assert not any(_overlap(p.rect, drawing.legend_rect) for p in drawing.labels) and len(drawing.labels) == 5
    plain = render_detections(np.zeros((200, 200, 3), np.uint8), boxes, scores, labels, names, score_thresh=0.3)
    assert plain.legend_rect is None and [e.name for e in plain.legend] == ["cat", "dog", "cow"]


def test_label_mode_none_draws_outlines_only_and_bad_modes_are_refused():
    image = np.full((100, 120, 3), 40, np.uint8)
    box = np.array([[20.0, 50.0, 80.0, 90.0]])
    drawing = render_detections(image, box, np.array([0.9]), np.array([1]), NAMES, label_mode="none")
    assert drawing.labels == [] and drawing.skipped == []
    assert (drawing.image[30:49] == 40).all()                         # nothing above the box
    assert tuple(drawing.image[70, 20]) == class_color(1)
    tagged = render_detections(image, box, np.array([0.9]), np.array([1]), NAMES, label_mode="class")
    assert [p.text for p in tagged.labels] == ["dog"]
    with pytest.raises(ValueError, match="label mode"):
        render_detections(image, box, np.array([0.9]), np.array([1]), NAMES, label_mode="names")


def test_extra_tags_are_placed_first_and_never_left_out():
    image = np.zeros((80, 80, 3), np.uint8)
    box = (10.0, 30.0, 70.0, 70.0)
    extra = Tag(box, ("missed cat", "cat"), (255, 0, 255))
    drawing = render_detections(image, np.array([box] * 3), np.array([0.9, 0.8, 0.7]), np.zeros(3, np.int64),
                                NAMES, extra_tags=[extra])
    assert drawing.labels[0].index == -1 and drawing.labels[0].text == "missed cat"
    rects = [p.rect for p in drawing.labels]
    assert not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1:])


def test_placer_shifts_a_tag_beside_the_one_that_blocks_its_places():
    """Above-left and above-right, inside top, below and inside bottom are all taken; right of the tag that blocks
    the first place is free and still over the box."""
    blockers = [(60, 82, 110, 100), (190, 82, 240, 100), (100, 100, 200, 118), (100, 140, 200, 158),
                (100, 122, 200, 140)]
    placer = LabelPlacer(300, 200, blockers)
    assert placer.place((100, 100, 200, 140), 50, 18, force=False) == (110, 82, 160, 100)
    assert placer.place((100, 100, 200, 140), 50, 18, force=False) is None        # that place is now taken too
    assert placer.place((100, 100, 200, 140), 50, 18, force=True) == (100, 82, 150, 100)   # forced: the first place
    edge = LabelPlacer(300, 200)
    assert edge.place((280, 5, 300, 30), 50, 18, force=False) == (250, 0, 300, 18)       # clamped into the frame
