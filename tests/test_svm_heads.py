"""R-CNN's linear SVM head and feature scale (R-CNN Sec. 2.3)."""

import numpy as np
import torch

from detect.hard_negatives import ImageFeatures
from detect.svm_heads import LinearSVMHead, feature_scale


def test_svm_head_scores_and_zero_detector():
    head = LinearSVMHead(in_features=3, num_classes=2)
    head.weight[0] = torch.tensor([1.0, 0.0, 0.0])
    head.bias[0] = -0.5
    head.fitted[0] = True
    head.scale.fill_(2.0)
    scores = head(torch.tensor([[1.0, 5.0, 5.0]]))
    assert scores[0, 0].item() == 1.5 and scores[0, 1].item() == float("-inf")


def test_feature_scale_gives_mean_norm_20():
    feats = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    img = ImageFeatures(feats, np.full(100, -1), np.zeros((100, 1), np.float32))
    scale = feature_scale([img], 20.0)
    assert np.linalg.norm(feats * scale, axis=1).mean() == np.float32(20.0) or \
        abs(np.linalg.norm(feats * scale, axis=1).mean() - 20.0) < 1e-3
