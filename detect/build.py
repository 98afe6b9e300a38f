"""The one place where the config meets the constructors.

Read top to bottom, :func:`build_model` is the whole detector: input pipeline,
backbone, anchors, RPN, RoI head.
"""

from __future__ import annotations

from torch import nn
from torchvision.ops import RoIAlign

from detect.anchors import AnchorGenerator
from detect.backbones import build_backbone
from detect.boxes import BoxCoder
from detect.config import Config, ModelConfig
from detect.errors import ConfigError
from detect.faster_rcnn import FasterRCNN
from detect.matching import BalancedSampler, Matcher
from detect.roi_heads import FastRCNNPredictor, RoIHead
from detect.roi_pool import RoIPool
from detect.rpn import RegionProposalNetwork, RPNHead
from detect.transforms import DetectionTransform

# Backbones whose per-RoI layers start with a fully connected layer of fixed input size.
_FC_HEADS = ("alexnet", "zf", "vgg16", "tiny", "tiny8")


def resolve_class_names(cfg: Config, class_names: list[str] | None = None) -> list[str]:
    """The model's class names.

    From ``class_names`` if given, else ``model.num_classes`` (named after ``data.classes`` when that
    lists as many names, else ``class_0``...), else an explicit list in ``data.classes``.
    """
    num = cfg.model.num_classes
    if class_names is not None:
        names = [str(n) for n in class_names]
        if not names:
            raise ConfigError("build_model: class_names is empty")
        if num and num != len(names):
            raise ConfigError(f"{cfg.source or 'config'}: model.num_classes={num} but {len(names)} class names "
                              "were given")
        return names
    if num < 0:
        raise ConfigError(f"{cfg.source or 'config'}: model.num_classes must be positive, got {num}")
    listed = cfg.data.classes
    if num == 0 and isinstance(listed, list) and listed:
        return list(listed)          # an explicit list in the config names the classes
    if num == 0:
        raise ConfigError(f"{cfg.source or 'config'}: the number of classes is unknown: set model.num_classes "
                          "or pass class_names (the dataset's class list) to build_model")
    if isinstance(listed, list) and len(listed) == num:
        return list(listed)
    return [f"class_{i}" for i in range(num)]


def _check(m: ModelConfig, where: str) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: model.{key}: {why}")

    need(bool(m.anchors.sizes) and min(m.anchors.sizes) > 0, "anchors.sizes", "needs positive values")
    need(bool(m.anchors.ratios) and min(m.anchors.ratios) > 0, "anchors.ratios", "needs positive values")
    need(len(m.rpn.box_weights) == 4, "rpn.box_weights", "needs 4 values")
    need(len(m.roi_heads.box_weights) == 4, "roi_heads.box_weights", "needs 4 values")
    need(m.rpn.bg_iou_thresh <= m.rpn.fg_iou_thresh, "rpn.bg_iou_thresh", "must be <= rpn.fg_iou_thresh")
    need(m.roi_heads.bg_iou_thresh_lo <= m.roi_heads.bg_iou_thresh_hi <= m.roi_heads.fg_iou_thresh,
         "roi_heads.bg_iou_thresh_lo", "need bg_iou_thresh_lo <= bg_iou_thresh_hi <= fg_iou_thresh")
    need(m.rpn.batch_size_per_image > 0 and m.roi_heads.batch_size_per_image > 0,
         "rpn.batch_size_per_image", "batch sizes must be positive")
    need(0 < m.rpn.nms_thresh <= 1 and 0 < m.roi_heads.nms_thresh <= 1, "rpn.nms_thresh", "must be in (0, 1]")
    need(m.input.max_size > 0 and bool(m.input.min_size) and min(m.input.min_size) > 0, "input.min_size",
         "sizes must be positive")


def build_model(cfg: Config, class_names: list[str] | None = None) -> nn.Module:
    """Build the detector ``cfg.model`` describes.

    Args:
        cfg: a loaded :class:`~detect.config.Config`.
        class_names: the dataset's classes; when None, ``cfg.model.num_classes`` must be set.

    Raises:
        ConfigError: the number of classes is unknown or a model setting is invalid.
    """
    where = cfg.source or "config"
    m = cfg.model
    if m.pipeline == "fast_rcnn":     # same trunk and head, stored proposals instead of an RPN
        from detect.fast_rcnn import build_fast_rcnn

        return build_fast_rcnn(cfg, class_names=class_names)
    if m.pipeline == "rcnn":
        from detect.rcnn import build_rcnn

        return build_rcnn(cfg, class_names=class_names)
    names = resolve_class_names(cfg, class_names)
    _check(m, where)

    backbone, box_head = build_backbone(m.backbone.name, weights=m.backbone.weights, freeze_at=m.backbone.freeze_at,
                                        freeze_bn=m.backbone.freeze_bn, allow_download=m.backbone.allow_download,
                                        dropout=m.roi_heads.dropout)
    transform = DetectionTransform(min_size=m.input.min_size, max_size=m.input.max_size,
                                   test_min_size=m.input.test_min_size, pixel_mean=backbone.pixel_mean,
                                   pixel_std=backbone.pixel_std, size_divisibility=m.input.size_divisibility,
                                   min_input_size=backbone.min_input_size)

    anchors = AnchorGenerator(sizes=m.anchors.sizes, ratios=m.anchors.ratios, stride=backbone.stride,
                              offset=m.anchors.offset)
    r = m.rpn
    rpn = RegionProposalNetwork(
        head=RPNHead(in_channels=backbone.out_channels, channels=r.channels, num_anchors=anchors.num_anchors),
        anchor_generator=anchors,
        matcher=Matcher(fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh_hi=r.bg_iou_thresh,
                        allow_low_quality_matches=r.allow_low_quality_matches),
        sampler=BalancedSampler(batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction),
        box_coder=BoxCoder(weights=r.box_weights),
        allowed_border=r.allowed_border,
        pre_nms_top_n=(r.pre_nms_top_n_train, r.pre_nms_top_n_test),
        post_nms_top_n=(r.post_nms_top_n_train, r.post_nms_top_n_test),
        nms_thresh=r.nms_thresh, min_size=r.min_size, smooth_l1_beta=r.smooth_l1_beta,
        box_loss_weight=r.box_loss_weight)

    h = m.roi_heads
    size = h.pooled_size or backbone.roi_size
    if size != backbone.roi_size and m.backbone.name in _FC_HEADS:
        raise ConfigError(f"{where}: model.roi_heads.pooled_size={size}: the {m.backbone.name} fc head takes "
                          f"{backbone.roi_size}x{backbone.roi_size} RoIs (use 0 for the backbone's size)")
    scale = 1.0 / backbone.stride
    if h.pooler == "roi_pool":
        pooler = RoIPool(output_size=(size, size), spatial_scale=scale)
    else:
        pooler = RoIAlign(output_size=(size, size), spatial_scale=scale, sampling_ratio=h.sampling_ratio,
                          aligned=h.aligned)
    roi_head = RoIHead(
        pooler=pooler, box_head=box_head,
        predictor=FastRCNNPredictor(in_channels=backbone.head_channels, num_classes=len(names)),
        matcher=Matcher(fg_iou_thresh=h.fg_iou_thresh, bg_iou_thresh_hi=h.bg_iou_thresh_hi,
                        bg_iou_thresh_lo=h.bg_iou_thresh_lo),
        sampler=BalancedSampler(batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction),
        box_coder=BoxCoder(weights=h.box_weights),
        add_gt_as_proposals=h.add_gt_as_proposals, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img, smooth_l1_beta=h.smooth_l1_beta)

    return FasterRCNN(transform=transform, backbone=backbone, rpn=rpn, roi_head=roi_head, class_names=names)
