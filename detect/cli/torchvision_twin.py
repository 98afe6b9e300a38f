"""torchvision's ``FasterRCNN`` built to match one of ours, for :mod:`detect.cli.benchmark_torchvision`.

The twin shares nothing with our model at run time: trunk and per-RoI layers are
deep copies of ours (so the initial weights are identical), the RPN head and the
predictor receive copies of our weights, and every count and threshold comes from
the same config. torchvision's RPN head has one width (its input's), so
``model.rpn.channels`` must equal the trunk's output channels.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVPredictor
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import MultiScaleRoIAlign, RoIAlign, RoIPool

from detect.config import Config
from detect.errors import ConfigError


class _Trunk(nn.Module):
    """torchvision's backbone interface (an ``out_channels`` attribute) around a copy of our trunk."""

    def __init__(self, trunk: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = copy.deepcopy(trunk)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _PoolAdapter(nn.Module):
    """torchvision's ``MultiScaleRoIAlign`` call signature around a single-level torchvision pooler.

    Ours pools with :class:`detect.roi_pool.RoIPool` (same output, its own CPU inference
    path); the twin gets torchvision's own op with the same arguments.
    """

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        if isinstance(pooler, RoIPool):
            self.pooler = RoIPool(pooler.output_size, pooler.spatial_scale)
        else:
            self.pooler = RoIAlign(pooler.output_size, pooler.spatial_scale, pooler.sampling_ratio, pooler.aligned)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes) -> Tensor:
        x = features["0"]
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            # CPU bf16 autocast (benchmark --amp): torchvision's CPU RoIPool kernel is float32/64 only
            # and raises; pooled in float32, as ours does (detect.roi_pool.RoIPool)
            return self.pooler(x.float(), [p.float() for p in proposals])
        return self.pooler(x, proposals)


def torchvision_twin(ours: nn.Module, cfg: Config) -> TVFasterRCNN:
    """torchvision's Faster R-CNN with our trunk, anchors, counts, thresholds, pooling and weights."""
    m = cfg.model
    backbone = ours.backbone
    if m.rpn.channels != backbone.out_channels:
        raise ConfigError(f"torchvision's RPN head is as wide as the trunk ({backbone.out_channels}); "
                          f"set model.rpn.channels={backbone.out_channels}")
    anchors = TVAnchorGenerator(sizes=(tuple(m.anchors.sizes),), aspect_ratios=(tuple(m.anchors.ratios),))
    rpn_head = TVRPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    rpn_head.conv[0][0].load_state_dict(ours.proposals.head.conv.state_dict())
    rpn_head.cls_logits.load_state_dict(ours.proposals.head.cls_logits.state_dict())
    rpn_head.bbox_pred.load_state_dict(ours.proposals.head.bbox_pred.state_dict())
    predictor = TVPredictor(backbone.head_channels, ours.num_classes + 1)
    predictor.load_state_dict(ours.head.predictor.state_dict())
    pooler = ours.head.pooler
    size = pooler.output_size[0] if isinstance(pooler.output_size, tuple) else pooler.output_size
    native = isinstance(pooler, RoIAlign) and not pooler.aligned
    r, h, i = m.rpn, m.roi_heads, m.input
    twin = TVFasterRCNN(
        _Trunk(backbone.trunk, backbone.out_channels), num_classes=None,
        min_size=i.min_size[0], max_size=i.max_size, image_mean=list(backbone.pixel_mean),
        image_std=list(backbone.pixel_std), size_divisible=i.size_divisibility,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train, rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train, rpn_post_nms_top_n_test=r.post_nms_top_n_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], size, sampling_ratio=getattr(pooler, "sampling_ratio", 2)),
        box_head=copy.deepcopy(ours.head.box_head), box_predictor=predictor,
        box_score_thresh=h.score_thresh, box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh, box_bg_iou_thresh=h.bg_iou_thresh_hi,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.box_weights))
    if not native:       # RoIPool, or half-pixel RoIAlign: the very op ours uses
        twin.roi_heads.box_roi_pool = _PoolAdapter(pooler)
    return twin


class TorchvisionAdapter(nn.Module):
    """Our ``loss`` / ``predict`` interface on a torchvision detector (labels 0-based, no background)."""

    def __init__(self, model: TVFasterRCNN, class_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.class_names = list(class_names)

    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return self.model(images, [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets])

    @torch.inference_mode()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        was_training = self.training
        self.eval()
        try:
            out = self.model(images)
        finally:
            self.train(was_training)
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1} for o in out]
