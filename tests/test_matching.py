"""Matcher labels and balanced-sampler counts on hand-made IoU matrices."""

import pytest
import torch

from detect.matching import BACKGROUND, FOREGROUND, IGNORE, BalancedSampler, Matcher


def test_rpn_thresholds_and_best_anchor_rule():
    iou = torch.tensor([[0.80, 0.50, 0.20, 0.00, 0.10],
                        [0.10, 0.40, 0.25, 0.00, 0.40]])
    matcher = Matcher(fg_iou_thresh=0.7, bg_iou_thresh_hi=0.3, allow_low_quality_matches=True)
    matched, labels = matcher(iou)
    # anchor 1: 0.5 is between thresholds, but it is gt 1's best (tied with anchor 4): positive
    assert labels.tolist() == [FOREGROUND, FOREGROUND, BACKGROUND, BACKGROUND, FOREGROUND]
    assert matched.tolist() == [0, 0, 1, 0, 1]
    _, strict = Matcher(fg_iou_thresh=0.7, bg_iou_thresh_hi=0.3)(iou)
    assert strict.tolist() == [FOREGROUND, IGNORE, BACKGROUND, BACKGROUND, IGNORE]


def test_fast_rcnn_background_window_and_ignored_entries():
    iou = torch.tensor([[0.55, 0.30, 0.05, -1.0]])
    _, labels = Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5, bg_iou_thresh_lo=0.1)(iou)
    assert labels.tolist() == [FOREGROUND, BACKGROUND, IGNORE, IGNORE]


def test_gt_overlapping_nothing_does_not_make_everything_positive():
    iou = torch.tensor([[0.0, 0.0, 0.0]])
    _, labels = Matcher(fg_iou_thresh=0.7, bg_iou_thresh_hi=0.3, allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [BACKGROUND] * 3


def test_no_ground_truth_means_all_background():
    matched, labels = Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5, bg_iou_thresh_lo=0.1)(torch.zeros(0, 4))
    assert labels.tolist() == [BACKGROUND] * 4 and matched.tolist() == [0] * 4


def test_sampler_counts():
    torch.manual_seed(0)
    labels = torch.cat([torch.ones(1000), torch.zeros(1000), torch.full((500,), -1.0)]).long()
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    assert pos.numel() == 128 and neg.numel() == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert torch.unique(pos).numel() == 128
    few = torch.cat([torch.ones(10), torch.zeros(1000)]).long()
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(few)
    assert pos.numel() == 10 and neg.numel() == 246
    sampled = BalancedSampler(batch_size_per_image=128, positive_fraction=0.25).sample_labels(labels)
    assert (sampled == FOREGROUND).sum() == 32 and (sampled == BACKGROUND).sum() == 96
    assert (sampled[2000:] == IGNORE).all()


def test_thresholds_are_inclusive_exactly_where_the_papers_say():
    # Found by mutation testing: ">= fg" -> "> fg" and "< bg_hi" -> "<= bg_hi" both passed the suite.
    # 0.75 and 0.25 are exact in float32, so the boundary itself is tested.
    iou = torch.tensor([[0.75, 0.7499, 0.25, 0.2499]])
    _, labels = Matcher(fg_iou_thresh=0.75, bg_iou_thresh_hi=0.25)(iou)
    assert labels.tolist() == [FOREGROUND, IGNORE, IGNORE, BACKGROUND]
    # bg_lo == bg_hi is allowed (no background window): only foreground and ignored remain
    _, labels = Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.25, bg_iou_thresh_lo=0.25)(iou)
    assert labels.tolist() == [FOREGROUND, FOREGROUND, IGNORE, IGNORE]


def test_matches_and_labels_are_int64_index_tensors():
    # Found by mutation testing: dropping dtype=torch.int64 from the no-ground-truth branch gave float
    # zeros, which .tolist() == [0, ...] cannot tell apart and which fail as indices downstream.
    matcher = Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5)
    for iou in (torch.zeros(0, 3), torch.tensor([[0.9, 0.1, 0.6]])):
        matched, labels = matcher(iou)
        assert matched.dtype == torch.int64 and labels.dtype == torch.int64


def test_invalid_arguments_are_errors():
    # Found by mutation testing: the messages and the sampler's bounds (batch 1 and fractions 0 and 1
    # allowed; batch 0 or fraction above 1 refused) were never checked.
    with pytest.raises(ValueError, match="IoU thresholds must satisfy bg_lo <= bg_hi <= fg, got 0.0, 0.7, 0.3"):
        Matcher(fg_iou_thresh=0.3, bg_iou_thresh_hi=0.7)
    for batch, fraction in ((0, 0.5), (128, 1.5), (128, -0.1)):
        with pytest.raises(ValueError, match=f"sampler needs batch_size_per_image >= 1 .* got {batch}, {fraction}"):
            BalancedSampler(batch_size_per_image=batch, positive_fraction=fraction)


def test_sampler_at_its_extreme_arguments():
    labels = torch.tensor([FOREGROUND] * 6 + [BACKGROUND] * 6)
    pos, neg = BalancedSampler(batch_size_per_image=1, positive_fraction=1.0)(labels)
    assert pos.numel() == 1 and neg.numel() == 0 and labels[pos].tolist() == [FOREGROUND]
    pos, neg = BalancedSampler(batch_size_per_image=8, positive_fraction=0.0)(labels)
    assert pos.numel() == 0 and neg.numel() == 6            # the batch is filled with the negatives there are
    pos, neg = BalancedSampler(batch_size_per_image=8, positive_fraction=1.0)(labels)
    assert pos.numel() == 6 and neg.numel() == 2
