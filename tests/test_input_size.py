"""Object sizes at the network input, the input-size rule and its anchors, and configs that ask for them ("auto")."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.config import dump_config, load_config
from detect.data.records import ImageRecord
from detect.input_size import apply_auto_sizes, size_statistics, suggest_input_size
from detect.errors import ConfigError, DatasetError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FASTER = CONFIGS / "faster_rcnn" / "tiny_custom.yaml"


def records_of(spec: list[tuple[int, int, list[tuple[float, int]]]]) -> list[ImageRecord]:
    """Images ``(width, height, [(square box side, label), ...])``, boxes placed at (0, 0)."""
    out = []
    for i, (w, h, boxes) in enumerate(spec):
        b = np.array([[0, 0, s, s] for s, _ in boxes], np.float32).reshape(-1, 4)
        out.append(ImageRecord(f"im{i}", Path(f"im{i}.jpg"), w, h, b, [label for _, label in boxes]))
    return out


# 96 large objects of class 0 and 4 small ones of class 1 (4% of all) in 1000x800 images
MIXED = records_of([(1000, 800, [(80, 0)] * 4)] * 24 + [(1000, 800, [(20, 1)])] * 4)


def test_smallest_multiple_of_32_that_brings_the_objects_to_16_px():
    # 41 px objects in 1000x800 images are 41 * S / 800 px at shorter side S: >= 16 from S = 312.2
    # (288 gives 14.8 px, 320 gives 16.4); the longer side, 320 * 1.25 = 400, rounds up to 416
    choice = suggest_input_size(records_of([(1000, 800, [(41, 0)])] * 20))
    assert (choice.min_size, choice.max_size, choice.covered, choice.worst, choice.limited_by) == (320, 416, 1.0, 1.0, "")
    # an object landing exactly on 16 px counts (40 * 320 / 800 = 16.0)
    assert suggest_input_size(records_of([(1000, 800, [(40, 0)])] * 5)).min_size == 320
    # a larger target asks for more pixels: 41 * S / 800 >= 24 from S = 468.3 -> 480
    assert suggest_input_size(records_of([(1000, 800, [(41, 0)])] * 5), min_side=24).min_size == 480


def test_every_class_must_reach_the_target_not_only_the_majority():
    # all objects: 96% are >= 16 px already at the floor 256 (80 * 0.32 = 25.6 px); the rare class needs
    # 20 * S / 800 >= 16, S = 640, longer side 640 * 1.25 = 800
    choice = suggest_input_size(MIXED)
    assert (choice.min_size, choice.max_size, choice.worst) == (640, 800, 1.0)
    # 95% of each class: 19 of 20 small objects is enough, 18 of 20 is not
    almost = records_of([(1000, 800, [(80, 0)])] * 20 + [(1000, 800, [(20, 1)])] * 19 + [(1000, 800, [(5, 1)])])
    assert suggest_input_size(almost).min_size == 640
    short = records_of([(1000, 800, [(80, 0)])] * 20 + [(1000, 800, [(20, 1)])] * 18 + [(1000, 800, [(5, 1)])] * 2)
    assert suggest_input_size(short).min_size == 800      # never reached: the native size


def test_floor_native_size_and_largest_size_cap_the_rule():
    assert suggest_input_size(records_of([(1000, 800, [(300, 0)])])).min_size == 256          # the 256 floor
    # images smaller than the floor keep their own size; 150 * 1.5 (the widest aspect) = 225 -> 256
    small = suggest_input_size(records_of([(200, 150, [(60, 0)]), (180, 120, [(50, 0)])]))
    assert (small.min_size, small.max_size, small.limited_by) == (150, 256, "")
    # 10 and 30 px objects in 500x400 images: 10 px ones need S = 640, beyond the native 400; at 400 half pass
    native = suggest_input_size(records_of([(500, 400, [(10, 0), (30, 0)])] * 3))
    assert (native.min_size, native.max_size, native.covered) == (400, 512, 0.5)
    assert native.limited_by == "images' native size" and "target 95% not reached" in native.describe()
    # 20 px objects in 2000x1600 images need a scale of 0.8: S = 1280 with a longer side of 1600 > 1333, so the
    # 1333 cap stops the rule (scale 1333 / 2000 = 0.67, 13.3 px); with a cap of 2000 it reaches them
    capped = suggest_input_size(records_of([(2000, 1600, [(20, 0)])] * 3))
    assert (capped.min_size, capped.max_size, capped.covered, capped.limited_by) == (1333, 1333, 0.0, "largest size 1333")
    wide = suggest_input_size(records_of([(2000, 1600, [(20, 0)])] * 3), max_size=2000)
    assert (wide.min_size, wide.max_size, wide.covered) == (1280, 1600, 1.0)


def test_image_size_comes_from_the_file_when_the_annotation_has_none(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (300, 200)).save(path)
    record = ImageRecord("a", path, 0, 0, np.array([[0, 0, 40, 40]], np.float32), [0])
    assert (suggest_input_size([record]).min_size, suggest_input_size([record]).max_size) == (200, 320)
    missing = ImageRecord("b", tmp_path / "missing.jpg", 0, 0, np.array([[0, 0, 40, 40]], np.float32), [0])
    with pytest.raises(DatasetError, match="no objects in images of known size"):
        suggest_input_size([missing])


def test_size_statistics_per_class_at_the_network_input():
    # at 400 / 1000 a 1000x800 image is scaled by 0.5: class 0 boxes 20..80 px become 10, 20, 30, 40 px
    records = records_of([(1000, 800, [(20, 0), (40, 0), (60, 0), (80, 0), (100, 2)])])
    rows = size_statistics(records, ["a", "b", "c"], min_size=400, max_size=1000)
    assert [r.name for r in rows] == ["a", "b", "c", "all"]
    a, b, c, total = rows
    assert (a.count, a.median, a.p5, a.under_16, a.under_32) == (4, 25.0, pytest.approx(11.5), 0.25, 0.75)
    assert b.count == 0 and math.isnan(b.median)
    assert (c.count, c.median, c.under_16) == (1, 50.0, 0.0)
    assert (total.count, total.median, total.p5, total.under_16, total.under_32) == (5, 30.0, pytest.approx(12.0), 0.2, 0.6)
    # the size of a box is sqrt(w * h): 20 x 80 -> 40 px native, 20 px at the input
    thin = ImageRecord("t", Path("t.jpg"), 1000, 800, np.array([[0, 0, 20, 80]], np.float32), [0])
    assert size_statistics([thin], ["a"], min_size=400, max_size=1000)[0].median == pytest.approx(20.0)


def test_apply_auto_sizes_resolves_input_and_anchors_from_the_records():
    cfg = load_config(FASTER, ["model.anchors.sizes=[100, 200]", "model.anchors.ratios=[1.0]"])
    messages = []
    resolved = apply_auto_sizes(cfg, MIXED, log=messages.append)
    inp, anchors = resolved.model.input, resolved.model.anchors
    assert (inp.min_size, inp.test_min_size, inp.max_size, inp.auto) == ([640], 640, 800, False)
    # at 640 / 800 (scale 0.8) the boxes are 64 and 16 px squares: two sizes, one ratio
    assert (anchors.sizes, anchors.ratios, anchors.auto) == ([16.0, 64.0], [1.0], False)
    assert messages[0].startswith("model.input.auto: shorter side 640, longer <= 800")
    assert "sizes [16.0, 64.0]" in messages[1] and "100.0% of the boxes" in messages[1]
    # the config it was given is unchanged
    assert (cfg.model.input.auto, cfg.model.input.min_size, cfg.model.anchors.sizes) == (True, [256], [100.0, 200.0])


def test_auto_anchors_at_fixed_multi_scale_input():
    # training at 400 and 800 (max 1000) sees the boxes at scales 0.5 and 1.0: 10, 20, 40 and 80 px
    cfg = load_config(FASTER, ["model.input.auto=false", "model.input.min_size=[400, 800]", "model.input.max_size=1000",
                               "model.anchors.sizes=[1, 2, 3, 4]", "model.anchors.ratios=[1.0]"])
    resolved = apply_auto_sizes(cfg, MIXED)
    assert resolved.model.input.min_size == [400, 800] and resolved.model.input.max_size == 1000
    assert resolved.model.anchors.sizes == [10.0, 20.0, 40.0, 80.0]


def test_auto_is_checked_against_the_pipeline_and_the_data():
    no_auto = load_config(FASTER, ["model.input.auto=false", "model.anchors.auto=false"])
    assert apply_auto_sizes(no_auto, []) is no_auto
    rcnn = load_config(CONFIGS / "rcnn" / "tiny_custom.yaml", ["model.input.auto=true"])
    with pytest.raises(ConfigError, match="model.input.auto: R-CNN warps each proposal"):
        apply_auto_sizes(rcnn, MIXED)
    fast = load_config(CONFIGS / "fast_rcnn" / "tiny_custom.yaml")
    assert fast.model.input.auto and apply_auto_sizes(fast, MIXED).model.input.min_size == [640]
    with pytest.raises(ConfigError, match="model.anchors.auto: the fast_rcnn pipeline has no anchors"):
        apply_auto_sizes(load_config(CONFIGS / "fast_rcnn" / "tiny_custom.yaml", ["model.anchors.auto=true"]), MIXED)
    # boxes of one shape give one anchor, not five copies of it (at 256 / 320, 0.32 x 80 = 25.6 px)
    same = apply_auto_sizes(load_config(FASTER), records_of([(1000, 800, [(80, 0)] * 3)])).model.anchors
    assert (same.sizes, same.ratios) == ([25.6], [1.0])
    with pytest.raises(DatasetError, match="no objects in images of known size"):
        apply_auto_sizes(load_config(FASTER), records_of([(1000, 800, [])]))
    with pytest.raises(DatasetError, match="no boxes: anchors cannot be chosen"):
        apply_auto_sizes(load_config(FASTER, ["model.input.auto=false"]), records_of([(1000, 800, [])]))
    with pytest.raises(ConfigError, match="model.input.auto_min_object' must be > 0"):
        load_config(FASTER, ["model.input.auto_min_object=0"])


def test_resolved_config_reloads_to_the_same_model_settings(tmp_path):
    resolved = apply_auto_sizes(load_config(FASTER), MIXED)
    dump_config(resolved, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.model.input == resolved.model.input and again.model.anchors == resolved.model.anchors
    assert apply_auto_sizes(again, MIXED) is again        # nothing left to choose


def _anchor_generator(model):
    """The RPN's anchor generator (FasterRCNN.rpn today, Detector.proposals after the One Detector refactor)."""
    rpn = getattr(model, "rpn", None) or model.proposals
    return rpn.anchor_generator


def test_custom_config_builds_the_chosen_model_on_a_voc_tree(tmp_path):
    from detect import build_model
    from detect.data.loader import load_records
    from tests.conftest import make_voc_tree

    make_voc_tree(tmp_path / "voc", num_images=8)
    cfg = load_config(FASTER, [f"data.root={tmp_path / 'voc'}", "data.train_split=test"])
    records, names, _ = load_records(cfg, "test")
    resolved = apply_auto_sizes(cfg, records)
    choice = suggest_input_size(records)
    model = build_model(resolved, class_names=names)
    assert names == ["cat", "dog"]
    # the tree's images are 80-139 px, below the 256 floor: their own largest shorter side
    assert model.transform.min_size == (choice.min_size,) and choice.min_size == max(min(r.width, r.height) for r in records)
    assert model.transform.max_size == choice.max_size and model.transform.test_min_size == choice.min_size
    generator = _anchor_generator(model)
    assert generator.sizes == tuple(resolved.model.anchors.sizes) and len(generator.sizes) == 5
    assert generator.sizes != (16.0, 32.0, 64.0, 128.0, 256.0)


def test_auto_scales_train_at_multiples_of_the_chosen_side_and_test_at_it():
    from detect.input_size import training_scales

    assert training_scales(256, [0.75, 0.875, 1.0, 1.125, 1.25]) == [192, 224, 256, 288, 320]
    assert training_scales(640, [1.0, 1.01, 0.5]) == [320, 640]      # rounded to multiples of 32, unique
    messages = []
    cfg = load_config(FASTER, ["model.input.auto_scales=[0.5, 1.0, 1.25]", "model.anchors.auto=false"])
    inp = apply_auto_sizes(cfg, MIXED, log=messages.append).model.input
    # the rule picks 640 / 800 for these 1000 x 800 images; the largest training side, 800, gets 1000 rounded up to 1024
    assert (inp.min_size, inp.test_min_size, inp.max_size) == ([320, 640, 800], 640, 1024)
    assert "training shorter sides [320, 640, 800]" in messages[1]
