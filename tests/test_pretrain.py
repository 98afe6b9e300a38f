"""Trunk pre-training as a crop classifier: the crops, that it learns, and its place in tools/train.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect.backbones import build_backbone
from detect.config import PretrainConfig
from detect.data.records import ImageRecord
from detect.errors import ConfigError
from detect.pretrain import object_crops, pretrain_trunk
from tests.engine_fakes import CLASSES, write_images

REPO = Path(__file__).resolve().parents[1]


def test_crops_keep_context_skip_difficult_and_report_unreadable_images(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:40] = (200, 10, 10)
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    boxes = np.array([[20, 10, 40, 30], [0, 0, 5, 5]], np.float32)
    records = [ImageRecord("a", tmp_path / "a.png", 60, 40, boxes, np.array([2, 1]), np.array([False, True])),
               ImageRecord("bad", tmp_path / "bad.png", 60, 40, boxes[:1], np.array([0]), np.array([False]))]
    messages = []
    crops, labels = object_crops(records, size=30, context=0.25, log=messages.append)
    assert crops.shape == (1, 3, 30, 30) and crops.dtype == torch.uint8 and labels.tolist() == [2]
    # 20 px box + 5 px of context per side -> 30 px, warped 1:1: the object fills the middle 20x20.
    assert torch.equal(crops[0, :, 5:25, 5:25], torch.tensor([200, 10, 10], dtype=torch.uint8).view(3, 1, 1).expand(3, 20, 20))
    assert int(crops[0, :, :5].max()) == 0
    assert len(messages) == 1 and "bad" in messages[0]


def test_pretraining_learns_the_classes_and_changes_only_the_trunk(tmp_path):
    torch.manual_seed(0)
    records = write_images(tmp_path / "img", 40)
    backbone, head = build_backbone("tiny8", freeze_bn=False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    cfg = PretrainConfig(steps=60, crop_size=32, batch_size=16, lr=0.003, scales=[24, 32])
    result = pretrain_trunk(backbone, records, len(CLASSES), cfg, log=lambda *_: None)
    assert result["steps"] == 60 and result["crops"] == 36      # 39 non-difficult crops, a tenth held out
    assert result["accuracy"] == 1.0                               # the class is the colour of the box
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())


def test_pretraining_says_what_it_does_and_shows_progress_with_rate_and_eta(tmp_path, capsys):
    """Issue 14.5: a stage of minutes must not be silent (catches a bar that is never created or never advanced)."""
    records = write_images(tmp_path / "img", 20)
    backbone, _ = build_backbone("tiny8", freeze_bn=False)
    messages = []
    cfg = PretrainConfig(steps=12, crop_size=24, batch_size=8)
    pretrain_trunk(backbone, records, len(CLASSES), cfg, log=messages.append, progress=True)
    assert messages[0].startswith("pretraining: cropping the objects of 20 training images")
    assert messages[1].startswith("pretraining: the trunk learns the 3 classes from 18 crops (12 steps of 8")
    err = capsys.readouterr().err
    assert "pretraining: crops" in err and "20/20" in err
    trunk = err[err.index("pretraining: trunk"):]
    assert "12/12" in trunk and ("it/s" in trunk or "s/it" in trunk) and "loss=" in trunk
    assert "<" in trunk          # tqdm's elapsed<remaining: the ETA
    pretrain_trunk(backbone, records, len(CLASSES), cfg, log=messages.append, progress=False)
    assert "pretraining" not in capsys.readouterr().err


def test_train_tool_pretrains_first_and_refuses_alternating(tmp_path, capsys):
    from detect.cli import train

    config = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
    sets = [f"data.root={tmp_path / 'syn'}", "data.synthetic_images=12", "train.max_iter=2", "train.checkpoint_period=0",
            "pretrain.steps=5", "pretrain.crop_size=32", "model.input.min_size=[128]", "model.input.test_min_size=128",
            "model.input.max_size=200"]
    args = ["--config", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--no-test"]
    assert train.main(args + [f"--set={s}" for s in sets]) == 0
    out = capsys.readouterr().out
    assert "pretraining: trunk trained as a 5-way crop classifier for 5 steps" in out
    assert out.index("pretraining:") < out.index("final weights")
    code = train.main(["--config", str(config), "--out", str(tmp_path / "alt"), "--no-progress", "--no-test",
                       *[f"--set={s}" for s in sets], "--set=train.training_mode=alternating"])
    assert code == 2
    assert "pretrain.steps is not combined with train.training_mode 'alternating'" in capsys.readouterr().err


def test_pretrain_config_is_typed():
    from detect import load_config

    with pytest.raises(ConfigError, match="pretrain.steps"):
        load_config(REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml", ["pretrain.steps=many"])


def test_background_crops_overlap_no_object_and_follow_the_fraction(tmp_path):
    """Background crops (an extra class) are drawn where no object is, about the asked share of all crops."""
    from detect.pretrain import background_boxes
    from torchvision.ops import box_iou

    rng = np.random.default_rng(0)
    objects = np.array([[10, 10, 50, 50], [60, 20, 90, 70]], np.float32)
    boxes = background_boxes(objects, 200, 120, 30, rng)
    assert len(boxes) == 30
    assert float(box_iou(torch.from_numpy(boxes), torch.from_numpy(objects)).max()) < 0.3
    assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 200 and boxes[:, 3].max() <= 120
    assert not background_boxes(np.array([[0, 0, 20, 20]], np.float32), 20, 20, 5, rng).size   # no room: none

    records = write_images(tmp_path / "img", 40)
    crops, labels = object_crops(records, size=24, context=0.1, background=0.5, background_label=7, seed=1)
    share = float((labels == 7).float().mean())
    assert 0.35 < share < 0.65 and set(labels.tolist()) - {7} <= set(range(len(CLASSES)))
    again = object_crops(records, size=24, context=0.1, background=0.5, background_label=7, seed=1)
    assert torch.equal(crops, again[0]) and torch.equal(labels, again[1])       # seeded


def test_one_class_pretraining_learns_object_against_background_or_is_skipped(tmp_path):
    """A one-class set: without background crops cross-entropy over one output is 0 (nothing learned) -> skipped."""
    records = write_images(tmp_path / "img", 30)
    for record in records:
        record.labels[:] = 0
    backbone, _ = build_backbone("tiny8", freeze_bn=False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    messages = []
    result = pretrain_trunk(backbone, records, 1, PretrainConfig(steps=20, crop_size=24, batch_size=8),
                            log=messages.append, progress=False)
    assert result["steps"] == 0 and "skipped" in messages[0] and "pretrain.background" in messages[0]
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    cfg = PretrainConfig(steps=40, crop_size=24, batch_size=16, lr=0.003, background=0.5)
    result = pretrain_trunk(backbone, records, 1, cfg, log=messages.append, progress=False)
    assert result["steps"] == 40 and "2-way" in messages[-1] and result["accuracy"] > 0.7
