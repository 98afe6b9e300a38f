"""From image records to training and test batches.

The batch order and the horizontal flips are a pure function of ``(seed, epoch)``:
:class:`GroupedBatchSampler` draws them from its own generator, so resuming in the
middle of an epoch only has to skip the batches already seen, and a distributed run
sees exactly the global batches of a single-process run, each rank taking its slice.
Batches group landscape and portrait images (as py-faster-rcnn's aspect grouping does)
so padding to a common size wastes little.

A bad image (missing, truncated, not an image) does not stop training: the dataset
returns a :class:`Skipped` marker naming it, ``collate`` drops it from the batch and
the engine reports it once. ``strict=True`` turns that into an error. An image whose
header declares more than ``max_pixels`` pixels is such a bad image: it is never decoded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from detect import distributed
from detect.data.coco import COCODataset
from detect.data.image import DEFAULT_MAX_PIXELS, image_size, pil_to_rgb, read_image
from detect.data.records import ImageRecord
from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from detect.data.voc import VOCDataset
from detect.errors import ConfigError, DatasetError, ImageReadError
from detect.transforms import TrainAugment, hflip

DEFAULT_SYNTHETIC_ROOT = Path("data") / "synthetic"


@dataclass
class Skipped:
    """Placeholder for an image that could not be read."""

    image_id: str
    path: str
    reason: str


@dataclass
class Batch:
    """``images``: list of (3, H, W) float [0, 1]; ``targets``: list of {"boxes", "labels", "image_id"}."""

    images: list[torch.Tensor]
    targets: list[dict]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def image_ids(self) -> list[str]:
        return [t["image_id"] for t in self.targets]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.tensor(image).permute(2, 0, 1).contiguous().float().div_(255.0)


def as_image_tensors(images, device: torch.device | str | None = None) -> list:
    """The forms :meth:`detect.detector.Detector.predict` accepts, as (3, H, W) float [0, 1] tensors.

    Each item may be an image file path (read as the tools read it: EXIF orientation applied), a
    PIL image (EXIF orientation applied), an (H, W, 3) uint8 RGB array, a uint8 (3, H, W) tensor
    or a float (3, H, W) tensor in [0, 1] (passed through). A (N, 3, H, W) tensor is N images.
    Anything else is left for :func:`detect.transforms.check_images` to refuse by name.
    """
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            item = image_to_tensor(read_image(item))
        elif isinstance(item, Image.Image):
            item = image_to_tensor(np.ascontiguousarray(pil_to_rgb(ImageOps.exif_transpose(item))))
        elif isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8:
            item = image_to_tensor(item)
        elif isinstance(item, torch.Tensor) and item.dtype == torch.uint8 and item.dim() == 3:
            item = item.float().div(255.0)
        if isinstance(item, torch.Tensor) and device is not None:
            item = item.to(device)
        out.append(item)
    return out


class DetectionDataset(Dataset):
    """Images and targets for a list of :class:`ImageRecord`.

    Args:
        records: the images with their annotations (pixels are read lazily).
        class_names: label ``i`` is ``class_names[i]``.
        train: drop "difficult" objects (unless ``use_difficult``), as the paper's training does.
        use_difficult: keep difficult objects in training targets.
        strict: raise on an unreadable image instead of returning :class:`Skipped`.
        max_pixels: images declaring more pixels than this are unreadable (decompression bombs).
        augment: training-only colour / crop augmentation, applied after the flip (``train`` only).

    Items are indexed by ``i`` or ``(i, flip)``; ``flip`` mirrors the image and its boxes.
    """

    def __init__(self, records: list[ImageRecord], class_names: list[str], *, train: bool = False,
                 use_difficult: bool = False, strict: bool = False,
                 coco_ids: tuple[dict[str, int], list[int]] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, augment: TrainAugment | None = None) -> None:
        self.records = list(records)
        self.augment = augment if augment is not None and augment.enabled else None
        self.coco_ids = coco_ids   # COCO sources: (our image id -> COCO id, category id per label)
        self.class_names = list(class_names)
        self.train = train
        self.use_difficult = use_difficult
        self.strict = strict
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]):
        index, flip = key if isinstance(key, tuple) else (key, False)
        record = self.records[index]
        if self.train and not self.use_difficult:
            record = record.without_difficult()
        try:
            image = image_to_tensor(read_image(record.path, max_pixels=self.max_pixels))
        except ImageReadError as exc:
            if self.strict:
                raise
            return Skipped(record.image_id, str(record.path), str(exc))
        boxes = torch.from_numpy(record.boxes.copy())
        labels = torch.from_numpy(record.labels.copy())
        if flip:
            image, boxes = hflip(image, boxes)
        if self.augment is not None and self.train:
            image, boxes, labels = self.augment(image, boxes, labels)
        # image_id and flipped let a model look up this image's stored proposals (Fast R-CNN, R-CNN).
        target = {"boxes": boxes, "labels": labels, "image_id": record.image_id, "flipped": bool(flip)}
        return image, target

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image (from the annotation, else the file header)."""
        ratios = []
        for record in self.records:
            width, height = record.width, record.height
            if width <= 0 or height <= 0:
                try:
                    width, height = image_size(record.path)
                except ImageReadError:
                    width, height = 1, 1
            ratios.append(width / max(height, 1))
        return ratios


def collate(items: list) -> Batch:
    """Lists, not stacked tensors: images differ in size (the model pads them)."""
    batch = Batch([], [])
    for item in items:
        if isinstance(item, Skipped):
            batch.skipped.append(item)
        else:
            batch.images.append(item[0])
            batch.targets.append(item[1])
    return batch


class GroupedBatchSampler(Sampler):
    """Shuffled, aspect-grouped, flip-decided global batches; this rank's slice of each.

    Each epoch, a generator seeded with ``(seed, epoch)`` permutes the images and
    decides their flips; images stream into a landscape and a portrait bucket and a
    bucket that holds a full global batch is emitted. The leftovers form the last
    batches, and the final one is topped up from the start of the permutation so that
    every global batch has ``batch_size`` images and every rank the same count.

    Args:
        aspect_ratios: width / height per image.
        batch_size: global batch size, divisible by ``world_size``.
        rank, world_size: this process's slice of every global batch.
        seed: the run's seed.
        shuffle: permute per epoch (else keep the dataset order).
        flip: mirror each image with probability 0.5.
        group: group by aspect ratio.
    """

    def __init__(self, aspect_ratios: list[float], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, flip: bool = False, group: bool = True) -> None:
        if len(aspect_ratios) == 0:
            raise DatasetError("cannot train on an empty dataset")
        if batch_size <= 0 or batch_size % world_size:
            raise DatasetError(f"train.images_per_batch={batch_size} (the global batch) must be a positive "
                               f"multiple of the number of processes ({world_size})")
        self.portrait = np.asarray(aspect_ratios) < 1.0
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.flip, self.group = seed, shuffle, flip, group
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.portrait) / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` batches (a resumed run)."""
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[tuple[int, bool]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.portrait)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        flips = (torch.rand(n, generator=generator) < 0.5).tolist() if self.flip else [False] * n
        items = [(i, bool(flips[i])) for i in order]
        batches, buckets = [], {False: [], True: []}
        for item in items:
            bucket = buckets[bool(self.portrait[item[0]])] if self.group else buckets[False]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        leftover = buckets[False] + buckets[True]
        for k in range(0, len(leftover), self.batch_size):
            batches.append(leftover[k:k + self.batch_size])
        if batches and len(batches[-1]) < self.batch_size:
            need = self.batch_size - len(batches[-1])
            batches[-1] = batches[-1] + [items[k % n] for k in range(need)]
        return batches

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        lo = self.rank * per_rank
        for batch in self.global_batches()[self.start:]:
            yield batch[lo:lo + per_rank]

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start, 0)


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The images this rank predicts on during evaluation (every ``world_size``-th)."""
    return list(range(rank, n, world_size))


def train_loader(dataset: DetectionDataset, sampler: GroupedBatchSampler, *, workers: int = 0) -> DataLoader:
    # A private generator keeps DataLoader from drawing worker seeds from the global RNG,
    # which would make a resumed run's model RNG differ from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


def eval_loader(dataset: DetectionDataset, *, batch_size: int = 1, workers: int = 0, rank: int = 0,
                world_size: int = 1, limit: int = 0) -> DataLoader:
    """Batches of the dataset's images (this rank's share; the first ``limit`` images when > 0)."""
    count = min(len(dataset), limit) if limit > 0 else len(dataset)
    indices = shard_indices(count, rank, world_size)
    batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- datasets from config


def synthetic_root(data_cfg) -> Path:
    """Where the synthetic dataset lives: ``data.root``, else a cache folder named by size and seed."""
    if data_cfg.root:
        return Path(data_cfg.root)
    name = f"n{data_cfg.synthetic_images}_seed{data_cfg.synthetic_seed}"
    if data_cfg.synthetic_style != "cluttered":
        name += f"_{data_cfg.synthetic_style}"
    if data_cfg.synthetic_max_objects != 6:
        name += f"_objects{data_cfg.synthetic_max_objects}"
    return DEFAULT_SYNTHETIC_ROOT / name


def ensure_synthetic(data_cfg) -> Path:
    """Generate the synthetic dataset unless it already exists (rank 0 writes, the others wait)."""
    root = synthetic_root(data_cfg)
    if distributed.is_main():
        generate_synthetic(root, num_images=data_cfg.synthetic_images, seed=data_cfg.synthetic_seed,
                           max_objects=data_cfg.synthetic_max_objects, style=data_cfg.synthetic_style,
                           workers=min(2, os.cpu_count() or 1))
    distributed.barrier()
    return root


def load_records(cfg, split: str, *, strict: bool = False):
    """``(records, class_names, coco_ids)`` of one split of the dataset ``cfg.data`` describes.

    ``coco_ids`` is ``(image id -> COCO image id, COCO category id per label)`` for COCO sources, else None.
    """
    data = cfg.data
    if data.format == "voc" or data.format == "synthetic":
        classes = data.classes
        if data.format == "synthetic":
            root = ensure_synthetic(data)
            if not isinstance(classes, list):
                classes = list(SYNTHETIC_CLASSES)
        else:
            if not data.root:
                raise DatasetError("data.root is empty: set it to the VOC folder (with Annotations/, ImageSets/, "
                                   "JPEGImages/), e.g. --set data.root=/path/to/VOC2007")
            root = Path(data.root)
        source = VOCDataset(root, split, classes=classes, strict=strict, class_split=data.train_split)
        return source.records, source.class_names, None
    if data.format == "coco":
        if not data.annotations:
            raise DatasetError("data.annotations is empty: set it to the instances JSON, '{split}' is substituted")
        source = COCODataset(data.annotations.replace("{split}", split), data.root.replace("{split}", split),
                             classes=data.classes)
        return source.records, source.class_names, (source.image_ids, source.category_ids)
    raise DatasetError(f"data.format '{data.format}' is not supported")


def build_dataset(cfg, split: str, *, train: bool = False, strict: bool = False) -> DetectionDataset:
    """The torch dataset of one split (``train`` applies the training-only target rules)."""
    records, class_names, coco_ids = load_records(cfg, split, strict=strict)
    if not records:
        raise DatasetError(f"split '{split}' of {cfg.data.root or cfg.data.format} has no usable images")
    return DetectionDataset(records, class_names, train=train, use_difficult=cfg.data.use_difficult, strict=strict,
                            coco_ids=coco_ids, max_pixels=cfg.data.max_image_pixels,
                            augment=train_augment(cfg) if train else None)


def train_augment(cfg) -> TrainAugment:
    """The training augmentation ``cfg.model.input`` asks for; refused where a pipeline cannot use it.

    A crop moves the image under Fast R-CNN's stored proposals, and R-CNN computes its region
    features once for all epochs, so jittered colours would never reach them.
    """
    i, pipeline = cfg.model.input, cfg.model.pipeline
    augment = TrainAugment(color_jitter=i.color_jitter, crop=i.crop, crop_min_scale=i.crop_min_scale)
    where = cfg.source or "config"
    if i.crop > 0 and pipeline != "faster_rcnn":
        raise ConfigError(f"{where}: model.input.crop={i.crop}: the {pipeline} pipeline's stored proposals are "
                          "of the whole image; crop only with faster_rcnn (set model.input.crop=0)")
    if i.color_jitter > 0 and pipeline == "rcnn":
        raise ConfigError(f"{where}: model.input.color_jitter={i.color_jitter}: R-CNN trains its SVMs on "
                          "features computed once; set model.input.color_jitter=0")
    return augment
