"""The one in-memory form of an annotated image, shared by every dataset format.

Boxes follow the library convention everywhere: ``(x1, y1, x2, y2)`` float32,
0-based, continuous pixel coordinates (a box covering the whole W x H image is
``(0, 0, W, H)``). VOC's 1-based inclusive pixels map as ``x1 = xmin - 1``,
``x2 = xmax``; that conversion happens only in :mod:`detect.data.voc`.
With this convention the devkit's ``+1`` areas equal plain continuous areas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty(dtype) -> np.ndarray:
    return np.zeros((0,), dtype=dtype)


@dataclass
class ImageRecord:
    """One image and its objects.

    Attributes:
        image_id: the dataset's id (VOC: file stem; COCO: str of the integer id).
        path: image file.
        width, height: image size in pixels (0 when unknown, e.g. an image folder).
        boxes: (N, 4) float32 xyxy.
        labels: (N,) int64 indices into the dataset's class list (0-based, no background).
        difficult: (N,) bool; VOC "difficult" or COCO "iscrowd": neither hit nor miss in evaluation.
        truncated: (N,) bool.
    """

    image_id: str
    path: Path
    width: int = 0
    height: int = 0
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    difficult: np.ndarray = field(default_factory=lambda: _empty(bool))
    truncated: np.ndarray = field(default_factory=lambda: _empty(bool))

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(n)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1) if len(self.difficult) else np.zeros(n, bool)
        self.truncated = np.asarray(self.truncated, dtype=bool).reshape(-1) if len(self.truncated) else np.zeros(n, bool)
        if len(self.difficult) != n or len(self.truncated) != n:
            raise ValueError(f"image {self.image_id}: boxes, labels, difficult and truncated differ in length")

    def without_difficult(self) -> "ImageRecord":
        keep = ~self.difficult
        return ImageRecord(self.image_id, self.path, self.width, self.height,
                           self.boxes[keep], self.labels[keep], self.difficult[keep], self.truncated[keep])
