"""R-CNN (Girshick et al., CVPR 2014): warp every proposal, run the whole CNN on it, score with linear SVMs.

Each proposal is dilated so that, once warped to ``crop_size`` (227 for AlexNet),
16 pixels of context surround the original box (Appendix A), and cropped out of
the image with ``torchvision.ops.roi_align`` -- a batched bilinear warp; bins
falling outside the image are set to the mean pixel as in the paper. The CNN is the
backbone's trunk, "pool5" (max pooling to the fc layers' input size) and fc6-fc7.

Training has four stages (see ``tools/train_rcnn.py``): (1) fine-tuning with a
(C+1)-way softmax on warped proposals, IoU >= 0.5 positive, 32 positives and 96
backgrounds per 128 (:meth:`RCNN.loss`); (2) features of every training proposal
into a :mod:`detect.feature_cache`; (3) linear SVMs with hard negative mining
(:mod:`detect.svm_heads`); (4) box regression on pool5 (:mod:`detect.bbox_regression`).
At test time every proposal is scored by every SVM, regressed, and greedy NMS at
0.3 runs per class (Sec. 2.2). Before stage 3 the fine-tuned softmax scores instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align

from detect.backbones import Backbone
from detect.bbox_regression import BoxRegressionHead
from detect.fast_rcnn import target_ids
from detect.matching import FOREGROUND, BalancedSampler, Matcher
from detect.svm_heads import LinearSVMHead
from detect.transforms import check_images, check_targets
from detect.utils.modes import eval_mode
from detect.utils.timing import StageClock


def context_boxes(boxes: Tensor, *, crop_size: int, padding: int) -> Tensor:
    """Dilate (R, 4) boxes so that warped to ``crop_size`` the box fills ``crop_size - 2 * padding`` (Appendix A)."""
    grow = crop_size / (crop_size - 2 * padding)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * grow
    return torch.cat([centre - half, centre + half], dim=1)


def warp_regions(image: Tensor, boxes: Tensor, *, crop_size: int, padding: int, sampling_ratio: int = 2) -> Tensor:
    """Crop and warp regions with context padding.

    Args:
        image: (3, H, W) normalised image (0 is the mean pixel).
        boxes: (R, 4) regions in its pixels.
        crop_size: S, the warped size.
        padding: context pixels around the box in the warped frame.
        sampling_ratio: bilinear samples per output pixel and axis (roi_align's).

    Returns:
        (R, 3, S, S); output pixels whose centre falls outside the image are 0 (the mean).
    """
    if not len(boxes):
        return image.new_zeros(0, 3, crop_size, crop_size)
    padded = context_boxes(boxes.to(image.dtype), crop_size=crop_size, padding=padding)
    crops = roi_align(image[None], [padded], output_size=(crop_size, crop_size), spatial_scale=1.0,
                      sampling_ratio=sampling_ratio, aligned=True)
    steps = (torch.arange(crop_size, device=image.device, dtype=image.dtype) + 0.5) / crop_size
    xs = padded[:, 0:1] + steps * (padded[:, 2:3] - padded[:, 0:1])        # (R, S) bin centres
    ys = padded[:, 1:2] + steps * (padded[:, 3:4] - padded[:, 1:2])
    inside_x = (xs >= 0) & (xs <= image.shape[-1])
    inside_y = (ys >= 0) & (ys <= image.shape[-2])
    return crops * (inside_y[:, None, :, None] & inside_x[:, None, None, :]).to(crops.dtype)


class RCNN(nn.Module):
    """Per-region CNN with a fine-tuning softmax, linear SVMs and box regressors.

    Args:
        backbone: the convolutional trunk (conv1-conv5), run on every warped region.
        box_head: the fc layers (pool5 -> fc7).
        classifier: (C+1)-way fine-tuning layer on fc7.
        svm: per-class linear SVMs (stage 3); box_regressor: ridge regressors on pool5 (stage 4).
        proposals: a :class:`~detect.proposal_sources.ProposalSource`.
        class_names: C names.
        crop_size, context_padding: the warp (227 and 16 in the paper).
        pool_size: pool5's spatial size (the fc layers' input: 6 for AlexNet, 7 for VGG16).
        window_batch: regions per CNN forward pass.
        finetune_batch, finetune_fg_fraction, finetune_fg_iou: fine-tuning sampling (128, 0.25, 0.5).
        feature_layer: "fc7" or "pool5", the SVMs' input.
        train_proposals, test_proposals: best-ranked boxes used per image (0: all).
        score_thresh, nms_thresh, detections_per_img: test-time post-processing.
    """

    def __init__(self, *, backbone: Backbone, box_head: nn.Module, classifier: nn.Linear, svm: LinearSVMHead,
                 box_regressor: BoxRegressionHead, proposals, class_names: list[str], crop_size: int = 227,
                 context_padding: int = 16, pool_size: int = 6, window_batch: int = 128, finetune_batch: int = 128,
                 finetune_fg_fraction: float = 0.25, finetune_fg_iou: float = 0.5, feature_layer: str = "fc7",
                 train_proposals: int = 2000, test_proposals: int = 2000, score_thresh: float = -1.0,
                 nms_thresh: float = 0.3, detections_per_img: int = 100) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool5 = nn.AdaptiveMaxPool2d(pool_size)   # = AlexNet's 3x3/2 pool on 13x13, VGG16's 2x2/2 on 14x14
        self.box_head = box_head
        self.classifier = classifier
        self.svm = svm
        self.box_regressor = box_regressor
        self.proposals = proposals
        self.class_names = list(class_names)
        self.crop_size, self.context_padding = crop_size, context_padding
        self.window_batch = window_batch
        self.matcher = Matcher(fg_iou_thresh=finetune_fg_iou, bg_iou_thresh_hi=finetune_fg_iou)
        self.sampler = BalancedSampler(batch_size_per_image=finetune_batch, positive_fraction=finetune_fg_fraction)
        self.feature_layer = feature_layer
        self.train_proposals, self.test_proposals = train_proposals, test_proposals
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.register_buffer("pixel_mean", torch.tensor(backbone.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.pixel_std).view(3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        """(3, H, W) image in [0, 1] and (R, 4) boxes -> (R, 3, S, S) normalised warped regions."""
        return warp_regions((image - self.pixel_mean) / self.pixel_std, boxes, crop_size=self.crop_size,
                            padding=self.context_padding)

    def forward_regions(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 3, S, S) warped regions -> pool5 (R, D5) flattened and fc7 (R, D)."""
        pooled = self.pool5(self.backbone(crops))
        return pooled.flatten(1), self.box_head(pooled)

    def region_features(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """pool5 (R, D5) and fc7 (R, D) of an image's regions, ``window_batch`` at a time."""
        pool5, fc7 = [], []
        for chunk in boxes.split(self.window_batch):
            p, f = self.forward_regions(self.warp(image, chunk))
            pool5.append(p)
            fc7.append(f)
        if not pool5:
            p, f = self.forward_regions(self.warp(image, boxes[:1].new_tensor([[0, 0, 1, 1]])))
            return p[:0], f[:0]
        return torch.cat(pool5), torch.cat(fc7)

    def svm_features(self, pool5: Tensor, fc7: Tensor) -> Tensor:
        return pool5 if self.feature_layer == "pool5" else fc7

    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Stage 1, fine-tuning (Sec. 2.3): log loss of the (C+1)-way classifier on sampled warped proposals.

        The batch's proposals (and ground truth) are labelled with their best box's class at IoU >= 0.5,
        background otherwise, and ``finetune_batch`` of them are drawn over all the batch's images with at
        most ``finetune_fg_fraction`` positives.

        Returns:
            {"loss_cls"}.
        """
        images = check_images(images)
        check_targets(targets, len(images), self.num_classes)
        ids, flipped = target_ids(targets)
        proposals = self.proposals(images, ids, flipped=flipped, targets=targets)
        owners, boxes, labels, kinds = [], [], [], []
        for i, (props, target) in enumerate(zip(proposals, targets)):
            gt = target["boxes"].to(props)
            cand = torch.cat([props[: self.train_proposals or None], gt])
            matched, kind = self.matcher(box_iou(gt, cand))
            label = torch.zeros(len(cand), dtype=torch.int64, device=cand.device)
            if len(gt):
                label[kind == FOREGROUND] = target["labels"].to(cand.device)[matched[kind == FOREGROUND]] + 1
            owners.append(torch.full((len(cand),), i, device=cand.device))
            boxes.append(cand)
            labels.append(label)
            kinds.append(kind)
        owners, boxes, labels, kinds = (torch.cat(x) for x in (owners, boxes, labels, kinds))
        pos, neg = self.sampler(kinds)
        keep = torch.cat([pos, neg])
        if not keep.numel():        # no box at all in the batch: nothing to learn, but a graph to backprop
            return {"loss_cls": self.classifier.weight.sum() * 0.0}
        crops = torch.cat([self.warp(images[i], boxes[keep][owners[keep] == i]) for i in range(len(images))])
        order = torch.cat([labels[keep][owners[keep] == i] for i in range(len(images))])
        logits = self.classifier(self.forward_regions(crops)[1])
        return {"loss_cls": F.cross_entropy(logits, order)}

    @torch.inference_mode()
    def predict(self, images: list[Tensor], *, image_ids: Sequence[str] | None = None,
                timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Score every proposal with every SVM (or the fine-tuned softmax before stage 3), regress, NMS per class.

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1].
            image_ids: ids to look stored proposals up by; None computes them with selective search.
            timings: if given, seconds are added to its "proposals", "features" and "heads" keys.

        Returns:
            N dicts: "boxes" (D, 4) in the images' pixels, "scores" (D,), "labels" (D,) int64 0-based.
        """
        images = check_images(images)
        with eval_mode(self):
            clock = StageClock(timings, images[0].device if images else None)
            proposals = [p[: self.test_proposals or None] for p in self.proposals(images, image_ids)]
            clock.lap("proposals")
            results = []
            for image, props in zip(images, proposals):
                pool5, fc7 = self.region_features(image, props)
                clock.lap("features")
                results.append(self._detect(image, props, pool5, fc7))
                clock.lap("heads")
            return results

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Same as :meth:`predict` (training uses :meth:`loss` and the stages of ``tools/train_rcnn.py``)."""
        return self.predict(images)

    def _detect(self, image: Tensor, props: Tensor, pool5: Tensor, fc7: Tensor) -> dict[str, Tensor]:
        if self.svm.trained:
            scores, thresh = self.svm(self.svm_features(pool5, fc7)), self.score_thresh
        else:
            scores, thresh = F.softmax(self.classifier(fc7), dim=1)[:, 1:], 0.05
        if self.box_regressor.trained:
            boxes = self.box_regressor(pool5, props)
        else:
            boxes = props[:, None, :].expand(-1, self.num_classes, 4)
        boxes = clip_boxes_to_image(boxes, tuple(image.shape[-2:]))
        labels = torch.arange(self.num_classes, device=props.device).expand(len(props), -1)
        boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
        keep = (scores > thresh) & (boxes[:, 2] - boxes[:, 0] > 1e-2) & (boxes[:, 3] - boxes[:, 1] > 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def build_rcnn(cfg, class_names: list[str] | None = None) -> RCNN:
    """Build the R-CNN ``cfg`` describes (``model.backbone``, ``rcnn.*``, ``proposals.*``)."""
    from detect.backbones import build_backbone
    from detect.build import resolve_class_names
    from detect.proposal_sources import build_proposal_source

    names = resolve_class_names(cfg, class_names)
    r, b = cfg.rcnn, cfg.model.backbone
    if not 0 <= 2 * r.context_padding < r.crop_size:
        raise ValueError(f"rcnn.context_padding={r.context_padding} must be below half of rcnn.crop_size={r.crop_size}")
    backbone, box_head = build_backbone(b.name, weights=b.weights, freeze_at=b.freeze_at, freeze_bn=b.freeze_bn,
                                        allow_download=b.allow_download, dropout=cfg.model.roi_heads.dropout)
    classifier = nn.Linear(backbone.head_channels, len(names) + 1)
    nn.init.normal_(classifier.weight, std=0.01)     # a new layer, as the paper's (N+1)-way fine-tuning layer
    nn.init.zeros_(classifier.bias)
    pool_dim = backbone.out_channels * backbone.roi_size ** 2
    svm_dim = pool_dim if r.feature_layer == "pool5" else backbone.head_channels
    source = build_proposal_source(cfg, r.proposal_source, top_k=max(r.train_proposals, r.test_proposals),
                                   compute_missing=r.compute_missing)
    return RCNN(backbone=backbone, box_head=box_head, classifier=classifier,
                svm=LinearSVMHead(in_features=svm_dim, num_classes=len(names)),
                box_regressor=BoxRegressionHead(in_features=pool_dim, num_classes=len(names)),
                proposals=source, class_names=names, crop_size=r.crop_size, context_padding=r.context_padding,
                pool_size=backbone.roi_size, window_batch=r.window_batch, finetune_batch=r.finetune_batch,
                finetune_fg_fraction=r.finetune_fg_fraction, finetune_fg_iou=r.finetune_fg_iou,
                feature_layer=r.feature_layer, train_proposals=r.train_proposals, test_proposals=r.test_proposals,
                score_thresh=r.score_thresh, nms_thresh=r.nms_thresh, detections_per_img=r.detections_per_img)
