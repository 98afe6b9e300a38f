"""A tiny stand-in detector and image set for the engine, loader and distributed tests.

The fake keeps the detector contract (``loss`` returns the four named losses, ``predict``
returns boxes/scores/labels in input pixels) at a few hundred parameters, and draws
random numbers the way a real detector does (dropout, sampling), so resume tests
exercise the RNG state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detect.config import Config
from detect.data.loader import DetectionDataset
from detect.data.records import ImageRecord

CLASSES = ["red", "green", "blue"]


class FakeDetector(nn.Module):
    """Global-pooled conv features -> one class and one box per image.

    Args:
        random: use dropout and random sampling in ``loss`` (off for exact DDP comparisons).
        nan_calls: indices of ``loss`` calls that return NaN losses.
    """

    def __init__(self, class_names: list[str] = CLASSES, *, random: bool = True, nan_calls: set[int] = frozenset()):
        super().__init__()
        self.class_names = list(class_names)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Linear(8, len(class_names) + 1)
        self.box = nn.Linear(8, 4)
        self.obj = nn.Linear(8, 1)
        self.dropout = nn.Dropout(0.3) if random else nn.Identity()
        self.random = random
        self.nan_calls = set(nan_calls)
        self.calls = 0
        self.images_seen = 0

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(image[None])).mean(dim=(2, 3))[0]

    def _box(self, f: torch.Tensor, width: int, height: int) -> torch.Tensor:
        a = torch.sigmoid(self.box(f))
        x1, x2 = torch.minimum(a[0], a[2]), torch.maximum(a[0], a[2]) + 1e-3
        y1, y2 = torch.minimum(a[1], a[3]), torch.maximum(a[1], a[3]) + 1e-3
        return torch.stack([x1 * width, y1 * height, x2 * width, y2 * height])

    def loss(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        parts = {"loss_rpn_cls": [], "loss_rpn_box": [], "loss_cls": [], "loss_box": []}
        self.images_seen += len(images)
        for image, target in zip(images, targets):
            height, width = image.shape[-2:]
            f = self.dropout(self._features(image))
            boxes, labels = target["boxes"], target["labels"]
            has = len(boxes) > 0
            if has:
                # sample one object, as a detector samples anchors / RoIs
                k = int(torch.randint(len(boxes), (1,))) if self.random else 0
                label = labels[k] + 1
                scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                box_loss = F.smooth_l1_loss(self._box(f, width, height) / scale, boxes[k] / scale)
            else:
                label = torch.tensor(0)
                box_loss = self.box(f).sum() * 0.0
            parts["loss_cls"].append(F.cross_entropy(self.cls(f)[None], label.view(1)))
            parts["loss_box"].append(box_loss)
            parts["loss_rpn_cls"].append(F.binary_cross_entropy_with_logits(self.obj(f), torch.tensor([float(has)])))
            parts["loss_rpn_box"].append(0.1 * (f ** 2).mean())
        losses = {k: torch.stack(v).mean() for k, v in parts.items()}
        if self.calls in self.nan_calls:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        self.calls += 1
        return losses

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], *, image_ids=None, timings=None) -> list[dict]:
        out = []
        for image in images:
            height, width = image.shape[-2:]
            f = self._features(image)
            probs = F.softmax(self.cls(f), dim=0)
            score, label = probs[1:].max(dim=0)
            out.append({"boxes": self._box(f, width, height)[None], "scores": score.view(1),
                        "labels": label.view(1).to(torch.int64)})
        return out


def write_images(folder: Path, count: int = 12, *, seed: int = 0) -> list[ImageRecord]:
    """``count`` small PNGs (landscape and portrait), each with one coloured rectangle of class = colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        width, height = (48, 32) if i % 3 else (32, 48)
        image = (rng.random((height, width, 3)) * 60).astype(np.uint8)
        label = i % len(CLASSES)
        x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x2, y2 = x1 + width // 3, y1 + height // 3
        image[y1:y2, x1:x2, label] = 250
        path = folder / f"img{i:03d}.png"
        Image.fromarray(image).save(path)
        records.append(ImageRecord(f"img{i:03d}", path, width, height, np.array([[x1, y1, x2, y2]], np.float32),
                                   np.array([label]), np.array([i == 5]), np.array([False])))
    return records


def fake_config(**train) -> Config:
    cfg = Config()
    cfg.train.images_per_batch = 2
    cfg.train.lr = 0.05
    cfg.train.max_iter = 10
    cfg.train.steps = [8]
    cfg.train.checkpoint_period = 3
    cfg.train.keep_checkpoints = 2
    cfg.train.workers = 0
    cfg.train.log_period = 2
    cfg.model.backbone.name = "fake"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def fake_dataset(folder: Path, count: int = 12, *, train: bool = True) -> DetectionDataset:
    return DetectionDataset(write_images(folder, count), CLASSES, train=train)


class ScriptedValidation:
    """Stands in for ``detect.engine.evaluate_split``: the n-th call scores ``values[n]`` and keeps the weights it saw.

    Lets a test choose the validation mAP sequence of a run (best-model and early-stopping tests).
    """

    def __init__(self, values: list[float]):
        self.values = list(values)
        self.weights: list[dict] = []    # the model's state dict at each call
        self.metrics: list[str] = []     # the metric each call was asked for

    def __call__(self, model, dataset, *, metric="voc07", **kwargs):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.metrics.append(metric)
        value = self.values[len(self.weights) - 1]
        return {"mAP": value, "per_class": {}}, {}


class TickClock:
    """A clock that advances one second per reading: every timed stage (StageClock lap) then lasts exactly 1."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now

