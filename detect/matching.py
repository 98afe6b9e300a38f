"""Assigning boxes to ground truth and sampling balanced minibatches.

Both the RPN (Faster R-CNN Sec. 3.1.2: IoU > 0.7 positive, < 0.3 negative,
plus each ground truth's best anchors) and the Fast R-CNN head (Fast R-CNN
Sec. 2.3: IoU >= 0.5 foreground, [0.1, 0.5) background) label candidate boxes
by their best IoU with the ground truth, then sample a fixed number per image
with a bounded foreground fraction. IoU itself is ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


class Matcher:
    """Label each candidate box foreground, background or ignored from its best IoU.

    Args:
        fg_iou_thresh: best IoU >= this is foreground.
        bg_iou_thresh_hi: best IoU < this (and >= ``bg_iou_thresh_lo``) is background.
        bg_iou_thresh_lo: best IoU below this is ignored (Fast R-CNN uses 0.1; 0 keeps all).
        allow_low_quality_matches: also make each ground truth's highest-IoU candidates
            foreground, so a box no anchor covers at 0.7 still gets one (Faster R-CNN Sec. 3.1.2).
    """

    def __init__(self, *, fg_iou_thresh: float, bg_iou_thresh_hi: float, bg_iou_thresh_lo: float = 0.0,
                 allow_low_quality_matches: bool = False) -> None:
        if not bg_iou_thresh_lo <= bg_iou_thresh_hi <= fg_iou_thresh:
            raise ValueError("IoU thresholds must satisfy bg_lo <= bg_hi <= fg, got "
                             f"{bg_iou_thresh_lo}, {bg_iou_thresh_hi}, {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh_hi = bg_iou_thresh_hi
        self.bg_iou_thresh_lo = bg_iou_thresh_lo
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Match candidates to ground truth.

        Args:
            iou: (G, A) IoU of G ground-truth boxes with A candidates. Entries set
                to -1 mark candidates that must be ignored (e.g. anchors across the border).

        Returns:
            matched: (A,) int64 index of each candidate's best ground truth (0 when G == 0).
            labels: (A,) int64 with FOREGROUND, BACKGROUND or IGNORE.
        """
        num_gt, num_boxes = iou.shape
        if num_gt == 0:
            # An image without objects: every candidate is a negative example.
            zeros = torch.zeros(num_boxes, dtype=torch.int64, device=iou.device)
            return zeros, zeros.clone()
        best_iou, matched = iou.max(dim=0)
        labels = torch.full((num_boxes,), IGNORE, dtype=torch.int64, device=iou.device)
        labels[(best_iou >= self.bg_iou_thresh_lo) & (best_iou < self.bg_iou_thresh_hi)] = BACKGROUND
        labels[best_iou >= self.fg_iou_thresh] = FOREGROUND
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=1, keepdim=True).values
            # Ties count (the paper's "anchor/anchors"); a ground truth that overlaps
            # nothing must not turn every zero-IoU anchor positive.
            is_best = (iou == gt_best) & (gt_best > 0)
            labels[is_best.any(dim=0)] = FOREGROUND
        return matched, labels


class BalancedSampler:
    """Sample at most ``batch_size_per_image`` candidates with a bounded foreground fraction.

    When there are too few foreground candidates the rest of the batch is filled
    with background (Faster R-CNN Sec. 3.1.3; Fast R-CNN Sec. 2.3).

    Args:
        batch_size_per_image: candidates sampled per image (RPN 256, RoI head 128).
        positive_fraction: upper bound on the foreground share (RPN 0.5, RoI head 0.25).
    """

    def __init__(self, *, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image < 1 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"sampler needs batch_size_per_image >= 1 and 0 <= positive_fraction <= 1, "
                             f"got {batch_size_per_image}, {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Pick candidates from one image.

        Args:
            labels: (A,) FOREGROUND / BACKGROUND / IGNORE per candidate.

        Returns:
            positive, negative: int64 indices into ``labels`` of the sampled candidates.
        """
        positive = torch.nonzero(labels == FOREGROUND).squeeze(1)
        negative = torch.nonzero(labels == BACKGROUND).squeeze(1)
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
        negative = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
        return positive, negative

    def sample_labels(self, labels: Tensor) -> Tensor:
        """(A,) labels where the candidates not sampled become IGNORE."""
        positive, negative = self(labels)
        out = torch.full_like(labels, IGNORE)
        out[positive] = FOREGROUND
        out[negative] = BACKGROUND
        return out


def label_candidates(matcher: Matcher, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *,
                     add_gt: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The proposal target layer's labelling, shared by the RoI head and R-CNN's fine-tuning.

    Args:
        matcher: the IoU rule (foreground, background, ignored).
        proposals: (P, 4) candidate boxes.
        gt_boxes: (G, 4) ground truth in the same pixels; gt_labels: (G,) 0-based classes.
        add_gt: append the ground-truth boxes to the candidates (py-faster-rcnn and R-CNN do).

    Returns:
        candidates (P', 4), kind (P',) FOREGROUND / BACKGROUND / IGNORE, matched (P',) index of the
        best ground truth, labels (P',) in [0, C]: the matched class + 1 for foreground, 0 otherwise.
    """
    gt_boxes = gt_boxes.to(proposals.dtype)
    candidates = torch.cat([proposals, gt_boxes]) if add_gt else proposals
    matched, kind = matcher(box_iou(gt_boxes, candidates))
    labels = torch.zeros(len(candidates), dtype=torch.int64, device=candidates.device)
    if gt_boxes.numel():
        fg = kind == FOREGROUND
        labels[fg] = gt_labels.to(candidates.device)[matched[fg]] + 1
    return candidates, kind, matched, labels
