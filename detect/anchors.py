"""Anchors: reference boxes tiled over the feature grid (Faster R-CNN Sec. 3.1.1).

At every feature-map position there are ``k = len(sizes) * len(ratios)``
anchors, centred on the position, each of area ``size**2`` and aspect ratio
``ratio = height / width`` (paper: sizes 128, 256, 512 and ratios 1:2, 1:1, 2:1
at stride 16, so k = 9). Anchor ``a`` of position ``(y, x)`` is number
``(y * W + x) * k + a`` in the flattened list, the same order the RPN's
sibling 1x1 convolutions produce their ``k`` outputs per position.

torchvision's ``AnchorGenerator`` rounds anchor corners to integers and puts
centres at ``x * stride`` (py-faster-rcnn's 0-based inclusive convention); in
the library's continuous pixels the centre of feature cell ``x`` is
``(x + offset) * stride`` with ``offset = 0.5``. Both are available.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The k anchors of one position, centred on (0, 0).

    Args:
        sizes: square roots of the anchor areas, in input pixels.
        ratios: height / width.

    Returns:
        (len(ratios) * len(sizes), 4) boxes, ratio-major (as torchvision orders them).
    """
    sizes_t = torch.as_tensor(sizes, dtype=torch.float32)
    ratios_t = torch.as_tensor(ratios, dtype=torch.float32)
    h_ratio = torch.sqrt(ratios_t)
    widths = (sizes_t[None, :] / h_ratio[:, None]).reshape(-1)
    heights = (sizes_t[None, :] * h_ratio[:, None]).reshape(-1)
    return torch.stack((-widths, -heights, widths, heights), dim=1) / 2


class AnchorGenerator(nn.Module):
    """Tile the cell anchors over a feature map of a given stride.

    Args:
        sizes: anchor sizes (sqrt of area) in input pixels.
        ratios: aspect ratios ``height / width``.
        stride: input pixels per feature cell.
        offset: position of the anchor centre inside a cell, in cells (0.5: cell centre).
    """

    def __init__(self, *, sizes: Sequence[float] = (128.0, 256.0, 512.0),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0), stride: int = 16, offset: float = 0.5) -> None:
        super().__init__()
        if not sizes or not ratios or min(sizes) <= 0 or min(ratios) <= 0:
            raise ValueError(f"anchor sizes and ratios must be non-empty and positive, "
                             f"got {list(sizes)}, {list(ratios)}")
        if stride < 1:
            raise ValueError(f"anchor stride must be >= 1, got {stride}")
        self.sizes = tuple(float(s) for s in sizes)
        self.ratios = tuple(float(r) for r in ratios)
        self.stride = int(stride)
        self.offset = float(offset)
        self.register_buffer("base", cell_anchors(self.sizes, self.ratios), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per feature position (the paper's k)."""
        return len(self.sizes) * len(self.ratios)

    def forward(self, feature_height: int, feature_width: int) -> Tensor:
        """Anchors of the whole grid.

        Returns:
            (feature_height * feature_width * k, 4) boxes in input pixels.
        """
        key = (feature_height, feature_width, self.base.device, self.base.dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        anchors = self.tile(feature_height, feature_width)
        if len(self._cache) > 32:      # multi-scale training sees many grid sizes
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def tile(self, feature_height: int, feature_width: int) -> Tensor:
        """:meth:`forward` without the cache, so symbolic sizes work (``torch.export`` of a dynamic grid).

        Returns:
            (feature_height * feature_width * k, 4) boxes in input pixels.
        """
        ys = (torch.arange(feature_height, dtype=self.base.dtype, device=self.base.device) + self.offset) * self.stride
        xs = (torch.arange(feature_width, dtype=self.base.dtype, device=self.base.device) + self.offset) * self.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
        return (centres + self.base[None]).reshape(-1, 4)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, ratios={self.ratios}, stride={self.stride}, offset={self.offset}"
