"""Calling a head directly on a feature map, as :class:`detect.detector.Detector` calls it."""

from __future__ import annotations

import torch

from detect.detector import Inputs
from detect.postprocess import select_detections
from detect.transforms import ImageBatch


def inputs(features: torch.Tensor, sizes, targets=None) -> Inputs:
    """The batch context of a feature map whose images have ``sizes`` (network pixels = input pixels)."""
    batch = ImageBatch(torch.zeros(len(sizes), 3, 1, 1), list(sizes), list(sizes))
    return Inputs([], batch, features, None, None, targets=targets)


def head_loss(head, features, proposals, targets, sizes=None) -> dict:
    sizes = sizes or [tuple(features.shape[-2:])] * len(proposals)
    return head.loss(inputs(features, sizes, targets), proposals)


def head_detections(head, features, proposals, sizes) -> list[dict]:
    """The head's scores, post-processed per image (clip, threshold, per-class NMS, top-k) in network pixels."""
    return [select_detections(boxes, scores, size, score_thresh=head.score_thresh, nms_thresh=head.nms_thresh,
                              detections_per_img=head.detections_per_img)
            for (scores, boxes), size in zip(head.score(inputs(features, sizes), proposals), sizes)]
