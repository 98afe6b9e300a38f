"""Bounding-box regression targets: the R-CNN parameterisation (R-CNN Appendix C, Faster R-CNN Eq. 2).

Boxes are ``(x1, y1, x2, y2)`` float tensors in continuous pixels, so a box's
width is ``x2 - x1`` (no ``+1``). A box is regressed from a reference box
(anchor or proposal) through

    dx = (x - xa) / wa,  dy = (y - ya) / ha,  dw = log(w / wa),  dh = log(h / ha)

with ``(x, y)`` the centre. Each offset is multiplied by a weight (the inverse
of py-faster-rcnn's ``BBOX_NORMALIZE_STDS``: 10, 10, 5, 5 for the RoI head,
1, 1, 1, 1 for the RPN) so the four targets have similar spread.

IoU, clipping and small-box removal come from :mod:`torchvision.ops`; only the
coder is written here because torchvision keeps its own private.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# exp(dw) can overflow for wild early predictions; clamp so a box is at most
# 1000/16 times its reference (the value torchvision and Detectron use).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes as deltas from reference boxes and decode them back.

    Args:
        weights: multipliers for ``(dx, dy, dw, dh)``.
        scale_clamp: upper bound on ``dw`` and ``dh`` before ``exp`` in decoding.
    """

    def __init__(self, *, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        if len(weights) != 4:
            raise ValueError(f"box coder weights must have 4 values (dx, dy, dw, dh), got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas that take ``reference`` to ``boxes``.

        Args:
            boxes: (..., 4) target boxes.
            reference: (..., 4) anchors or proposals, same shape, positive width and height.

        Returns:
            (..., 4) weighted deltas ``(dx, dy, dw, dh)``.
        """
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        x = boxes[..., 0] + 0.5 * w
        y = boxes[..., 1] + 0.5 * h
        return torch.stack((wx * (x - ref_x) / ref_w,
                            wy * (y - ref_y) / ref_h,
                            ww * torch.log(w / ref_w),
                            wh * torch.log(h / ref_h)), dim=-1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Apply deltas to reference boxes.

        Args:
            deltas: (..., K*4) deltas; K > 1 for class-specific regression.
            reference: (..., 4) reference boxes broadcastable against each of the K groups.

        Returns:
            (..., K*4) decoded boxes, same shape as ``deltas``.
        """
        shape = deltas.shape
        deltas = deltas.reshape(*shape[:-1], shape[-1] // 4, 4)
        reference = reference.to(deltas.dtype).unsqueeze(-2)
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        x = dx * ref_w + ref_x
        y = dy * ref_h + ref_y
        half_w = 0.5 * torch.exp(dw) * ref_w
        half_h = 0.5 * torch.exp(dh) * ref_h
        boxes = torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)
        return boxes.reshape(shape)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip boxes of several images at once (``torchvision.ops.clip_boxes_to_image`` takes one size).

    Args:
        boxes: (N, ..., 4) boxes, one leading entry per image.
        heights, widths: (N,) image sizes.
    """
    view = (-1,) + (1,) * (boxes.dim() - 2)
    w = widths.to(boxes.dtype).view(view)
    h = heights.to(boxes.dtype).view(view)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def degenerate_box_problem(boxes: Tensor) -> str | None:
    """Why a (N, 4) box tensor cannot be a regression target, or None when it can.

    A box with zero width or height makes ``log(w / wa)`` infinite, so it is
    refused before it reaches a loss.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        return f"boxes must have shape (N, 4), got {tuple(boxes.shape)}"
    if not torch.isfinite(boxes).all():
        row = int((~torch.isfinite(boxes)).any(dim=1).nonzero()[0])
        return f"box #{row} {boxes[row].tolist()} is not finite"
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        row = int(bad.nonzero()[0])
        return f"box #{row} {boxes[row].tolist()} has no area (need x2 > x1 and y2 > y1)"
    return None
