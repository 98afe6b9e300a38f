"""Data loading: tensors and targets, difficult objects, flips, bad images, grouped/distributed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect.config import Config
from detect.data.loader import (DetectionDataset, GroupedBatchSampler, Skipped, build_dataset, collate,
                                eval_loader, shard_indices, synthetic_root)
from detect.data.records import ImageRecord
from detect.errors import DatasetError, ImageReadError
from detect.transforms import TrainAugment
from tests.engine_fakes import CLASSES, write_images

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("loader"), 12)


def test_item_is_a_float_image_and_its_target(records):
    dataset = DetectionDataset(records, CLASSES)
    image, target = dataset[1]
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    pixels = np.asarray(Image.open(records[1].path))
    assert image[1, 3, 7].item() == pytest.approx(pixels[3, 7, 1] / 255.0)
    assert torch.equal(target["boxes"], torch.from_numpy(records[1].boxes))
    assert target["labels"].tolist() == [1] and target["image_id"] == "img001"


def test_training_drops_difficult_objects_unless_asked(records):
    assert len(DetectionDataset(records, CLASSES, train=True)[5][1]["boxes"]) == 0   # img005 is difficult
    assert len(DetectionDataset(records, CLASSES, train=True, use_difficult=True)[5][1]["boxes"]) == 1
    assert len(DetectionDataset(records, CLASSES, train=False)[5][1]["boxes"]) == 1


def test_flip_mirrors_image_and_boxes(records):
    dataset = DetectionDataset(records, CLASSES)
    (image, target), (flipped, ftarget) = dataset[1], dataset[(1, True)]
    assert torch.equal(flipped, image.flip(-1))
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert ftarget["boxes"][0].tolist() == [48 - x2, y1, 48 - x1, y2]


def test_bad_image_is_skipped_or_fatal_when_strict(records, tmp_path):
    bad = ImageRecord("bad", tmp_path / "missing.jpg", 10, 10)
    item = DetectionDataset([bad], CLASSES)[0]
    assert isinstance(item, Skipped) and item.image_id == "bad" and "missing.jpg" in item.reason
    with pytest.raises(ImageReadError, match="missing.jpg"):
        DetectionDataset([bad], CLASSES, strict=True)[0]
    batch = collate([DetectionDataset(records, CLASSES)[0], item])
    assert len(batch) == 1 and batch.image_ids() == ["img000"] and batch.skipped == [item]


def test_grouped_sampler_covers_every_image_with_uniform_aspect_batches(records):
    ratios = DetectionDataset(records, CLASSES).aspect_ratios()
    assert ratios[0] == pytest.approx(32 / 48) and ratios[1] == 1.5
    sampler = GroupedBatchSampler(ratios, 4, seed=3, flip=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    seen = sorted(i for b in batches for i, _ in b)
    assert seen == list(range(12))
    portrait = {i for i, r in enumerate(ratios) if r < 1}
    full_groups = [b for b in batches if len({i in portrait for i, _ in b}) == 1]
    assert len(full_groups) >= 2    # 8 landscape + 4 portrait: at least two single-orientation batches
    flips = [f for b in batches for _, f in b]
    assert 0 < sum(flips) < 12


def test_sampler_order_depends_on_seed_and_epoch_only(records):
    ratios = [1.5] * 10
    a = GroupedBatchSampler(ratios, 3, seed=1, flip=True)
    b = GroupedBatchSampler(ratios, 3, seed=1, flip=True)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    # last batch topped up to full size; resuming mid-epoch skips what was seen
    assert [len(x) for x in first] == [3, 3, 3, 3]
    b.set_epoch(1, start=2)
    assert list(b) == list(a)[2:] and len(b) == 2


def test_ranks_split_each_global_batch(records):
    ratios = [1.5, 0.5] * 5
    whole = list(GroupedBatchSampler(ratios, 4, seed=0))
    r0 = list(GroupedBatchSampler(ratios, 4, rank=0, world_size=2, seed=0))
    r1 = list(GroupedBatchSampler(ratios, 4, rank=1, world_size=2, seed=0))
    assert [a + b for a, b in zip(r0, r1)] == whole
    with pytest.raises(DatasetError, match="multiple of the number of processes"):
        GroupedBatchSampler(ratios, 3, world_size=2)
    assert shard_indices(5, 1, 2) == [1, 3]


def test_eval_loader_batches_lists(records):
    batches = list(eval_loader(DetectionDataset(records, CLASSES), batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert isinstance(batches[0].images, list) and batches[2].image_ids() == ["img010", "img011"]


def test_build_dataset_generates_synthetic_data(tmp_path):
    cfg = Config()
    cfg.data.format = "synthetic"
    cfg.data.root = str(tmp_path / "synth")
    cfg.data.synthetic_images = 10
    train = build_dataset(cfg, "trainval", train=True)
    test = build_dataset(cfg, "test")
    assert len(train) + len(test) == 10 and train.train and not test.train
    assert train.class_names[0] == "circle" and (tmp_path / "synth" / "JPEGImages").is_dir()
    image, target = test[0]
    record = test.records[0]
    assert image.shape == (3, record.height, record.width) and len(record.boxes) > 0
    assert torch.equal(target["boxes"], torch.from_numpy(record.boxes))
    cfg.data.root = ""
    assert synthetic_root(cfg.data) == Path("data/synthetic/n10_seed0")


def test_build_dataset_errors_name_the_problem(tmp_path):
    cfg = Config()
    with pytest.raises(DatasetError, match="data.root is empty"):
        build_dataset(cfg, "train")
    cfg.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        build_dataset(cfg, "train")


def test_build_dataset_reads_a_real_voc_folder():
    root = SHARED_DATA / "bccd"
    if not root.is_dir():
        pytest.skip("shared BCCD data not present")
    cfg = Config()
    cfg.data.root = str(root)
    cfg.data.classes = "auto"
    splits = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
    split = "train" if "train" in splits else splits[0]
    cfg.data.train_split = split
    dataset = build_dataset(cfg, split, train=True)
    assert len(dataset.class_names) == 3 and len(dataset) > 10
    image, target = dataset[0]
    assert image.shape[1:] == (dataset.records[0].height, dataset.records[0].width)


def test_crop_keeps_the_objects_whose_centre_it_holds_in_its_pixels():
    torch.manual_seed(0)
    image = torch.rand(3, 120, 160)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [100.0, 60.0, 150.0, 110.0]])
    labels = torch.tensor([0, 1])
    augment = TrainAugment(crop=1.0, crop_min_scale=0.3)
    cropped_once = False
    for _ in range(20):
        out, out_boxes, out_labels = augment(image, boxes, labels)
        h, w = out.shape[-2:]
        assert 1 <= len(out_boxes) == len(out_labels) and out_labels.dtype == torch.int64
        assert (out_boxes[:, 0] >= 0).all() and (out_boxes[:, 2] <= w).all() and (out_boxes[:, 3] <= h).all()
        if (h, w) == (120, 160):
            continue
        cropped_once = True
        assert 0.3 * 120 - 1 <= h and 0.3 * 160 - 1 <= w
        # the crop's pixels are the image's: find its offset from one kept object's clipped box
        for (x1, y1, x2, y2), label in zip(out_boxes.tolist(), out_labels.tolist()):
            src = boxes[label]
            assert x2 - x1 <= src[2] - src[0] + 1e-4 and y2 - y1 <= src[3] - src[1] + 1e-4
        hits = [(top, left) for top in range(0, 121 - h) for left in range(0, 161 - w)
                if torch.equal(image[:, top:top + h, left:left + w], out)]
        assert len(hits) == 1
        top, left = hits[0]
        shifted = out_boxes + torch.tensor([left, top, left, top], dtype=out_boxes.dtype)
        clipped = boxes[out_labels].clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(left, left + w)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(top, top + h)
        assert torch.allclose(shifted, clipped)
    assert cropped_once


def test_crop_leaves_images_without_objects_and_jitter_stays_in_range():
    image = torch.rand(3, 50, 60)
    empty = torch.zeros((0, 4))
    out, out_boxes, _ = TrainAugment(crop=1.0)(image, empty, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(out, image) and len(out_boxes) == 0
    torch.manual_seed(1)
    jittered, same_boxes, _ = TrainAugment(color_jitter=0.4)(image, torch.tensor([[1.0, 2, 30, 40]]),
                                                             torch.tensor([0]))
    assert jittered.shape == image.shape and not torch.equal(jittered, image)
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    assert same_boxes.tolist() == [[1.0, 2, 30, 40]]
    assert not TrainAugment().enabled


def test_augmentation_applies_to_training_items_only_and_repeats_with_the_seed(records):
    augment = TrainAugment(color_jitter=0.3)
    plain = DetectionDataset(records, CLASSES, train=True)[1][0]
    assert torch.equal(DetectionDataset(records, CLASSES, augment=augment)[1][0], plain)   # not a training set
    dataset = DetectionDataset(records, CLASSES, train=True, augment=augment)
    torch.manual_seed(3)
    first = dataset[1][0]
    torch.manual_seed(3)
    assert torch.equal(dataset[1][0], first) and not torch.equal(first, plain)


@pytest.mark.parametrize("overrides, message", [
    (["model.input.crop=0.5", "model.pipeline=fast_rcnn"], "crop only with faster_rcnn"),
    (["model.input.crop=0.5", "model.pipeline=rcnn"], "crop only with faster_rcnn"),
    (["model.input.color_jitter=0.2", "model.pipeline=rcnn"], "features computed once"),
])
def test_augmentation_a_pipeline_cannot_use_is_refused(overrides, message):
    from detect.config import load_config
    from detect.data.loader import train_augment
    from detect.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        train_augment(load_config(None, overrides))
    assert train_augment(load_config(None, ["model.input.color_jitter=0.2", "model.pipeline=fast_rcnn"])).enabled
