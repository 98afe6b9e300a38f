"""Fast R-CNN RoI head (Fast R-CNN Sec. 2), usable with any proposal source.

Each proposal is pooled to a fixed grid from the shared feature map (RoIPool,
Sec. 2.1, or RoIAlign), passed through the backbone's per-RoI layers, and two
sibling layers give C+1 class scores (index 0 is background) and
class-specific box deltas. Training samples 128 RoIs per image, 25% foreground
(IoU >= 0.5) and background from IoU [0.1, 0.5) (Sec. 2.3). The same head
serves Faster R-CNN (RPN proposals) and Fast R-CNN (stored selective search).

Labels leave this module 0-based without background, like the rest of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import RoIAlign, RoIPool

from detect.boxes import BoxCoder
from detect.matching import BalancedSampler, Matcher, label_candidates


class FastRCNNPredictor(nn.Module):
    """Sibling output layers: class scores (C+1) and class-specific deltas (4(C+1)) (Sec. 2.2).

    Args:
        in_channels: length of the per-RoI vector.
        num_classes: C, object classes without background.
    """

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 * (num_classes + 1))
        # Zero-mean Gaussians with std 0.01 and 0.001 (Sec. 2.2).
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, D) -> class logits (R, C+1), deltas (R, 4(C+1))."""
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(class_logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor, *,
                   smooth_l1_beta: float = 1.0) -> dict[str, Tensor]:
    """Fast R-CNN multi-task loss (Eq. 1): log loss over C+1 classes + smooth L1 on the true class's deltas.

    Both terms are averaged over the sampled RoIs (py-faster-rcnn), so background
    RoIs dilute the box loss as the paper's Iverson bracket does.

    Args:
        class_logits: (R, C+1).
        deltas: (R, 4(C+1)) class-specific deltas.
        labels: (R,) int64 in [0, C], 0 = background.
        target_deltas: (R, 4) targets for the RoI's true class.
        smooth_l1_beta: smooth L1 transition point (1 in Fast R-CNN).

    Returns:
        {"loss_cls", "loss_box"}; both zero when R == 0.
    """
    count = max(labels.numel(), 1)
    loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / count
    fg = torch.nonzero(labels > 0).squeeze(1)
    fg_deltas = deltas.reshape(deltas.shape[0], class_logits.shape[1], 4)[fg, labels[fg]]
    loss_box = F.smooth_l1_loss(fg_deltas, target_deltas[fg], beta=smooth_l1_beta, reduction="sum") / count
    return {"loss_cls": loss_cls, "loss_box": loss_box}


class RoIHead(nn.Module):
    """RoI pooling + per-RoI layers + predictor, with training-time sampling; a head of :class:`detect.detector.Detector`.

    Args:
        pooler: ``torchvision.ops.RoIPool`` or ``RoIAlign`` with the backbone's spatial scale.
        box_head: (R, C_feat, s, s) -> (R, D), the backbone's per-RoI layers.
        predictor: D -> class logits and deltas.
        matcher: proposal labelling (fg >= 0.5, bg in [0.1, 0.5)).
        sampler: 128 RoIs per image, at most 25% foreground.
        box_coder: delta parameterisation (weights 10, 10, 5, 5).
        add_gt_as_proposals: add ground truth to the training proposals (py-faster-rcnn does).
        score_thresh: detections scoring below this are dropped.
        nms_thresh: per-class NMS IoU threshold (0.3 in the paper's test code).
        detections_per_img: keep at most this many detections per image.
        smooth_l1_beta: see :func:`fast_rcnn_loss`.
    """

    uses_feature_map = True                  # pools RoIs from the backbone's map of the whole image
    loss_names = ("loss_cls", "loss_box")

    def __init__(self, *, pooler: RoIPool | RoIAlign, box_head: nn.Module, predictor: FastRCNNPredictor,
                 matcher: Matcher, sampler: BalancedSampler, box_coder: BoxCoder, add_gt_as_proposals: bool = True,
                 score_thresh: float = 0.05, nms_thresh: float = 0.3, detections_per_img: int = 100,
                 smooth_l1_beta: float = 1.0) -> None:
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.add_gt_as_proposals = add_gt_as_proposals
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.smooth_l1_beta = smooth_l1_beta

    @property
    def num_classes(self) -> int:
        """C, object classes without background."""
        return self.predictor.cls_score.out_features - 1

    def forward(self, features: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Score RoIs: N tensors (R_i, 4) -> class logits (sum R_i, C+1), deltas (sum R_i, 4(C+1))."""
        pooled = self.pooler(features, [r.to(features.dtype) for r in rois])
        return self.predictor(self.box_head(pooled))

    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], Tensor, Tensor]:
        """The proposal target layer: label, sample and set regression targets for each image's RoIs.

        Args:
            proposals: N tensors (P_i, 4).
            targets: N dicts with "boxes" (G_i, 4) and 0-based "labels" (G_i,).

        Returns:
            sampled RoIs (N tensors (R_i, 4)), labels (sum R_i,) in [0, C] with 0 background,
            target deltas (sum R_i, 4).
        """
        rois, labels, deltas = [], [], []
        for props, target in zip(proposals, targets):
            gt = target["boxes"].to(props.dtype)
            props, kind, matched, cand_labels = label_candidates(self.matcher, props, gt, target["labels"],
                                                                 add_gt=self.add_gt_as_proposals)
            pos, neg = self.sampler(kind)
            keep = torch.cat([pos, neg])
            img_deltas = torch.zeros(keep.numel(), 4, dtype=props.dtype, device=props.device)
            if gt.numel():
                img_deltas[: pos.numel()] = self.box_coder.encode(gt[matched[pos]], props[pos])
            rois.append(props[keep])
            labels.append(cand_labels[keep])
            deltas.append(img_deltas)
        return rois, torch.cat(labels), torch.cat(deltas)

    def loss(self, inp, proposals: list[Tensor]) -> dict[str, Tensor]:
        """Sample RoIs from the proposals and return {"loss_cls", "loss_box"}.

        Args:
            inp: the batch (:class:`detect.detector.Inputs`): its feature map and targets in network pixels.
            proposals: N tensors (P_i, 4) in network-input pixels (any source).
        """
        rois, labels, target_deltas = self.sample_proposals(proposals, inp.targets)
        class_logits, deltas = self(inp.features, rois)
        return fast_rcnn_loss(class_logits, deltas, labels, target_deltas, smooth_l1_beta=self.smooth_l1_beta)

    def score(self, inp, proposals: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per image: class probabilities (R_i, C) and class-specific decoded boxes (R_i, C, 4), background dropped.

        Boxes are in network-input pixels, not clipped (see :func:`detect.postprocess.select_detections`).
        """
        class_logits, deltas = self(inp.features, proposals)
        probs = F.softmax(class_logits, dim=-1)
        counts = [p.shape[0] for p in proposals]
        boxes = self.box_coder.decode(deltas, torch.cat(proposals).to(deltas.dtype))
        boxes = boxes.view(deltas.shape[0], class_logits.shape[1], 4)
        return [(p[:, 1:], b[:, 1:]) for p, b in zip(probs.split(counts), boxes.split(counts))]
