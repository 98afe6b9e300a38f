"""R-CNN: the context-padded warp, box regression, the fine-tuning loss and prediction on the tiny config."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detect import build_model, load_config
from detect.errors import DetectError
from detect.bbox_regression import BoxRegressionHead, fit_box_regressors, regression_targets
from detect.proposal_sources import GroundTruthProposals
from detect.rcnn import context_boxes, warp_regions

TINY = Path(__file__).resolve().parents[1] / "configs" / "rcnn" / "tiny_synthetic.yaml"


def test_context_padded_warp_matches_a_hand_computed_crop():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 50)
    # S = 12, p = 2: an 8x8 box grows by 2 * 8 / 8 = 2 pixels a side, to 12x12 -- one sample per pixel
    out = warp_regions(image, torch.tensor([[10.0, 5.0, 18.0, 13.0]]), crop_size=12, padding=2, sampling_ratio=1)
    assert out.shape == (1, 3, 12, 12)
    assert torch.allclose(out[0], image[:, 3:15, 8:20], atol=1e-6)
    # at the corner the context lies outside the image: the mean pixel (0 after normalisation)
    corner = warp_regions(image, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), crop_size=12, padding=2, sampling_ratio=1)[0]
    assert torch.all(corner[:, :2, :] == 0) and torch.all(corner[:, :, :2] == 0)
    assert torch.allclose(corner[:, 2:, 2:], image[:, 0:10, 0:10], atol=1e-6)
    # a box twice as wide is squeezed anisotropically: every other column
    wide = warp_regions(image, torch.tensor([[10.0, 5.0, 26.0, 13.0]]), crop_size=12, padding=2, sampling_ratio=1)[0]
    assert wide.shape == (3, 12, 12)
    expected_cols = (torch.arange(12) * 2 + 1 + 6).float()            # bin centres 7, 9, ... (padded x1 = 6)
    manual = 0.5 * (image[:, 3:15, expected_cols.long() - 1] + image[:, 3:15, expected_cols.long()])
    assert torch.allclose(wide, manual, atol=1e-5)


def test_context_boxes_give_16_pixels_at_227():
    grown = context_boxes(torch.tensor([[100.0, 50.0, 295.0, 245.0]]), crop_size=227, padding=16)
    # the box spans 195 of 227 warped pixels: 16 warped pixels = 16 image pixels on each side here
    assert torch.allclose(grown, torch.tensor([[84.0, 34.0, 311.0, 261.0]]), atol=1e-4)


def test_box_regression_reduces_localisation_error():
    rng = np.random.default_rng(0)
    n, dim = 600, 32
    centres = rng.uniform(60, 200, size=(n, 2))
    sizes = rng.uniform(30, 90, size=(n, 2))
    gt = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    jitter = rng.normal(0, 0.12, size=(n, 4))
    w, h = sizes[:, 0], sizes[:, 1]
    props = gt + jitter * np.stack([w, h, w, h], axis=1)
    targets = regression_targets(props, gt)
    mixing = rng.normal(size=(4, dim))
    features = (targets @ mixing + rng.normal(0, 0.05, size=(n, dim))).astype(np.float32)   # pool5 "sees" the offset
    classes = np.zeros(n, np.int64)
    train, test = slice(0, 400), slice(400, None)
    result = fit_box_regressors(features[train], props[train], gt[train], classes[train], 2, alpha=1.0,
                                log=lambda m: None)
    assert result.fitted.tolist() == [True, False] and result.counts == [400, 0]
    head = BoxRegressionHead(in_features=dim, num_classes=2)
    head.load_result(result, 1.0)
    refined = head(torch.from_numpy(features[test]), torch.from_numpy(props[test]).float())
    from torchvision.ops import box_iou
    gt_t, props_t = torch.from_numpy(gt[test]).float(), torch.from_numpy(props[test]).float()
    before = box_iou(props_t, gt_t).diag().mean()
    after = box_iou(refined[:, 0], gt_t).diag().mean()
    assert after > before + 0.1 and after > 0.9
    assert torch.allclose(refined[:, 1], props_t)                   # an unfitted class leaves boxes alone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(TINY, overrides=["rcnn.proposal_source=ground_truth", "rcnn.crop_size=32",
                                       "rcnn.context_padding=2"])
    return build_model(cfg, class_names=["a", "b", "c"])


def test_finetuning_loss_and_gradients(model):
    images = [torch.rand(3, 60, 80), torch.rand(3, 50, 50)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([2]), "image_id": "x"},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 45.0]]), "labels": torch.tensor([0]), "image_id": "y"}]
    model.train()
    loss = model.loss(images, targets)
    assert set(loss) == {"loss_cls"} and loss["loss_cls"].item() == pytest.approx(math.log(4), abs=0.2)
    loss["loss_cls"].backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0 and model.backbone.trunk[0][0].weight.grad.abs().sum() > 0


def test_predict_with_softmax_then_svms(model):
    model.proposals.source = GroundTruthProposals(boxes_by_id={"x": np.array([[5.0, 5.0, 40.0, 40.0], [0, 0, 20, 20]])})
    image = torch.rand(3, 60, 80)
    timings = {}
    det = model.predict([image], image_ids=["x"], timings=timings)[0]
    assert set(timings) == {"features", "proposals", "head", "postprocess"}
    assert det["boxes"].shape[1] == 4 and det["labels"].dtype == torch.int64
    # softmax scores above rcnn.finetune_score_thresh (0.05), boxes the proposals themselves (no regressor fitted yet)
    assert len(det["boxes"]) > 0 and (det["scores"] > 0.05).all() and (det["labels"] < 3).all()
    assert {tuple(b) for b in det["boxes"].tolist()} <= {(5.0, 5.0, 40.0, 40.0), (0.0, 0.0, 20.0, 20.0)}
    # with SVMs: class 1 scores everything 1.0, the others are zero detectors
    model.head.svm.fitted[1] = True
    model.head.svm.bias[1] = 1.0
    det = model.predict([image], image_ids=["x"])[0]
    assert det["labels"].tolist() == [1, 1] and torch.allclose(det["scores"], torch.ones(2))
    with pytest.raises(DetectError, match="GroundTruthProposals: no boxes for image 'nope'"):
        model.predict([image], image_ids=["nope"])
