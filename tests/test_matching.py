"""Matcher labels and balanced-sampler counts on hand-made IoU matrices."""

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
