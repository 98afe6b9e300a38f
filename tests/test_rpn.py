"""RPN: head layout, loss on hand-made cases, anchor targets (border, best anchor, counts), proposal layer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detect.anchors import AnchorGenerator
from detect.boxes import BoxCoder
from detect.matching import BACKGROUND, FOREGROUND, IGNORE, BalancedSampler, Matcher
from detect.rpn import RegionProposalNetwork, RPNHead, rpn_loss


def make_rpn(*, sizes=(32.0,), ratios=(1.0,), stride=16, batch=256, allowed_border=0.0, min_size=0.0,
             pre=(100, 100), post=(50, 50), nms=0.7) -> RegionProposalNetwork:
    gen = AnchorGenerator(sizes=sizes, ratios=ratios, stride=stride)
    return RegionProposalNetwork(
        head=RPNHead(in_channels=8, channels=8, num_anchors=gen.num_anchors), anchor_generator=gen,
        matcher=Matcher(fg_iou_thresh=0.7, bg_iou_thresh_hi=0.3, allow_low_quality_matches=True),
        sampler=BalancedSampler(batch_size_per_image=batch, positive_fraction=0.5), box_coder=BoxCoder(),
        allowed_border=allowed_border, pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=nms, min_size=min_size)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_head_outputs_follow_anchor_order(memory_format):
    head = RPNHead(in_channels=4, channels=6, num_anchors=3)
    for layer in (head.cls_logits, head.bbox_pred):
        nn.init.normal_(layer.bias)
    features = torch.rand(2, 4, 5, 7)
    logits, deltas = head.to(memory_format=memory_format)(features.contiguous(memory_format=memory_format))
    assert logits.shape == (2, 5 * 7 * 3) and deltas.shape == (2, 5 * 7 * 3, 4)
    raw_logits = head.cls_logits(F.relu(head.conv(features)))        # (N, k, H, W)
    raw_deltas = head.bbox_pred(F.relu(head.conv(features)))         # (N, 4k, H, W)
    y, x, a = 3, 5, 2
    index = (y * 7 + x) * 3 + a
    assert torch.allclose(logits[1, index], raw_logits[1, a, y, x])
    assert torch.allclose(deltas[1, index], raw_deltas[1, 4 * a:4 * a + 4, y, x])


def test_rpn_loss_hand_made():
    logits = torch.zeros(1, 4, requires_grad=True)
    deltas = torch.zeros(1, 4, 4, requires_grad=True)
    labels = torch.tensor([[FOREGROUND, BACKGROUND, IGNORE, BACKGROUND]])
    targets = torch.zeros(1, 4, 4)
    targets[0, 0] = torch.tensor([0.5, 0.0, 0.0, 2.0])
    losses = rpn_loss(logits, deltas, labels, targets, smooth_l1_beta=1.0)
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2.0))
    # smooth L1: 0.5 * 0.5**2 + (2 - 0.5) = 1.625, over 3 sampled anchors
    assert losses["loss_rpn_box"].item() == pytest.approx(1.625 / 3)
    sum(losses.values()).backward()
    assert logits.grad[0, 2] == 0 and deltas.grad[0, 1].abs().sum() == 0


def test_rpn_loss_with_nothing_sampled_is_zero_not_nan():
    logits = torch.zeros(1, 3, requires_grad=True)
    losses = rpn_loss(logits, torch.zeros(1, 3, 4), torch.full((1, 3), IGNORE), torch.zeros(1, 3, 4))
    assert losses["loss_rpn_cls"].item() == 0 and losses["loss_rpn_box"].item() == 0
    losses["loss_rpn_cls"].backward()


def test_anchor_targets_ignore_border_and_keep_best_anchor():
    torch.manual_seed(0)
    rpn = make_rpn(sizes=(32.0,), stride=16)
    anchors = rpn.anchor_generator(4, 4)            # 16 anchors of 32 x 32 centred at 8, 24, 40, 56
    gt = [torch.tensor([[20.0, 20.0, 44.0, 44.0]])]   # best IoU 24^2/32^2 = 0.5625 < 0.7
    labels, targets = rpn.anchor_targets(anchors, [(64, 64)], gt)
    labels = labels[0].view(4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True                          # only centres 24 and 40 keep a 32-px anchor in the image
    assert (labels[~inside] == IGNORE).all()
    assert labels[1, 1] == FOREGROUND and labels[2, 2] == FOREGROUND   # best anchors, tied
    assert (labels[inside] != IGNORE).all()
    expected = BoxCoder().encode(gt[0], anchors[5:6])[0]
    assert torch.allclose(targets[0, 5], expected)
    keep_all = make_rpn(sizes=(32.0,), allowed_border=-1)
    labels_all, _ = keep_all.anchor_targets(anchors, [(64, 64)], gt)
    assert (labels_all != IGNORE).all()


def test_anchor_targets_sample_counts_and_empty_images():
    torch.manual_seed(0)
    rpn = make_rpn(sizes=(16.0, 32.0), ratios=(0.5, 1.0, 2.0), stride=4, batch=64)
    anchors = rpn.anchor_generator(32, 32)
    gt = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 20.0, 100.0, 40.0]]), torch.zeros(0, 4)]
    labels, _ = rpn.anchor_targets(anchors, [(128, 128), (128, 128)], gt)
    assert (labels[0] != IGNORE).sum() == 64 and 0 < (labels[0] == FOREGROUND).sum() <= 32
    assert (labels[1] == FOREGROUND).sum() == 0 and (labels[1] == BACKGROUND).sum() == 64


def test_tiny_image_still_gets_training_anchors():
    rpn = make_rpn(sizes=(128.0,), stride=16)
    anchors = rpn.anchor_generator(1, 1)
    gt = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    labels, targets = rpn.anchor_targets(anchors, [(10, 10)], [gt])
    # the one anchor crosses the border but is the object's best: it trains, towards the object
    assert labels.tolist() == [[FOREGROUND]]
    assert torch.allclose(targets[0], BoxCoder().encode(gt, anchors))


def test_proposal_layer_clips_filters_and_suppresses():
    rpn = make_rpn(sizes=(32.0,), stride=16, min_size=10.0, pre=(3, 3), post=(2, 2), nms=0.5)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 34.0, 34.0], [40.0, 40.0, 44.0, 44.0],
                            [30.0, 0.0, 62.0, 32.0], [-20.0, 0.0, 12.0, 32.0]])
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    boxes, scores = rpn.propose(logits, torch.zeros(1, 5, 4), anchors, [(48, 48)], training=False)
    # top-3: anchors 0, 1, 2; 1 overlaps 0 (suppressed); 2 is 4 px (dropped); so only anchor 0 survives
    assert boxes[0].tolist() == [[0.0, 0.0, 32.0, 32.0]]
    assert scores[0].tolist() == pytest.approx([torch.sigmoid(torch.tensor(5.0)).item()])
    rpn.pre_nms_top_n = (5, 5)
    boxes, _ = rpn.propose(logits, torch.zeros(1, 5, 4), anchors, [(48, 48)], training=True)
    assert boxes[0].tolist() == [[0.0, 0.0, 32.0, 32.0], [30.0, 0.0, 48.0, 32.0]]   # clipped to the image
