"""Region Proposal Network (Faster R-CNN Sec. 3.1).

A 3x3 convolution slides over the shared feature map; two sibling 1x1
convolutions score each of the k anchors of a position as object / not object
and regress its box. Training labels come from :func:`anchor_targets` (the
paper's anchor target layer, Sec. 3.1.2), proposals from :meth:`RegionProposalNetwork.propose`
(its proposal layer: decode, clip, drop small boxes, top-k, NMS, top-k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, nms

from detect.anchors import AnchorGenerator
from detect.boxes import BoxCoder, clip_boxes
from detect.matching import FOREGROUND, IGNORE, BalancedSampler, Matcher


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 objectness (k) and delta (4k) convolutions (Sec. 3.1, Fig. 3).

    Args:
        in_channels: channels of the shared feature map.
        channels: width of the 3x3 "intermediate layer" (512 for VGG16, 256 for ZF).
        num_anchors: k, anchors per position.
    """

    def __init__(self, *, in_channels: int, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, 4 * num_anchors, 1)
        # Gaussian std 0.01, zero bias (Sec. 3.1.3).
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> objectness logits (N, H*W*k) and deltas (N, H*W*k, 4), anchor order.

        On a channels-last map (after ``prepare_for_inference``) the two sibling 1x1
        convolutions run as one matrix product over the positions, which lands both
        outputs in anchor order with no copy (oneDNN would send such narrow 1x1
        convolutions down its reference path and convert the layout both ways).
        """
        x = F.relu(self.conv(features))
        n, c, h, w = x.shape
        k = self.cls_logits.out_channels
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            weight = torch.cat([self.cls_logits.weight, self.bbox_pred.weight]).view(5 * k, c)
            bias = torch.cat([self.cls_logits.bias, self.bbox_pred.bias])
            out = F.linear(x.permute(0, 2, 3, 1).reshape(n, h * w, c), weight, bias)     # (N, H*W, 5k)
            return out[..., :k].reshape(n, -1), out[..., k:].reshape(n, -1, 4)
        logits = self.cls_logits(x).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.bbox_pred(x).view(n, k, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return logits, deltas


def rpn_loss(logits: Tensor, deltas: Tensor, labels: Tensor, target_deltas: Tensor, *,
             smooth_l1_beta: float = 1.0 / 9, box_loss_weight: float = 1.0) -> dict[str, Tensor]:
    """RPN multi-task loss (Faster R-CNN Eq. 1).

    Both terms are normalised by the number of sampled anchors (py-faster-rcnn's
    choice; the paper's N_reg ~ 2400 with lambda = 10 is about the same scale).

    Args:
        logits: (N, A) objectness logits.
        deltas: (N, A, 4) predicted deltas.
        labels: (N, A) FOREGROUND / BACKGROUND / IGNORE (not sampled).
        target_deltas: (N, A, 4) regression targets (used where labels == FOREGROUND).
        smooth_l1_beta: transition point of the smooth L1 (1/9 is py-faster-rcnn's sigma = 3).
        box_loss_weight: the paper's lambda relative to this normalisation.

    Returns:
        {"loss_rpn_cls", "loss_rpn_box"} scalars; zero when no anchor is sampled.
    """
    sampled = labels != IGNORE
    positive = labels == FOREGROUND
    count = sampled.sum().clamp(min=1)
    loss_cls = F.binary_cross_entropy_with_logits(logits[sampled], positive[sampled].to(logits.dtype),
                                                  reduction="sum") / count
    loss_box = F.smooth_l1_loss(deltas[positive], target_deltas[positive], beta=smooth_l1_beta,
                                reduction="sum") / count
    return {"loss_rpn_cls": loss_cls, "loss_rpn_box": box_loss_weight * loss_box}


class RegionProposalNetwork(nn.Module):
    """Anchors + RPN head + anchor targets + proposal layer.

    Args:
        head: the RPN head.
        anchor_generator: anchors over the feature grid (k must match the head).
        matcher: anchor labelling (paper: IoU >= 0.7 positive, < 0.3 negative, best anchors positive).
        sampler: 256 anchors per image, at most half positive.
        box_coder: delta parameterisation (weights 1, 1, 1, 1).
        allowed_border: training ignores anchors reaching more than this many pixels outside
            the image (Sec. 3.3); negative keeps all.
        pre_nms_top_n, post_nms_top_n: (train, test) proposal counts before / after NMS.
        nms_thresh: NMS IoU threshold on proposals.
        min_size: proposals narrower or shorter than this (network-input pixels) are dropped.
        smooth_l1_beta, box_loss_weight: see :func:`rpn_loss`.
    """

    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, matcher: Matcher,
                 sampler: BalancedSampler, box_coder: BoxCoder, allowed_border: float = 0.0,
                 pre_nms_top_n: tuple[int, int] = (12000, 6000), post_nms_top_n: tuple[int, int] = (2000, 300),
                 nms_thresh: float = 0.7, min_size: float = 16.0, smooth_l1_beta: float = 1.0 / 9,
                 box_loss_weight: float = 1.0) -> None:
        super().__init__()
        if head.cls_logits.out_channels != anchor_generator.num_anchors:
            raise ValueError(f"RPN head predicts {head.cls_logits.out_channels} anchors per position, "
                             f"the anchor generator makes {anchor_generator.num_anchors}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.allowed_border = allowed_border
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight

    loss_names = ("loss_rpn_cls", "loss_rpn_box")

    def run(self, inp, *, training: bool, with_loss: bool = False) -> tuple[list[Tensor], list[Tensor] | None, dict]:
        """The proposal stage of :class:`detect.detector.Detector`: (boxes, objectness scores, losses).

        Boxes are in network-input pixels; ``with_loss`` (training) also computes this stage's losses
        against ``inp.targets``, and its proposals are then detached and without scores.
        """
        if with_loss:
            losses, boxes = self.loss(inp.features, inp.batch.image_sizes, [t["boxes"] for t in inp.targets])
            return boxes, None, losses
        boxes, scores = self.predict(inp.features, inp.batch.image_sizes, training=training)
        return boxes, scores, {}

    def loss(self, features: Tensor, image_sizes: list[tuple[int, int]],
             gt_boxes: list[Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Training step: losses and the proposals for the RoI head.

        Args:
            features: (N, C, H, W) shared feature map.
            image_sizes: (h, w) of each image inside the padded batch.
            gt_boxes: N tensors (G_i, 4) in network-input pixels.

        Returns:
            {"loss_rpn_cls", "loss_rpn_box"} and N proposal tensors (P_i, 4), detached.
        """
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(features.shape[-2], features.shape[-1])
        labels, target_deltas = self.anchor_targets(anchors, image_sizes, gt_boxes)
        losses = rpn_loss(logits, deltas, labels, target_deltas, smooth_l1_beta=self.smooth_l1_beta,
                          box_loss_weight=self.box_loss_weight)
        # Approximate joint training (Sec. 3.2): no gradient through the proposal coordinates.
        proposals, _ = self.propose(logits.detach(), deltas.detach(), anchors, image_sizes, training=True)
        return losses, proposals

    def predict(self, features: Tensor, image_sizes: list[tuple[int, int]], *,
                training: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals: N boxes (P_i, 4) and N objectness probabilities (P_i,), best first.

        ``training`` picks the training top-k counts (for a head trained on this RPN's output).
        """
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(features.shape[-2], features.shape[-1])
        return self.propose(logits, deltas, anchors, image_sizes, training=training)

    @torch.no_grad()
    def anchor_targets(self, anchors: Tensor, image_sizes: list[tuple[int, int]],
                       gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The anchor target layer: sampled labels and regression targets (Sec. 3.1.2, 3.1.3).

        Args:
            anchors: (A, 4) anchors shared by the batch.
            image_sizes: (h, w) per image.
            gt_boxes: N tensors (G_i, 4).

        Returns:
            labels (N, A) FOREGROUND / BACKGROUND / IGNORE;
            target deltas (N, A, 4), zero except at the sampled positives.
        """
        all_labels, all_targets = [], []
        for (h, w), gt in zip(image_sizes, gt_boxes):
            inside = torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
            if self.allowed_border >= 0:
                b = self.allowed_border
                inside = ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
                          & (anchors[:, 2] <= w + b) & (anchors[:, 3] <= h + b))
                if not inside.any():
                    # An image smaller than every anchor would get no training signal at all.
                    inside = torch.ones_like(inside)
            # -1: never matched, never the "best anchor" of a box.
            iou = torch.where(inside[None], box_iou(gt, anchors), -1.0)
            matched, labels = self.matcher(iou)
            labels[~inside] = IGNORE
            labels = self.sampler.sample_labels(labels)
            targets = torch.zeros_like(anchors)
            positive = torch.nonzero(labels == FOREGROUND).squeeze(1)
            if positive.numel():     # only positives are regressed: encode ~128, not ~20k
                targets[positive] = self.box_coder.encode(gt[matched[positive]], anchors[positive])
            all_labels.append(labels)
            all_targets.append(targets)
        return torch.stack(all_labels), torch.stack(all_targets)

    def propose(self, logits: Tensor, deltas: Tensor, anchors: Tensor, image_sizes: list[tuple[int, int]],
                *, training: bool) -> tuple[list[Tensor], list[Tensor]]:
        """The proposal layer (Sec. 3.3): top-k by objectness, decode, clip, drop small, NMS, top-k.

        Args:
            logits: (N, A) objectness logits.
            deltas: (N, A, 4) predicted deltas.
            anchors: (A, 4).
            image_sizes: (h, w) per image.
            training: choose the train or test top-k counts.

        Returns:
            N proposal tensors (P_i, 4) and N score tensors (P_i,) (sigmoid objectness), best first.
        """
        pre_n = min(self.pre_nms_top_n[0 if training else 1], logits.shape[1])
        post_n = self.post_nms_top_n[0 if training else 1]
        # Top-k first: decoding 20k anchors per image to keep 6k is wasted work.
        top_logits, top_idx = logits.topk(pre_n, dim=1)
        boxes = self.box_coder.decode(deltas.gather(1, top_idx[..., None].expand(-1, -1, 4)), anchors[top_idx])
        sizes = torch.as_tensor(image_sizes, device=boxes.device)
        boxes = clip_boxes(boxes, sizes[:, 0], sizes[:, 1])
        scores = torch.sigmoid(top_logits)
        wide = boxes[..., 2] - boxes[..., 0] >= self.min_size
        tall = boxes[..., 3] - boxes[..., 1] >= self.min_size
        keep_size = wide & tall
        proposals, proposal_scores = [], []
        for img_boxes, img_scores, img_keep in zip(boxes, scores, keep_size):
            img_boxes, img_scores = img_boxes[img_keep], img_scores[img_keep]
            keep = top_nms(img_boxes, img_scores, self.nms_thresh, post_n)
            proposals.append(img_boxes[keep])
            proposal_scores.append(img_scores[keep])
        return proposals, proposal_scores


def top_nms(boxes: Tensor, scores: Tensor, iou_thresh: float, top_n: int) -> Tensor:
    """``nms(boxes, scores, iou_thresh)[:top_n]``, usually at a fraction of the cost.

    Greedy NMS decides box i from the boxes scoring above it only, so the first
    ``top_n`` survivors among the best ``m`` boxes are the first ``top_n`` survivors
    of all of them. NMS on the best ``3 * top_n`` boxes is tried first (its cost grows
    with boxes x survivors); only when fewer than ``top_n`` survive does it run on all.
    (Boxes whose scores tie exactly across the cut may come out in another order.)

    Args:
        boxes: (P, 4) boxes sorted by descending score.
        scores: (P,) scores, sorted.
    """
    head = 3 * top_n
    if boxes.shape[0] > head:
        keep = nms(boxes[:head], scores[:head], iou_thresh)
        if keep.numel() >= top_n:
            return keep[:top_n]
    return nms(boxes, scores, iou_thresh)[:top_n]

