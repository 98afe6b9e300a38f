"""Occlusion sensitivity: the map peaks over the object whose score it explains; the crop changes no score."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops import RoIPool

from detect import build_model, load_config
from detect.analysis.occlusion import DetectorBoxScorer, PixelScorer, occlusion_map, plot_occlusion
from detect.backbones import Backbone
from detect.detector import Detector
from detect.proposal_sources import ExternalProposals, FixedProposals
from detect.boxes import BoxCoder
from detect.matching import BalancedSampler, Matcher
from detect.roi_heads import FastRCNNPredictor, RoIHead
from detect.transforms import DetectionTransform

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
RED = (1.0, 0.0, 0.0)
GREY = 0.5
BOX_A = (32, 48, 80, 96)       # x1, y1, x2, y2 of the explained red square
BOX_B = (160, 96, 208, 144)    # another red square, elsewhere


class HandBuiltDetector(Detector):
    """Backbone + RoI head whose class-0 probability is sigmoid(10 * redness under the box - 7.5).

    Redness of a 16x16 cell: mean of R - (G + B) / 2, so 1 on pure red and 0 on grey.
    """

    def __init__(self, height: int) -> None:
        conv = nn.Conv2d(3, 1, 16, stride=16)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1).expand(1, 3, 16, 16) / 256)
            conv.bias.zero_()
        transform = DetectionTransform(min_size=(height,), max_size=4000, test_min_size=height,
                                       pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1), size_divisibility=16)
        backbone = Backbone(name="hand", stages=[nn.Sequential(conv, nn.ReLU())], stride=16, out_channels=1,
                                 head_channels=4, roi_size=2, pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1))
        predictor = FastRCNNPredictor(in_channels=4, num_classes=1)
        with torch.no_grad():
            predictor.cls_score.weight.copy_(torch.tensor([[0.0] * 4, [2.5] * 4]))   # 10 * mean of 4 cells
            predictor.cls_score.bias.copy_(torch.tensor([7.5, 0.0]))
        head = RoIHead(pooler=RoIPool((2, 2), spatial_scale=1 / 16), box_head=nn.Flatten(),
                       predictor=predictor, matcher=Matcher(fg_iou_thresh=0.5, bg_iou_thresh_hi=0.5),
                       sampler=BalancedSampler(batch_size_per_image=8, positive_fraction=0.25),
                       box_coder=BoxCoder(weights=(10, 10, 5, 5)))
        super().__init__(transform=transform, backbone=backbone, head=head, class_names=["red"],
                         proposals=ExternalProposals(source=FixedProposals()))


def _scene(height: int = 160, width: int = 240) -> torch.Tensor:
    image = torch.full((3, height, width), GREY)
    for x1, y1, x2, y2 in (BOX_A, BOX_B):
        image[:, y1:y2, x1:x2] = torch.tensor(RED).view(3, 1, 1)
    return image


def _inside(yx, box, margin: int = 0) -> bool:
    y, x = yx
    return box[0] - margin <= x < box[2] + margin and box[1] - margin <= y < box[3] + margin


def test_map_of_a_hand_built_detector_peaks_over_its_object():
    image = _scene()
    model = HandBuiltDetector(image.shape[1]).train()
    scorer = DetectorBoxScorer(model, image, BOX_A, 0, fill=(GREY,) * 3)
    assert scorer.baseline() == pytest.approx(torch.sigmoid(torch.tensor(2.5)).item(), abs=1e-5)
    omap = occlusion_map(scorer, patch=16, stride=8, batch_size=16)
    assert model.training                                  # the caller's mode is restored
    assert _inside(omap.peak(), BOX_A)
    assert omap.scores.min() < omap.baseline - 0.1
    # squares over the other object, or anywhere away from A, cannot change A's score and are not computed
    far = [(r, c) for r, y in enumerate(omap.ys) for c, x in enumerate(omap.xs)
           if x >= BOX_A[2] + 32 or y >= BOX_A[3] + 32]
    assert far and all(omap.scores[r, c] == omap.baseline for r, c in far)
    assert omap.evaluated < omap.scores.size
    # the whole-image scorer gives the same map
    full = occlusion_map(DetectorBoxScorer(model, image, BOX_A, 0, fill=(GREY,) * 3, crop=False), patch=16, stride=8)
    assert np.allclose(full.scores, omap.scores, atol=1e-6) and full.evaluated == full.scores.size
    # explaining B instead moves the peak to B
    other = occlusion_map(DetectorBoxScorer(model, image, BOX_B, 0, fill=(GREY,) * 3), patch=16, stride=8)
    assert _inside(other.peak(), BOX_B)


def test_crop_gives_the_whole_image_scores_on_a_real_trunk():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["model.input.test_min_size=160", "model.input.max_size=400"])
    model = build_model(cfg, class_names=["a", "b", "c"]).eval()
    image = torch.rand(3, 150, 400)
    box = [170.0, 60.0, 240.0, 120.0]
    cropped = DetectorBoxScorer(model, image, box, 1)
    full = DetectorBoxScorer(model, image, box, 1, crop=False)
    x0, y0, x1, y1 = cropped.window
    assert (x1 - x0) < full.tensor.shape[-1]               # the test does exercise a crop
    assert cropped.baseline() == pytest.approx(full.baseline(), abs=1e-6)
    rects = torch.tensor([[170, 60, 202, 92], [150, 40, 182, 72], [240, 110, 272, 142], [0, 0, 32, 32],
                          [368, 118, 400, 150], [120, 60, 152, 92], [260, 60, 292, 92]])
    assert torch.allclose(cropped.score(rects), full.score(rects), atol=1e-5)
    assert cropped.touches(rects)[:3].all() and not cropped.touches(rects)[3:5].any()


def test_occlusion_works_for_rcnn_through_the_warp_head():
    # R-CNN scores a box by warping it out of each occluded image: occluders far from the box (beyond
    # its 16 px context) leave its score alone, one over the box changes it.
    torch.manual_seed(0)
    cfg = load_config(CONFIG.parents[1] / "rcnn" / "tiny_synthetic.yaml",
                      ["rcnn.crop_size=32", "rcnn.context_padding=2", "rcnn.proposal_source=selective_search"])
    model = build_model(cfg, class_names=["a", "b", "c"]).eval()
    image = torch.rand(3, 120, 160)
    box = [40.0, 30.0, 90.0, 80.0]
    scorer = DetectorBoxScorer(model, image, box, 2)
    (scores, _), = model.score_boxes([image], [torch.tensor([box])])
    assert scorer.baseline() == pytest.approx(float(scores[0, 2]), abs=1e-6)
    rects = torch.tensor([[40, 30, 90, 80], [130, 0, 160, 20], [0, 100, 20, 120]])
    got = scorer.score(rects)
    assert abs(float(got[0]) - scorer.baseline()) > 1e-3
    assert torch.allclose(got[1:], torch.full((2,), scorer.baseline()), atol=1e-6)


def test_pixel_scorer_positions_reach_the_border_and_heat_covers_the_image(tmp_path, monkeypatch):
    image = _scene(100, 150)

    def redness_in_a(batch: torch.Tensor) -> torch.Tensor:
        x1, y1, x2, y2 = BOX_A
        region = batch[:, :, y1:y2, x1:x2]
        return (region[:, 0] - region[:, 1:].mean(dim=1)).mean(dim=(1, 2))

    omap = occlusion_map(PixelScorer(redness_in_a, image), patch=32, stride=16)
    assert omap.ys.tolist() == [0, 16, 32, 48, 64, 68] and omap.xs[-1] == 150 - 32
    assert omap.heat.shape == (100, 150) and omap.evaluated == omap.scores.size
    assert _inside(omap.peak(), BOX_A, margin=16)
    assert omap.heat[0:8, 140:150].mean() == pytest.approx(omap.baseline)       # far corner: unchanged
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)      # keep the figure to read back what it shows
    path = plot_occlusion(rgb, omap, BOX_A, tmp_path / "occ.png", title="a")
    assert Image.open(path).size[0] > 300
    # the figure: the image with the box, then the map over the image with the box and the peak marked
    left, right = figures[0].axes[:2]
    assert np.array_equal(left.images[0].get_array(), rgb) and np.array_equal(right.images[0].get_array(), rgb)
    assert np.array_equal(right.images[1].get_array(), omap.heat)
    for ax in (left, right):
        (rect,) = ax.patches
        assert (*rect.get_xy(), rect.get_width(), rect.get_height()) == (32, 48, 48, 48)      # BOX_A
    (marker,) = right.get_lines()
    assert (marker.get_ydata()[0], marker.get_xdata()[0]) == omap.peak()
    assert f"unoccluded {omap.baseline:.3f}" in right.get_title() and "32px" in right.get_title()
    close(figures[0])
    with pytest.raises(ValueError, match="positive"):
        occlusion_map(PixelScorer(redness_in_a, image), patch=0)
