"""Input pipeline inside the model: check, resize, normalise, pad (Faster R-CNN Sec. 3.3).

Images are rescaled so the shorter side is ``min_size`` (600 in the paper) and
the longer at most ``max_size`` (1000); with several ``min_size`` values one is
drawn per image in training (multi-scale training, Fast R-CNN Sec. 5.2). They
are normalised with the mean/std the backbone's weights expect and zero-padded
to a common size that the backbone's stride divides. Target boxes are scaled
with the images; detections are scaled back to the input image's pixels.

Horizontal flipping belongs to the data loader (:func:`hflip`) and uses
``torchvision.transforms.v2`` so boxes and image flip together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from detect.boxes import degenerate_box_problem
from detect.errors import DatasetError


@dataclass
class ImageBatch:
    """Resized, normalised, padded images.

    Attributes:
        tensor: (N, 3, Hp, Wp) padded batch.
        image_sizes: (h, w) of each resized image before padding.
        original_sizes: (h, w) of each input image.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


def check_images(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Return the images as a list, or raise ``DatasetError`` naming the first bad one."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            raise DatasetError("images: expected a list of (3, H, W) tensors or an (N, 3, H, W) batch, "
                               f"got a single tensor of shape {tuple(images.shape)}; wrap it in a list")
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise DatasetError(f"images: expected a list of (3, H, W) tensors, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise DatasetError(f"images[{i}]: expected a tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise DatasetError(f"images[{i}]: expected shape (3, H, W) RGB, got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise DatasetError(f"images[{i}]: expected float values in [0, 1], got dtype {image.dtype} "
                               "(convert with image.float() / 255)")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise DatasetError(f"images[{i}]: image is empty, shape {tuple(image.shape)}")
    return list(images)


def check_targets(targets: Sequence[dict], num_images: int, num_classes: int) -> None:
    """Raise ``DatasetError`` naming the image and field of the first unusable target."""
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise DatasetError(f"targets: expected a list of {num_images} dicts (one per image), got {got}")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise DatasetError(f"targets[{i}]: expected a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise DatasetError(f"targets[{i}]['boxes']: expected a float tensor of shape (N, 4), got {shape}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (boxes.shape[0],):
            shape = (tuple(labels.shape), labels.dtype) if isinstance(labels, Tensor) else type(labels).__name__
            raise DatasetError(f"targets[{i}]['labels']: expected an int64 tensor of shape ({boxes.shape[0]},), "
                               f"got {shape}")
        problem = degenerate_box_problem(boxes)
        if problem:
            raise DatasetError(f"targets[{i}]['boxes']: {problem}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise DatasetError(f"targets[{i}]['labels']: label {bad} is out of range for {num_classes} classes "
                               "(labels are 0-based class indices without background)")


class DetectionTransform(nn.Module):
    """Resize, normalise and pad a list of images into one batch.

    Args:
        min_size: shorter-side lengths; training draws one per image, inference uses ``test_min_size``.
        max_size: upper bound on the longer side.
        test_min_size: shorter side at inference.
        pixel_mean, pixel_std: per-channel statistics of the backbone's training data ([0, 1] RGB).
        size_divisibility: padded height and width are multiples of this.
        min_input_size: padded height and width are at least this (so tiny images survive the trunk's pooling).
        resize: False keeps every image at its own size (R-CNN warps regions out of the image as given).
    """

    def __init__(self, *, min_size: Sequence[int] = (600,), max_size: int = 1000, test_min_size: int = 600,
                 pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
                 size_divisibility: int = 32, min_input_size: int = 32, resize: bool = True) -> None:
        super().__init__()
        if not min_size or min(min_size) < 1 or max_size < 1 or test_min_size < 1:
            raise ValueError(f"image sizes must be positive, got min_size={list(min_size)}, max_size={max_size}")
        self.min_size = tuple(int(s) for s in min_size)
        self.max_size = int(max_size)
        self.test_min_size = int(test_min_size)
        self.size_divisibility = max(1, int(size_divisibility))
        self.min_input_size = int(min_input_size)
        self.resize = resize
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def _scale(self, height: int, width: int, training: bool) -> float:
        if not self.resize:
            return 1.0
        if training and len(self.min_size) > 1:
            target = self.min_size[int(torch.randint(len(self.min_size), ()).item())]
        else:
            target = self.min_size[0] if training else self.test_min_size
        return min(target / min(height, width), self.max_size / max(height, width))

    def forward(self, images: list[Tensor], targets: list[dict] | None = None,
                *, training: bool = False) -> tuple[ImageBatch, list[dict] | None]:
        """Batch the images; scale the target boxes (copies) with them.

        Args:
            images: N float (3, H, W) tensors in [0, 1].
            targets: optional N dicts with "boxes" (M, 4) in input pixels.
            training: draw the scale from ``min_size`` instead of using ``test_min_size``.
        """
        resized, sizes, originals, out_targets = [], [], [], []
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            scale = self._scale(h, w, training)
            image = (image - self.pixel_mean) / self.pixel_std
            if scale != 1.0:
                image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                      recompute_scale_factor=True, align_corners=False)[0]
            nh, nw = image.shape[-2:]
            resized.append(image)
            sizes.append((nh, nw))
            originals.append((h, w))
            if targets is not None:
                ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=image.dtype, device=image.device)
                out_targets.append({**targets[i], "boxes": targets[i]["boxes"].to(image.dtype) * ratio})
        div = self.size_divisibility
        pad_h = max(max(s[0] for s in sizes), self.min_input_size)
        pad_w = max(max(s[1] for s in sizes), self.min_input_size)
        pad_h, pad_w = -(-pad_h // div) * div, -(-pad_w // div) * div
        batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
        for slot, image in zip(batch, resized):
            slot[:, : image.shape[1], : image.shape[2]].copy_(image)
        return ImageBatch(batch, sizes, originals), (out_targets if targets is not None else None)

    @staticmethod
    def boxes_to_input(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
        """Map (N, 4) boxes from resized-image pixels back to the input image's pixels."""
        ratio_h = original_size[0] / image_size[0]
        ratio_w = original_size[1] / image_size[1]
        return boxes * boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])

    @staticmethod
    def boxes_to_network(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
        """Map (N, 4) boxes from the input image's pixels to the resized image's pixels."""
        ratio_h = image_size[0] / original_size[0]
        ratio_w = image_size[1] / original_size[1]
        return boxes * boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])

    def extra_repr(self) -> str:
        return (f"min_size={self.min_size}, max_size={self.max_size}, test_min_size={self.test_min_size}, "
                f"size_divisibility={self.size_divisibility}")


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror an image and its boxes left to right (data augmentation, Fast R-CNN Sec. 3.1).

    Args:
        image: (C, H, W) tensor.
        boxes: (N, 4) xyxy boxes in that image's pixels.

    Returns:
        The flipped image and (N, 4) flipped boxes (plain tensors).
    """
    height, width = image.shape[-2:]
    wrapped = tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width))
    flipped_boxes = TF.horizontal_flip(wrapped)
    return TF.horizontal_flip(image), flipped_boxes.as_subclass(Tensor)


@dataclass(frozen=True)
class TrainAugment:
    """Training-only photometric and crop augmentation (``model.input.color_jitter`` / ``crop``).

    Both are off by default: the papers train with flips only (Fast R-CNN Sec. 3.1). On a small
    dataset trained from scratch for hundreds of epochs they trade memorising the training images
    for seeing them in new colours and framings:

    * ``color_jitter`` ``s``: brightness, contrast and saturation each scaled by a factor drawn from
      ``[1 - s, 1 + s]`` (``torchvision.transforms.v2.ColorJitter``; the hue is left alone).
    * ``crop`` ``p``: with probability ``p``, a random crop of ``crop_min_scale``-1 of each side (aspect
      ratio 1:2 to 2:1) that holds the centre of at least one object; the objects whose centre falls
      inside it are kept, clipped to it, the others dropped. This is SSD's random crop (Liu et al. 2016,
      Sec. 2.2, ``torchvision.transforms.v2.RandomIoUCrop``) with its minimum-IoU choices reduced to 0:
      SSD's IoU 0.1-0.9 choices are out of reach for small objects and only cost retries. The network
      then resizes the crop to the training scale, so its objects are seen larger. Images without
      objects are never cropped.

    Randomness comes from torch's global generator, so a seeded run repeats and a resumed one (whose
    checkpoint holds the generator's state) continues the same stream.
    """

    color_jitter: float = 0.0
    crop: float = 0.0
    crop_min_scale: float = 0.3

    @property
    def enabled(self) -> bool:
        return self.color_jitter > 0 or self.crop > 0

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(image, boxes, labels)`` augmented; boxes are xyxy in the returned image's pixels."""
        from torchvision.transforms import v2

        if self.crop > 0 and len(boxes) and float(torch.rand(())) < self.crop:
            height, width = image.shape[-2:]
            wrapped = tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY,
                                               canvas_size=(height, width))
            crop = v2.Compose([v2.RandomIoUCrop(min_scale=self.crop_min_scale, sampler_options=[0.0]),
                               v2.SanitizeBoundingBoxes()])
            out = crop({"image": tv_tensors.Image(image), "boxes": wrapped, "labels": labels})
            image = out["image"].as_subclass(Tensor)
            boxes, labels = out["boxes"].as_subclass(Tensor), out["labels"]
        if self.color_jitter > 0:
            s = self.color_jitter
            image = v2.ColorJitter(brightness=s, contrast=s, saturation=s)(image).clamp_(0.0, 1.0)
        return image, boxes, labels
