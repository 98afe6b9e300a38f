"""Occlusion sensitivity (Zeiler & Fergus 2013, Sec. 4.2) for one detection.

A grey square slides over the image; at each position the score of a fixed
detection (class and box) is recomputed. Where the score drops, the detector was
looking. The box is fixed, so a two-stage detector needs no proposals: the
occluded images go through the backbone and the RoI head only
(:class:`DetectorBoxScorer`), many at a time.

Two facts make it fast on a CPU without changing any score:

* the RoI head reads only the feature cells under the box, and those depend only
  on input pixels within one receptive field of the box; so the trunk runs on a
  crop around the box (cut at multiples of the trunk's stride so the feature grid
  lines up, and taken from the padded batch so the image borders still see the
  same zero padding);
* a square that does not touch that crop cannot change the score, so it is not
  computed at all.

For trunks without a known receptive field (branches: GoogLeNet, ResNet) the
crop is the whole image and only batching helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from detect.analysis.trunk import UnsupportedTrunkError, flatten_trunk, geometry
from detect.utils.io import save_figure


class OcclusionScorer(Protocol):
    """Scores one fixed detection of one image with rectangles of it greyed out."""

    height: int
    width: int

    def baseline(self) -> float:
        """The score with nothing occluded."""

    def score(self, rects: Tensor) -> Tensor:
        """(B, 4) integer ``x1, y1, x2, y2`` rectangles in image pixels -> (B,) scores, one occluder each."""


class PixelScorer:
    """Occlusion for any function of the whole image (e.g. a classifier, or a hand-built test scorer).

    Args:
        fn: (B, 3, H, W) images in [0, 1] -> (B,) scores.
        image: (3, H, W) in [0, 1].
        fill: RGB of the occluder in [0, 1].
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], image: Tensor, *, fill: tuple[float, float, float] = (0.5,) * 3):
        self.fn = fn
        self.image = image
        self.height, self.width = image.shape[-2:]
        self.fill = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1)

    @torch.no_grad()
    def baseline(self) -> float:
        return float(self.fn(self.image[None])[0])

    @torch.no_grad()
    def score(self, rects: Tensor) -> Tensor:
        batch = self.image[None].repeat(len(rects), 1, 1, 1)
        for img, (x1, y1, x2, y2) in zip(batch, rects.tolist()):
            img[:, y1:y2, x1:x2] = self.fill
        return self.fn(batch).reshape(-1).float().cpu()


class DetectorBoxScorer:
    """Class score of a fixed box from a :class:`detect.detector.Detector`'s head (no proposals needed).

    The occluded copies go through :meth:`~detect.detector.Detector.score_boxes` (already transformed,
    so the crop below applies), for all three pipelines: for R-CNN the box is warped out of each
    occluded image and scored by the fine-tuned softmax or the SVMs.

    Args:
        model: the detector (used in eval mode, not modified).
        image: (3, H, W) RGB in [0, 1].
        box: (4,) xyxy in the image's pixels.
        label: 0-based class whose score (softmax probability; SVM score for a trained R-CNN) is the score.
        fill: occluder RGB in [0, 1]; None uses the pixel mean the backbone normalises with (the
            "grey" of the paper: zero after normalisation).
        crop: score a receptive-field crop around the box instead of the whole image (heads on the
            feature map only: R-CNN's warp sees the box's own pixels and context, so it gets the whole image).
    """

    def __init__(self, model, image: Tensor, box: Tensor | list[float], label: int, *,
                 fill: tuple[float, float, float] | None = None, crop: bool = True) -> None:
        self.model = model
        self.label = int(label)
        self.height, self.width = image.shape[-2:]
        param = next(model.parameters())
        image = image.to(param.device, param.dtype)
        transform = model.transform_for_test
        with torch.no_grad():
            batch, _ = transform([image])
        (h, w), (oh, ow) = batch.image_sizes[0], batch.original_sizes[0]
        self.scale_x, self.scale_y = w / ow, h / oh
        box = torch.as_tensor(box, dtype=param.dtype, device=param.device).reshape(1, 4)
        self.box_net = transform.boxes_to_network(box, (h, w), (oh, ow))
        tensor = batch.tensor
        x0, y0, x1, y1 = 0, 0, tensor.shape[-1], tensor.shape[-2]
        if crop and model.head.uses_feature_map:
            window = _crop_window(model.backbone, self.box_net[0].tolist(), tensor.shape[-2:])
            if window is not None:
                x0, y0, x1, y1 = window
        self.window = (x0, y0, x1, y1)                    # in network-input pixels
        self.tensor = tensor[:, :, y0:y1, x0:x1].contiguous()
        self.rois = self.box_net - self.box_net.new_tensor([x0, y0, x0, y0])
        mean = torch.tensor(fill, dtype=param.dtype, device=param.device).view(3, 1, 1) if fill is not None else None
        self.fill = ((mean - transform.pixel_mean) / transform.pixel_std if mean is not None
                     else torch.zeros(3, 1, 1, dtype=param.dtype, device=param.device))
        self._baseline: float | None = None

    @torch.no_grad()
    def _probabilities(self, batch: Tensor) -> Tensor:
        scored = self.model.score_boxes(batch, [self.rois] * len(batch), transformed=True)
        return torch.cat([scores[:, self.label] for scores, _ in scored]).float().cpu()

    def baseline(self) -> float:
        if self._baseline is None:
            self._baseline = float(self._probabilities(self.tensor)[0])
        return self._baseline

    def to_window(self, rects: Tensor) -> Tensor:
        """Image-pixel rectangles (B, 4) -> rectangles in the crop's pixels (may be empty or outside)."""
        scale = torch.tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=torch.float64)
        net = torch.round(rects.double() * scale).long()
        x0, y0 = self.window[:2]
        return net - torch.tensor([x0, y0, x0, y0])

    def _local(self, rects: Tensor) -> tuple[Tensor, Tensor]:
        """Rectangles clipped to the crop, and whether each still covers any pixel of it."""
        local = self.to_window(rects)
        h, w = self.tensor.shape[-2:]
        local[:, 0::2] = local[:, 0::2].clamp(0, w)
        local[:, 1::2] = local[:, 1::2].clamp(0, h)
        return local, (local[:, 2] > local[:, 0]) & (local[:, 3] > local[:, 1])

    def touches(self, rects: Tensor) -> Tensor:
        """(B,) bool: the square reaches pixels the box's score depends on (else the score is the baseline)."""
        return self._local(rects)[1]

    @torch.no_grad()
    def score(self, rects: Tensor) -> Tensor:
        local, touches = self._local(rects)
        out = torch.full((len(rects),), self.baseline(), dtype=torch.float32)
        if touches.any():
            idx = torch.nonzero(touches).squeeze(1)
            batch = self.tensor.repeat(len(idx), 1, 1, 1)
            for img, (x1, y1, x2, y2) in zip(batch, local[idx].tolist()):
                img[:, y1:y2, x1:x2] = self.fill
            out[idx] = self._probabilities(batch)
        return out


def _crop_window(backbone, box: list[float], shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Stride-aligned window of the padded input that holds every pixel the box's feature cells see.

    Returns None when the trunk's receptive field is unknown (then the whole image is used).
    """
    try:
        geo = geometry(flatten_trunk(backbone.trunk))
    except UnsupportedTrunkError:
        return None
    stride = int(getattr(backbone, "stride", geo.jump))
    # Feature cell c sees input [c*jump - pad, c*jump - pad + size). RoI pooling reads the cells from about
    # box/stride rounded outwards (RoIAlign also interpolates with the next cell): two cells of slack each side.
    slack = 2 * max(stride, geo.jump)
    before, after = geo.pad + slack, geo.size - geo.pad + slack
    align = math.lcm(stride, geo.jump)
    height, width = int(shape[0]), int(shape[1])
    x0 = max(0, math.floor((box[0] - before) / align) * align)
    y0 = max(0, math.floor((box[1] - before) / align) * align)
    x1 = min(width, math.ceil((box[2] + after) / align) * align)
    y1 = min(height, math.ceil((box[3] + after) / align) * align)
    return x0, y0, x1, y1


@dataclass
class OcclusionMap:
    """Scores of one detection with a grey square at each position.

    Attributes:
        scores: (R, C) score with the square's top-left corner at (``ys[r]``, ``xs[c]``).
        ys, xs: (R,), (C,) top-left corners in image pixels.
        patch: square side in pixels.
        stride: step between positions.
        baseline: the score of the unoccluded image.
        heat: (H, W) per pixel, the mean score over the squares covering it (baseline where none does).
        evaluated: how many positions needed a forward pass (the others cannot change the score).
    """

    scores: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    patch: int
    stride: int
    baseline: float
    heat: np.ndarray
    evaluated: int

    def peak(self) -> tuple[int, int]:
        """``(y, x)`` centre of the square that lowers the score most."""
        r, c = np.unravel_index(int(np.argmin(self.scores)), self.scores.shape)
        return int(self.ys[r] + self.patch // 2), int(self.xs[c] + self.patch // 2)


def _positions(size: int, patch: int, stride: int) -> np.ndarray:
    last = max(size - patch, 0)
    starts = np.arange(0, last + 1, stride)
    if starts[-1] != last:
        starts = np.append(starts, last)      # the last square reaches the border
    return starts


def occlusion_map(scorer: OcclusionScorer, *, patch: int = 32, stride: int = 16, batch_size: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> OcclusionMap:
    """Slide a ``patch`` x ``patch`` square with step ``stride`` and record the score at each position.

    Args:
        scorer: see :class:`OcclusionScorer`.
        batch_size: occluded images per forward pass.
        progress: called with (done, total) after each batch.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be positive, got patch={patch}, stride={stride}")
    ys, xs = _positions(scorer.height, patch, stride), _positions(scorer.width, patch, stride)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    rects = torch.from_numpy(np.stack([gx.ravel(), gy.ravel(), gx.ravel() + patch, gy.ravel() + patch], 1))
    baseline = scorer.baseline()
    scores = np.empty(len(rects), dtype=np.float32)
    for start in range(0, len(rects), batch_size):
        scores[start:start + batch_size] = scorer.score(rects[start:start + batch_size]).numpy()
        if progress is not None:
            progress(min(start + batch_size, len(rects)), len(rects))
    touches = getattr(scorer, "touches", None)
    evaluated = int(touches(rects).sum()) if touches is not None else len(rects)
    grid = scores.reshape(len(ys), len(xs))
    total = np.zeros((scorer.height, scorer.width), dtype=np.float64)
    count = np.zeros((scorer.height, scorer.width), dtype=np.float64)
    for (r, y), (c, x) in ((rc, cc) for rc in enumerate(ys) for cc in enumerate(xs)):
        total[y:y + patch, x:x + patch] += grid[r, c]
        count[y:y + patch, x:x + patch] += 1
    heat = np.where(count > 0, total / np.maximum(count, 1), baseline).astype(np.float32)
    return OcclusionMap(grid, ys, xs, patch, stride, baseline, heat, evaluated)


def plot_occlusion(image: np.ndarray, omap: OcclusionMap, box, path: str | Path, *, title: str = "") -> Path:
    """The image, the score map over it (Fig. 7 of the paper) and the box; PNG.

    Args:
        image: (H, W, 3) uint8 RGB.
        box: (4,) xyxy of the explained detection.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image.shape[:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6 * height / max(width, 1) + 0.8))
    left.imshow(image)
    left.set_title("input and detection", fontsize=9)
    right.imshow(image)
    shown = right.imshow(omap.heat, cmap="jet", alpha=0.55, vmin=min(float(omap.heat.min()), omap.baseline),
                         vmax=max(float(omap.heat.max()), omap.baseline))
    right.set_title(f"score with a {omap.patch}px grey square here (unoccluded {omap.baseline:.3f})", fontsize=9)
    x1, y1, x2, y2 = [float(v) for v in box]
    for ax in (left, right):
        ax.add_patch(matplotlib.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                                  linewidth=1.5))
        ax.axis("off")
    py, px = omap.peak()
    right.plot([px], [py], marker="x", color="white", markersize=9)
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
