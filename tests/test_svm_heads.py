"""Linear SVMs with hard negative mining (R-CNN Sec. 2.3): planted hard negatives are found, easy ones evicted."""

import numpy as np
import torch

from detect.svm_heads import ImageFeatures, LinearSVMHead, feature_scale, train_svms


def _image(rng, feats, gt_class=None):
    """Rows of one image: an optional ground-truth row of class 0 first, then proposals (all negatives)."""
    n = len(feats)
    gt = np.full(n, -1)
    overlaps = np.zeros((n, 2), np.float32)
    if gt_class is not None:
        gt[0] = gt_class
        overlaps[0, gt_class] = 1.0
    return ImageFeatures(np.asarray(feats, np.float32), gt, overlaps)


def test_hard_negative_mining_finds_the_planted_hard_negatives():
    rng = np.random.default_rng(0)
    images = []
    planted = set()
    for i in range(12):
        pos = [rng.uniform([2.0, -1], [3.0, 1])]                     # class 0 positive, x in [2, 3]
        easy = rng.uniform([-12.0, -1], [-8.0, 1], size=(50, 2))     # far on the negative side
        feats = pos + list(easy)
        if i == 6:                                                   # one image holds the hard negatives
            hard = rng.uniform([0.6, -1], [1.0, 1], size=(6, 2))   # close to the positives, still separable
            planted |= {(i, len(feats) + k) for k in range(6)}
            feats += list(hard)
        images.append(_image(rng, feats, gt_class=0))
    result = train_svms(images, 2, C=10.0, retrain_limit=5, class_names=["thing", "absent"], log=lambda m: None)
    mined = {tuple(k) for k in result.mined_keys[0].tolist()}
    cached = {tuple(k) for k in result.cache_keys[0].tolist()}
    assert planted <= mined                                           # every planted hard negative was mined
    assert 50 <= len(mined - planted) < 70          # easy ones: the first image's 50 seeds, few of the other 550
    assert cached <= planted | {(0, r) for r in range(51)} and cached & planted   # easy ones evicted
    w, b = result.weight[0], result.bias[0]
    hard_scores = [images[i].features[r] @ w + b for i, r in planted]
    pos_scores = [img.features[0] @ w + b for img in images]
    assert max(hard_scores) < 0 < min(pos_scores)                     # the final SVM separates them
    assert result.retrainings >= 3
    # class 1 has no positives: reported and given a zero detector
    assert not result.fitted[1] and np.all(result.weight[1] == 0)
    assert any("'absent' has no positive" in p for p in result.problems)


def test_first_image_only_training_misses_the_hard_negatives():
    """Control: without mining past the first image, the hard negatives are scored as positives."""
    rng = np.random.default_rng(0)
    easy_image = _image(rng, [[2.5, 0.0]] + list(rng.uniform([-12, -1], [-8, 1], size=(50, 2))), gt_class=0)
    result = train_svms([easy_image], 2, C=10.0, log=lambda m: None)
    assert np.array([0.8, 0.0]) @ result.weight[0] + result.bias[0] > 0


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
