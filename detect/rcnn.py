"""R-CNN (Girshick et al., CVPR 2014): warp every proposal, run the whole CNN on it, score with linear SVMs.

R-CNN is :class:`detect.detector.Detector` with external (selective-search) proposals and
:class:`WarpHead`: each proposal is dilated so that, once warped to ``crop_size`` (227 for
AlexNet), 16 pixels of context surround the original box (Appendix A), and cropped out of the
normalised image with ``torchvision.ops.roi_align`` -- a batched bilinear warp; bins falling
outside the image are set to the mean pixel as in the paper. The CNN is the detector's trunk,
"pool5" (max pooling to the fc layers' input size) and fc6-fc7.

Training has four stages (:mod:`detect.recipes`): (1) fine-tuning with a (C+1)-way softmax on
warped proposals, IoU >= 0.5 positive, 32 positives and 96 backgrounds per 128
(:meth:`WarpHead.loss`); (2) features of every training proposal into a
:mod:`detect.feature_cache`; (3) linear SVMs with hard negative mining (:mod:`detect.svm_heads`);
(4) box regression on pool5 (:mod:`detect.bbox_regression`). At test time every proposal is scored
by every SVM, regressed, and greedy NMS at 0.3 runs per class (Sec. 2.2). Before stage 3 the
fine-tuned softmax scores instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detect.bbox_regression import BoxRegressionHead
from detect.matching import BalancedSampler, Matcher, label_candidates
from detect.svm_heads import LinearSVMHead


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


class WarpHead(nn.Module):
    """R-CNN's head: warp each region, run the CNN on it, score with the fine-tuning softmax or the SVMs.

    Args:
        box_head: the fc layers (pool5 -> fc7).
        classifier: (C+1)-way fine-tuning layer on fc7.
        svm: per-class linear SVMs (stage 3); box_regressor: ridge regressors on pool5 (stage 4).
        matcher, sampler: fine-tuning labelling (IoU >= 0.5) and sampling (128 per batch, 25% foreground).
        crop_size, context_padding: the warp (227 and 16 in the paper).
        pool_size: pool5's spatial size (the fc layers' input: 6 for AlexNet, 7 for VGG16).
        window_batch: regions per CNN forward pass.
        feature_layer: "fc7" or "pool5", the SVMs' input.
        svm_score_thresh: detections' minimum SVM score; finetune_score_thresh: minimum softmax score
            before the SVMs are trained.
        nms_thresh, detections_per_img: test-time post-processing.
    """

    uses_feature_map = False             # the CNN runs on each warped region, not on the whole image
    loss_names = ("loss_cls",)

    def __init__(self, *, box_head: nn.Module, classifier: nn.Linear, svm: LinearSVMHead,
                 box_regressor: BoxRegressionHead, matcher: Matcher, sampler: BalancedSampler, crop_size: int = 227,
                 context_padding: int = 16, pool_size: int = 6, window_batch: int = 128, feature_layer: str = "fc7",
                 svm_score_thresh: float = -1.0, finetune_score_thresh: float = 0.05, nms_thresh: float = 0.3,
                 detections_per_img: int = 100) -> None:
        super().__init__()
        self.pool5 = nn.AdaptiveMaxPool2d(pool_size)   # = AlexNet's 3x3/2 pool on 13x13, VGG16's 2x2/2 on 14x14
        self.box_head = box_head
        self.classifier = classifier
        self.svm = svm
        self.box_regressor = box_regressor
        self.matcher, self.sampler = matcher, sampler
        self.crop_size, self.context_padding = crop_size, context_padding
        self.window_batch = window_batch
        self.feature_layer = feature_layer
        self.svm_score_thresh, self.finetune_score_thresh = svm_score_thresh, finetune_score_thresh
        self.nms_thresh, self.detections_per_img = nms_thresh, detections_per_img

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features - 1

    @property
    def score_thresh(self) -> float:
        """The SVMs' threshold once they are trained, the softmax's before."""
        return self.svm_score_thresh if self.svm.trained else self.finetune_score_thresh

    def forward_regions(self, backbone: nn.Module, crops: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 3, S, S) warped regions -> pool5 (R, D5) flattened and fc7 (R, D)."""
        pooled = self.pool5(backbone(crops))
        return pooled.flatten(1), self.box_head(pooled)

    def region_features(self, backbone: nn.Module, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """pool5 (R, D5) and fc7 (R, D) of a normalised (3, H, W) image's regions, ``window_batch`` at a time."""
        pool5, fc7 = [], []
        for chunk in boxes.split(self.window_batch):
            p, f = self.forward_regions(backbone, self.warp(image, chunk))
            pool5.append(p)
            fc7.append(f)
        if not pool5:
            p, f = self.forward_regions(backbone, self.warp(image, boxes[:1].new_tensor([[0, 0, 1, 1]])))
            return p[:0], f[:0]
        return torch.cat(pool5), torch.cat(fc7)

    def warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        """Normalised (3, H, W) image and (R, 4) boxes -> (R, 3, S, S) warped regions with context."""
        return warp_regions(image, boxes, crop_size=self.crop_size, padding=self.context_padding)

    def svm_features(self, pool5: Tensor, fc7: Tensor) -> Tensor:
        return pool5 if self.feature_layer == "pool5" else fc7

    def loss(self, inp, proposals: list[Tensor]) -> dict[str, Tensor]:
        """Stage 1, fine-tuning (Sec. 2.3): log loss of the (C+1)-way classifier on sampled warped proposals.

        The batch's proposals (and ground truth) are labelled with their best box's class at IoU >= 0.5,
        background otherwise, and ``sampler.batch_size_per_image`` of them are drawn over all the batch's
        images with at most ``sampler.positive_fraction`` positives.

        Returns:
            {"loss_cls"}.
        """
        owners, boxes, labels, kinds = [], [], [], []
        for i, (props, target) in enumerate(zip(proposals, inp.targets)):
            cand, kind, _, label = label_candidates(self.matcher, props, target["boxes"], target["labels"])
            owners.append(torch.full((len(cand),), i, device=cand.device))
            boxes.append(cand)
            labels.append(label)
            kinds.append(kind)
        owners, boxes, labels, kinds = (torch.cat(x) for x in (owners, boxes, labels, kinds))
        pos, neg = self.sampler(kinds)
        keep = torch.cat([pos, neg])
        if not keep.numel():        # no box at all in the batch: nothing to learn, but a graph to backprop
            return {"loss_cls": self.classifier.weight.sum() * 0.0}
        n = len(inp.images)
        crops = torch.cat([self.warp(inp.image(i), boxes[keep][owners[keep] == i]) for i in range(n)])
        order = torch.cat([labels[keep][owners[keep] == i] for i in range(n)])
        logits = self.classifier(self.forward_regions(inp.backbone, crops)[1])
        return {"loss_cls": F.cross_entropy(logits, order)}

    def score(self, inp, proposals: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per image: SVM scores (or the fine-tuned softmax before stage 3) (R, C) and regressed boxes (R, C, 4)."""
        out = []
        for i, props in enumerate(proposals):
            pool5, fc7 = self.region_features(inp.backbone, inp.image(i), props)
            if inp.clock is not None:
                inp.clock.lap("features")      # R-CNN's feature stage is the CNN on every warp
            if self.svm.trained:
                scores = self.svm(self.svm_features(pool5, fc7))
            else:
                scores = F.softmax(self.classifier(fc7), dim=1)[:, 1:]
            if self.box_regressor.trained:
                boxes = self.box_regressor(pool5, props)
            else:
                boxes = props[:, None, :].expand(-1, self.num_classes, 4)
            out.append((scores, boxes))
            if inp.clock is not None:
                inp.clock.lap("head")
        return out


def region_features(model: nn.Module, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """pool5 (R, D5) and fc7 (R, D) of regions of a (3, H, W) [0, 1] image, for an R-CNN detector (stages 2-4)."""
    batch, _ = model.transform([image])
    return model.head.region_features(model.backbone, batch.tensor[0], boxes)
