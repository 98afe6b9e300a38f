"""RoI head: Fast R-CNN loss on hand-made cases, proposal sampling, inference post-processing."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops import RoIPool

from detect.boxes import BoxCoder
from detect.matching import BalancedSampler, Matcher
from detect.roi_heads import FastRCNNPredictor, RoIHead, fast_rcnn_loss
from tests.head_helpers import head_detections, head_loss


def make_head(num_classes=3, batch=128, fraction=0.25, channels=4, size=2, **kw) -> RoIHead:
    torch.manual_seed(0)
    return RoIHead(pooler=RoIPool(output_size=(size, size), spatial_scale=1.0),
                   box_head=nn.Flatten(), predictor=FastRCNNPredictor(in_channels=channels * size * size,
                                                                        num_classes=num_classes),
                   matcher=Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5, bg_iou_thresh_lo=0.1),
                   sampler=BalancedSampler(batch_size_per_image=batch, positive_fraction=fraction),
                   box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)), **kw)


def test_fast_rcnn_loss_hand_made():
    logits = torch.zeros(3, 4, requires_grad=True)
    deltas = torch.zeros(3, 16, requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    targets = torch.tensor([[0.0, 0.0, 3.0, 0.0], [9.0, 9.0, 9.0, 9.0], [0.5, 0.0, 0.0, 0.0]])
    losses = fast_rcnn_loss(logits, deltas, labels, targets, smooth_l1_beta=1.0)
    assert losses["loss_cls"].item() == pytest.approx(math.log(4.0))
    # fg RoIs only: (3 - 0.5) + 0.5 * 0.5**2 = 2.625, averaged over all 3 RoIs
    assert losses["loss_box"].item() == pytest.approx(2.625 / 3)
    losses["loss_box"].backward()
    grad = deltas.grad.view(3, 4, 4)
    assert grad[0, 2].abs().sum() > 0 and grad[0, 1].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_fast_rcnn_loss_without_rois_is_zero():
    losses = fast_rcnn_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 16), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, 4))
    assert losses["loss_cls"].item() == 0 and losses["loss_box"].item() == 0


def test_sampling_counts_labels_and_targets():
    torch.manual_seed(0)
    head = make_head(batch=16, fraction=0.25)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    near = gt + torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    proposals = [torch.cat([near.repeat(10, 1), torch.tensor([[25.0, 25.0, 65.0, 65.0]]).repeat(30, 1),
                            torch.tensor([[200.0, 200.0, 240.0, 240.0]]).repeat(5, 1)])]
    rois, labels, targets = head.sample_proposals(proposals, [{"boxes": gt, "labels": torch.tensor([2])}])
    assert rois[0].shape == (16, 4)
    assert (labels == 3).sum() == 4 and (labels == 0).sum() == 12           # 25% of 16, label 2 -> 3
    assert not any(r.tolist() == [200.0, 200.0, 240.0, 240.0] for r in rois[0])  # IoU 0 < 0.1: ignored
    fg = labels > 0
    expected = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(gt.expand(int(fg.sum()), 4), rois[0][fg])
    assert torch.allclose(targets[fg], expected)
    assert (targets[~fg] == 0).all()


def test_ground_truth_joins_the_proposals_and_empty_images_are_all_background():
    head = make_head()
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    rois, labels, _ = head.sample_proposals([torch.zeros(0, 4)], [{"boxes": gt, "labels": torch.tensor([0])}])
    assert rois[0].tolist() == gt.tolist() and labels.tolist() == [1]
    rois, labels, targets = head.sample_proposals([torch.tensor([[0.0, 0.0, 8.0, 8.0], [5.0, 5.0, 9.0, 9.0]])],
                                                  [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert labels.tolist() == [0, 0] and (targets == 0).all()
    losses = head_loss(head, torch.rand(1, 4, 16, 16), rois, [{"boxes": torch.zeros(0, 4),
                                                               "labels": torch.zeros(0, dtype=torch.long)}])
    assert losses["loss_box"].item() == 0 and math.isfinite(losses["loss_cls"].item())


def test_predict_decodes_clips_thresholds_and_suppresses():
    head = make_head(num_classes=2, score_thresh=0.3, nms_thresh=0.3, detections_per_img=10)
    with torch.no_grad():
        head.predictor.cls_score.weight.zero_()
        head.predictor.cls_score.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))   # class 0 (index 1) wins
        head.predictor.bbox_pred.weight.zero_()
        head.predictor.bbox_pred.bias.zero_()
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 40.0, 40.0]]),
                 torch.tensor([[5.0, 5.0, 60.0, 60.0]])]
    dets = head_detections(head, torch.rand(2, 4, 64, 64), proposals, [(64, 64), (30, 50)])
    assert dets[0]["labels"].tolist() == [0, 0]                # background never returned, labels 0-based
    assert dets[0]["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]   # NMS drops the twin
    assert dets[1]["boxes"].tolist() == [[5.0, 5.0, 50.0, 30.0]]                            # clipped to 50 x 30
    probs = torch.softmax(torch.tensor([0.0, 3.0, 0.0]), 0)
    assert dets[1]["scores"].tolist() == pytest.approx([probs[1].item()])
    head.detections_per_img = 1
    assert len(head_detections(head, torch.rand(2, 4, 64, 64), proposals, [(64, 64), (30, 50)])[0]["boxes"]) == 1
