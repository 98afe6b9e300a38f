"""Typed config: YAML loading, overrides, and errors that name the key and the file."""

import pytest

from detect.config import Config, VOC_CLASSES, config_from_dict, dump_config, load_config
from detect.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.rpn.nms_thresh == 0.7 and cfg.model.rpn.post_nms_top_n_test == 300
    assert cfg.model.roi_heads.batch_size_per_image == 128 and cfg.model.roi_heads.positive_fraction == 0.25
    assert cfg.model.input.min_size == [600] and cfg.model.input.max_size == 1000
    assert cfg.data.classes == "voc" and len(VOC_CLASSES) == 20


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rpn:\n    nms_thresh: 0.6\n  anchors:\n    sizes: [32, 64]\ndata:\n  classes: [a, b]\n")
    cfg = load_config(path, overrides=["train.lr=0.02", "model.anchors.ratios=[1.0]", "data.root=/x"])
    assert cfg.model.rpn.nms_thresh == 0.6
    assert cfg.model.anchors.sizes == [32.0, 64.0] and isinstance(cfg.model.anchors.sizes[0], float)
    assert cfg.model.anchors.ratios == [1.0]
    assert cfg.train.lr == 0.02 and cfg.data.root == "/x" and cfg.data.classes == ["a", "b"]
    assert cfg.source == str(path)


@pytest.mark.parametrize("text, message", [
    ("model:\n  rpn:\n    nms_tresh: 0.6\n", "unknown key 'model.rpn.nms_tresh'"),
    ("train:\n  max_iter: ten\n", "key 'train.max_iter' must be an integer"),
    ("train:\n  amp: 1\n", "key 'train.amp' has the wrong type: expected true or false or 'auto', got 1"),
    ("model:\n  roi_heads:\n    pooler: roi_magic\n", "key 'model.roi_heads.pooler' must be one of"),
    ("model: 3\n", "key 'model' must be a mapping"),
    ("data:\n  classes: 7\n", "key 'data.classes' has the wrong type"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("model: [\n", "not valid YAML"),
])
def test_bad_files_name_the_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_iter=7", "data.classes=[a]"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    again.source = cfg.source = ""
    assert again == cfg
    assert config_from_dict({"train": {"max_iter": 7}}).train.max_iter == 7
