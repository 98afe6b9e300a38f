"""Per-class post-processing shared by every head (Fast R-CNN Sec. 2.4 / 4, R-CNN Sec. 2.2).

A head scores each of an image's R boxes for each of the C classes and regresses one box per
class; :func:`select_detections` turns that into detections: clip to the image, drop tiny boxes
and low scores, greedy NMS per class, keep the best ``detections_per_img``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image


def select_detections(boxes: Tensor, scores: Tensor, image_size: tuple[int, int], *, score_thresh: float,
                      nms_thresh: float, detections_per_img: int, min_side: float = 1e-2) -> dict[str, Tensor]:
    """Detections of one image.

    Args:
        boxes: (R, C, 4) class-specific boxes in the image's (network-input) pixels.
        scores: (R, C) class scores (background excluded).
        image_size: (h, w) the boxes are clipped to.
        score_thresh: scores must be above this.
        nms_thresh: IoU of the per-class greedy NMS.
        detections_per_img: at most this many detections, best first.
        min_side: boxes narrower or lower than this after clipping are dropped.

    Returns:
        {"boxes" (D, 4), "scores" (D,), "labels" (D,) int64 0-based}.
    """
    boxes = clip_boxes_to_image(boxes, image_size)
    labels = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    wide = boxes[:, 2] - boxes[:, 0] >= min_side
    tall = boxes[:, 3] - boxes[:, 1] >= min_side
    keep = (scores > score_thresh) & wide & tall
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
