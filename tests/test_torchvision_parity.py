"""Our RPN and RoI head give torchvision's numbers when configured the same.

Same weights, anchors and thresholds; every candidate sampled (a batch size
larger than the candidates) so the random sampling cannot differ; torchvision
never ignores border anchors and keeps boxes >= 1e-3, so ours is set alike.
"""

import pytest
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import RoIPool

from detect.anchors import AnchorGenerator
from detect.boxes import BoxCoder
from detect.matching import BalancedSampler, Matcher
from detect.roi_heads import FastRCNNPredictor, RoIHead
from tests.head_helpers import head_detections, head_loss
from detect.rpn import RegionProposalNetwork, RPNHead

SIZES = [(70, 90), (64, 64)]


class FixedAnchors(nn.Module):
    """torchvision's anchor-generator interface around ours."""

    def __init__(self, gen: AnchorGenerator) -> None:
        super().__init__()
        self.gen = gen

    def num_anchors_per_location(self):
        return [self.gen.num_anchors]

    def forward(self, image_list, feature_maps):
        anchors = self.gen(*feature_maps[0].shape[-2:])
        return [anchors for _ in range(len(image_list.image_sizes))]


class PoolAdapter(nn.Module):
    """torchvision's MultiScaleRoIAlign interface around a plain pooler."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, features, proposals, image_shapes):
        return self.pooler(features["0"], proposals)


def targets():
    return [torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 10.0, 85.0, 60.0]]), torch.tensor([[10.0, 12.0, 50.0, 44.0]])]


@pytest.fixture
def features():
    torch.manual_seed(0)
    return torch.randn(2, 16, 9, 12)


def make_pair(batch: int):
    torch.manual_seed(1)
    gen = AnchorGenerator(sizes=(16.0, 32.0, 64.0), ratios=(0.5, 1.0, 2.0), stride=8)
    ours = RegionProposalNetwork(
        head=RPNHead(in_channels=16, channels=16, num_anchors=9), anchor_generator=gen,
        matcher=Matcher(fg_iou_thresh=0.7, bg_iou_thresh_hi=0.3, allow_low_quality_matches=True),
        sampler=BalancedSampler(batch_size_per_image=batch, positive_fraction=0.5), box_coder=BoxCoder(),
        allowed_border=-1, pre_nms_top_n=(300, 200), post_nms_top_n=(100, 50), nms_thresh=0.7, min_size=1e-3)
    for p in ours.head.parameters():      # non-trivial weights (ours start at std 0.01)
        p.data.normal_(0, 0.2)
    tv_head = TVRPNHead(16, 9)
    tv_head.conv[0][0].load_state_dict(ours.head.conv.state_dict())
    tv_head.cls_logits.load_state_dict(ours.head.cls_logits.state_dict())
    tv_head.bbox_pred.load_state_dict(ours.head.bbox_pred.state_dict())
    theirs = TVRegionProposalNetwork(FixedAnchors(gen), tv_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                                     batch_size_per_image=batch, positive_fraction=0.5,
                                     pre_nms_top_n={"training": 300, "testing": 200},
                                     post_nms_top_n={"training": 100, "testing": 50}, nms_thresh=0.7)
    return ours, theirs


def test_rpn_proposals_match_torchvision(features):
    ours, theirs = make_pair(batch=256)
    theirs.eval()
    images = ImageList(torch.zeros(2, 3, 72, 96), SIZES)
    with torch.no_grad():
        tv_boxes, _ = theirs(images, {"0": features})
        our_boxes, _ = ours.predict(features, SIZES)
    for a, b in zip(our_boxes, tv_boxes):
        assert a.shape[0] > 10
        assert torch.allclose(a, b, atol=1e-4)


def test_rpn_losses_and_training_proposals_match_torchvision(features):
    ours, theirs = make_pair(batch=100000)       # every labelled anchor sampled
    theirs.train()
    images = ImageList(torch.zeros(2, 3, 72, 96), SIZES)
    tv_boxes, tv_losses = theirs(images, {"0": features}, [{"boxes": b} for b in targets()])
    our_losses, our_boxes = ours.loss(features, SIZES, targets())
    assert our_losses["loss_rpn_cls"].item() == pytest.approx(tv_losses["loss_objectness"].item(), rel=1e-5)
    assert our_losses["loss_rpn_box"].item() == pytest.approx(tv_losses["loss_rpn_box_reg"].item(), rel=1e-5)
    assert our_losses["loss_rpn_box"].item() > 0
    for a, b in zip(our_boxes, tv_boxes):
        assert torch.allclose(a, b, atol=1e-4)


def make_heads(batch: int):
    torch.manual_seed(2)
    pooler = RoIPool(output_size=(3, 3), spatial_scale=1 / 8)
    box_head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 9, 32), nn.ReLU())
    predictor = FastRCNNPredictor(in_channels=32, num_classes=3)
    for p in predictor.parameters():
        p.data.normal_(0, 0.3)
    ours = RoIHead(pooler=pooler, box_head=box_head, predictor=predictor,
                   matcher=Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5, bg_iou_thresh_lo=0.0),
                   sampler=BalancedSampler(batch_size_per_image=batch, positive_fraction=0.25),
                   box_coder=BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)), score_thresh=0.05, nms_thresh=0.3,
                   detections_per_img=20, smooth_l1_beta=1 / 9)
    theirs = RoIHeads(PoolAdapter(pooler), box_head, predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
                      batch_size_per_image=batch, positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                      score_thresh=0.05, nms_thresh=0.3, detections_per_img=20)
    return ours, theirs


def proposals():
    g = torch.Generator().manual_seed(3)
    out = []
    for h, w in SIZES:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
        out.append(torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=g) * 30], 1).clamp(max=min(h, w)))
    return out


def test_roi_head_detections_match_torchvision(features):
    ours, theirs = make_heads(batch=128)
    theirs.eval()
    with torch.no_grad():
        tv = theirs({"0": features}, proposals(), SIZES)[0]
        mine = head_detections(ours, features, proposals(), SIZES)
    for a, b in zip(mine, tv):
        assert a["boxes"].shape[0] > 3
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.allclose(a["scores"], b["scores"], atol=1e-6)
        assert torch.equal(a["labels"] + 1, b["labels"])


def test_roi_head_losses_match_torchvision(features):
    ours, theirs = make_heads(batch=100000)
    theirs.train()
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    _, tv_losses = theirs({"0": features}, proposals(), SIZES,
                          [{"boxes": b, "labels": l + 1} for b, l in zip(targets(), labels)])
    mine = head_loss(ours, features, proposals(), [{"boxes": b, "labels": l} for b, l in zip(targets(), labels)], SIZES)
    assert mine["loss_cls"].item() == pytest.approx(tv_losses["loss_classifier"].item(), rel=1e-5)
    assert mine["loss_box"].item() == pytest.approx(tv_losses["loss_box_reg"].item(), rel=1e-5)
    assert mine["loss_box"].item() > 0
