"""The one place where the config meets the constructors.

Read top to bottom, :func:`build_model` is the whole detector: the input pipeline, the backbone,
a proposal stage (an RPN, or external boxes) and a head (the RoI head, or R-CNN's warp head),
composed into one :class:`~detect.detector.Detector`:

* ``faster_rcnn`` = RPN + RoI head (Ren et al. 2015);
* ``fast_rcnn`` = external proposals + RoI head (Girshick 2015);
* ``rcnn`` = external proposals + warp head (Girshick et al. 2014).

:func:`model_from_checkpoint` rebuilds a saved detector from the config stored with it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops import RoIAlign

from detect.anchors import AnchorGenerator
from detect.backbones import Backbone, build_backbone
from detect.bbox_regression import BoxRegressionHead
from detect.boxes import BoxCoder
from detect.checkpoint import load_checkpoint, load_model_weights
from detect.config import Config, ModelConfig, config_from_dict
from detect.detector import Detector
from detect.errors import ConfigError
from detect.matching import BalancedSampler, Matcher
from detect.proposal_sources import ExternalProposals, build_proposal_source
from detect.rcnn import WarpHead
from detect.roi_heads import FastRCNNPredictor, RoIHead
from detect.roi_pool import RoIPool
from detect.rpn import RegionProposalNetwork, RPNHead
from detect.svd import compress_fc
from detect.svm_heads import LinearSVMHead
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


def build_model(cfg: Config, class_names: list[str] | None = None) -> Detector:
    """Build the detector ``cfg.model.pipeline`` names, as ``cfg`` describes it.

    Args:
        cfg: a loaded :class:`~detect.config.Config`.
        class_names: the dataset's classes; when None, ``cfg.model.num_classes`` must be set.

    Raises:
        ConfigError: the number of classes is unknown or a model setting is invalid.
    """
    names = resolve_class_names(cfg, class_names)
    m = cfg.model
    if m.pipeline != "rcnn":
        _check(m, cfg.source or "config")
    backbone, box_head = build_backbone(m.backbone.name, weights=m.backbone.weights, freeze_at=m.backbone.freeze_at,
                                        freeze_bn=m.backbone.freeze_bn, allow_download=m.backbone.allow_download,
                                        dropout=m.roi_heads.dropout)
    if m.pipeline == "rcnn":
        return _rcnn(cfg, backbone, box_head, names)
    transform = _transform(m, backbone)
    if m.pipeline == "faster_rcnn":
        rpn = _rpn(m, backbone)
        return Detector(transform=transform, backbone=backbone, proposals=rpn,
                        head=_roi_head(cfg, backbone, box_head, names), class_names=names)
    f = cfg.fast_rcnn
    head = _roi_head(cfg, backbone, box_head, names)
    if f.svd_rank_fc6 or f.svd_rank_fc7:   # a compressed model's shape; its weights come from its checkpoint
        compress_fc(head.box_head, [f.svd_rank_fc6, f.svd_rank_fc7], structure_only=True)
    source = build_proposal_source(cfg, f.proposal_source, top_k=max(f.train_proposals, f.test_proposals),
                                   compute_missing=f.compute_missing)
    t = transform
    test_transforms = [DetectionTransform(min_size=t.min_size, max_size=round(s * t.max_size / t.test_min_size),
                                          test_min_size=s, pixel_mean=backbone.pixel_mean, pixel_std=backbone.pixel_std,
                                          size_divisibility=t.size_divisibility, min_input_size=t.min_input_size)
                       for s in f.test_scales]
    return Detector(transform=transform, backbone=backbone, head=head, class_names=names,
                    proposals=ExternalProposals(source=source, train_top=f.train_proposals, test_top=f.test_proposals),
                    test_transforms=test_transforms, multiscale_area=f.multiscale_area)


def _transform(m: ModelConfig, backbone: Backbone) -> DetectionTransform:
    return DetectionTransform(min_size=m.input.min_size, max_size=m.input.max_size,
                              test_min_size=m.input.test_min_size, pixel_mean=backbone.pixel_mean,
                              pixel_std=backbone.pixel_std, size_divisibility=m.input.size_divisibility,
                              min_input_size=backbone.min_input_size)


def _rpn(m: ModelConfig, backbone: Backbone) -> RegionProposalNetwork:
    anchors = AnchorGenerator(sizes=m.anchors.sizes, ratios=m.anchors.ratios, stride=backbone.stride,
                              offset=m.anchors.offset)
    r = m.rpn
    return RegionProposalNetwork(
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


def _roi_head(cfg: Config, backbone: Backbone, box_head: nn.Module, names: list[str]) -> RoIHead:
    m, h = cfg.model, cfg.model.roi_heads
    size = h.pooled_size or backbone.roi_size
    if size != backbone.roi_size and m.backbone.name in _FC_HEADS:
        raise ConfigError(f"{cfg.source or 'config'}: model.roi_heads.pooled_size={size}: the {m.backbone.name} fc "
                          f"head takes {backbone.roi_size}x{backbone.roi_size} RoIs (use 0 for the backbone's size)")
    scale = 1.0 / backbone.stride
    if h.pooler == "roi_pool":
        pooler = RoIPool(output_size=(size, size), spatial_scale=scale)
    else:
        pooler = RoIAlign(output_size=(size, size), spatial_scale=scale, sampling_ratio=h.sampling_ratio,
                          aligned=h.aligned)
    return RoIHead(
        pooler=pooler, box_head=box_head,
        predictor=FastRCNNPredictor(in_channels=backbone.head_channels, num_classes=len(names)),
        matcher=Matcher(fg_iou_thresh=h.fg_iou_thresh, bg_iou_thresh_hi=h.bg_iou_thresh_hi,
                        bg_iou_thresh_lo=h.bg_iou_thresh_lo),
        sampler=BalancedSampler(batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction),
        box_coder=BoxCoder(weights=h.box_weights),
        add_gt_as_proposals=h.add_gt_as_proposals, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img, smooth_l1_beta=h.smooth_l1_beta)


def _rcnn(cfg: Config, backbone: Backbone, box_head: nn.Module, names: list[str]) -> Detector:
    r = cfg.rcnn
    if not 0 <= 2 * r.context_padding < r.crop_size:
        raise ConfigError(f"{cfg.source or 'config'}: rcnn.context_padding={r.context_padding} must be below half "
                          f"of rcnn.crop_size={r.crop_size}")
    classifier = nn.Linear(backbone.head_channels, len(names) + 1)
    nn.init.normal_(classifier.weight, std=0.01)     # a new layer, as the paper's (N+1)-way fine-tuning layer
    nn.init.zeros_(classifier.bias)
    pool_dim = backbone.out_channels * backbone.roi_size ** 2
    head = WarpHead(
        box_head=box_head, classifier=classifier,
        svm=LinearSVMHead(in_features=pool_dim if r.feature_layer == "pool5" else backbone.head_channels,
                          num_classes=len(names)),
        box_regressor=BoxRegressionHead(in_features=pool_dim, num_classes=len(names)),
        matcher=Matcher(fg_iou_thresh=r.finetune_fg_iou, bg_iou_thresh_hi=r.finetune_fg_iou),
        sampler=BalancedSampler(batch_size_per_image=r.finetune_batch, positive_fraction=r.finetune_fg_fraction),
        crop_size=r.crop_size, context_padding=r.context_padding, pool_size=backbone.roi_size,
        window_batch=r.window_batch, feature_layer=r.feature_layer, svm_score_thresh=r.score_thresh,
        finetune_score_thresh=r.finetune_score_thresh, nms_thresh=r.nms_thresh,
        detections_per_img=r.detections_per_img)
    source = build_proposal_source(cfg, r.proposal_source, top_k=max(r.train_proposals, r.test_proposals),
                                   compute_missing=r.compute_missing)
    # R-CNN warps regions out of the image as given: the transform only normalises (no resize).
    transform = DetectionTransform(pixel_mean=backbone.pixel_mean, pixel_std=backbone.pixel_std, resize=False,
                                   min_input_size=1, size_divisibility=1)
    return Detector(transform=transform, backbone=backbone, head=head, class_names=names,
                    proposals=ExternalProposals(source=source, train_top=r.train_proposals, test_top=r.test_proposals))


def model_from_checkpoint(path: str | Path, *, overrides: list[str] | None = None,
                          device: str | torch.device = "cpu") -> tuple[Detector, Config, dict]:
    """Rebuild the detector a checkpoint was trained as and load its weights.

    Returns:
        ``(detector in eval mode, Config, checkpoint dict)``; ``overrides`` (``key=value``) change the
        stored config, e.g. ``data.root`` when the data moved.
    """
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(dict(ckpt["config"]), where=f"config stored in {ckpt['path']}", overrides=overrides)
    # ImageNet weights are replaced by the checkpoint's anyway; never fetch them here.
    cfg.model.backbone.weights = "none"
    model = build_model(cfg, class_names=list(ckpt["class_names"]))
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg, ckpt


Detector.loader = staticmethod(model_from_checkpoint)   # Detector.from_checkpoint (detector.py cannot import this module)
