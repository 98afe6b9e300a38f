"""R-CNN's per-class linear SVMs, trained with hard negative mining (R-CNN Sec. 2.3, Appendix B).

For each class, positives are the ground-truth boxes' features and negatives the
proposals whose IoU with every box of the class is below 0.3. All negatives do not
fit in memory, so the SVM is trained with hard negative mining as the authors'
``rcnn_train.m`` does: going through the training images once, the first image's
negatives seed the cache; after that only negatives scoring above ``hard_thresh``
(-1.0001: inside the margin) are added, and after each retraining those scoring
below ``easy_thresh`` (-1.2) are evicted. The SVM is retrained once
``retrain_limit`` new negatives have come in, and at the end.

Each retraining is liblinear's L2-regularised hinge-loss SVM with ``-w1 2 -c 0.001
-B 10`` -- scikit-learn's ``LinearSVC(loss="hinge")`` with ``class_weight`` and
``intercept_scaling``, which wraps the same liblinear. Features are scaled so
their mean L2 norm is 20 (``rcnn_scale_features``), which is what the small C assumes.
liblinear's dual coordinate descent visits the samples in a random order; it is seeded
(``seed``), so the same features always give bitwise the same detectors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class ImageFeatures:
    """One image's rows for the SVM stage.

    Attributes:
        features: (P, D) features of the ground-truth boxes and proposals (may be a float16 memory map).
        gt_classes: (P,) int64: the class of a ground-truth row, -1 for a proposal.
        overlaps: (P, C) IoU of each row with the closest ground-truth box of each class.
    """

    features: np.ndarray
    gt_classes: np.ndarray
    overlaps: np.ndarray


@dataclass
class SVMResult:
    """Trained detectors and what the mining did.

    Attributes:
        weight: (C, D) float32; bias: (C,) float32; fitted: (C,) bool (False: zero detector, see ``problems``).
        cache_keys: per class, (K, 2) int64 ``(image index, row)`` of the negatives left in the cache.
        mined_keys: per class, every negative ever added to the cache (same layout).
        problems: one line per class that could not be trained.
    """

    weight: np.ndarray
    bias: np.ndarray
    fitted: np.ndarray
    cache_keys: list[np.ndarray] = field(default_factory=list)
    mined_keys: list[np.ndarray] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    retrainings: int = 0


def feature_scale(images: Sequence[ImageFeatures], target_norm: float = 20.0, max_images: int = 200) -> float:
    """The factor that makes the mean L2 norm of the features ``target_norm`` (0: no scaling)."""
    if target_norm <= 0:
        return 1.0
    step = max(1, len(images) // max_images)
    norms = [np.linalg.norm(np.asarray(images[i].features, dtype=np.float32), axis=1)
             for i in range(0, len(images), step)]
    norms = np.concatenate(norms) if norms else np.zeros(0)
    mean = float(norms.mean()) if norms.size else 0.0
    return target_norm / mean if mean > 0 else 1.0


def fit_linear_svm(positives: np.ndarray, negatives: np.ndarray, *, C: float, pos_weight: float,
                   bias_multiplier: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3 -w1 pos_weight -c C -B bias_multiplier`` on positives (+1) and negatives (-1).

    ``seed`` fixes liblinear's sample order (unseeded, sklearn draws it from numpy's global RNG).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([positives, negatives]).astype(np.float32, copy=False)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    svm = LinearSVC(C=C, loss="hinge", dual=True, class_weight={1: pos_weight, -1: 1.0},
                    intercept_scaling=bias_multiplier, max_iter=5000, tol=1e-4, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # liblinear's cap on iterations; the paper's too
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


def train_svms(images: Sequence[ImageFeatures], num_classes: int, *, C: float = 0.001, pos_weight: float = 2.0,
               bias_multiplier: float = 10.0, hard_thresh: float = -1.0001, easy_thresh: float = -1.2,
               neg_iou: float = 0.3, retrain_limit: int = 2000, epochs: int = 1, scale: float = 1.0,
               class_names: Sequence[str] | None = None, seed: int = 0,
               log: Callable[[str], None] = print) -> SVMResult:
    """One-vs-rest linear SVMs with hard negative mining over the images' cached features.

    Args:
        images: the training images' rows (indexable; read twice: positives, then mining).
        num_classes: C.
        C, pos_weight, bias_multiplier: liblinear's ``-c``, ``-w1``, ``-B``.
        hard_thresh: negatives scoring above this are added to the cache.
        easy_thresh: cached negatives scoring below this are evicted after a retraining.
        neg_iou: a row is a negative for class c when its IoU with class c's boxes is below this.
        retrain_limit: retrain a class once this many negatives were added since its last training.
        epochs: passes over the images.
        scale: features are multiplied by this (see :func:`feature_scale`).
        seed: liblinear's seed (each retraining of class c uses ``seed + c``).

    Returns:
        :class:`SVMResult`; a class without positives (or negatives) gets a zero detector and a line in ``problems``.
    """
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    dim = np.asarray(images[0].features[:0]).shape[1] if len(images) else 0
    rows = lambda img, idx: np.asarray(img.features[idx], dtype=np.float32) * scale   # noqa: E731
    positives = [[] for _ in range(num_classes)]
    for img in images:
        for c in range(num_classes):
            idx = np.flatnonzero(img.gt_classes == c)
            if idx.size:
                positives[c].append(rows(img, idx))
    pos = [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in positives]
    result = SVMResult(np.zeros((num_classes, dim), np.float32), np.zeros(num_classes, np.float32),
                       np.zeros(num_classes, bool), [np.zeros((0, 2), np.int64) for _ in range(num_classes)])
    active = []
    for c in range(num_classes):
        if len(pos[c]) == 0:
            result.problems.append(f"class '{names[c]}' has no positive (ground-truth) examples in the training "
                                   "features: it gets a zero detector and produces no detections")
        else:
            active.append(c)
    neg_x = {c: np.zeros((0, dim), np.float32) for c in active}
    neg_keys = {c: np.zeros((0, 2), np.int64) for c in active}
    added = dict.fromkeys(active, 0)
    mined = {c: [] for c in active}
    first_time = True
    for epoch in range(epochs):
        for i, img in enumerate(images):
            last = epoch == epochs - 1 and i == len(images) - 1
            candidates = img.overlaps[:, active] < neg_iou if active else None
            feats = None
            for k, c in enumerate(active):
                idx = np.flatnonzero(candidates[:, k])
                if idx.size:
                    if feats is None:
                        feats = rows(img, slice(None))
                    if not first_time:
                        idx = idx[feats[idx] @ result.weight[c] + result.bias[c] > hard_thresh]
                    if idx.size and neg_keys[c].size:       # never add a cached negative twice
                        cached = neg_keys[c][neg_keys[c][:, 0] == i, 1]
                        idx = idx[~np.isin(idx, cached)]
                    if idx.size:
                        neg_x[c] = np.concatenate([neg_x[c], feats[idx]])
                        keys = np.stack([np.full(idx.size, i), idx], axis=1).astype(np.int64)
                        neg_keys[c] = np.concatenate([neg_keys[c], keys])
                        mined[c].append(keys)
                        added[c] += idx.size
                if (first_time or added[c] > retrain_limit or last) and len(neg_x[c]):
                    w, b = fit_linear_svm(pos[c], neg_x[c], C=C, pos_weight=pos_weight,
                                          bias_multiplier=bias_multiplier, seed=seed + c)
                    result.weight[c], result.bias[c], result.fitted[c] = w, b, True
                    result.retrainings += 1
                    added[c] = 0
                    keep = neg_x[c] @ w + b >= easy_thresh      # evict the easy negatives
                    neg_x[c], neg_keys[c] = neg_x[c][keep], neg_keys[c][keep]
            first_time = False
        log(f"svm: hard negative epoch {epoch + 1}/{epochs}: cache sizes "
            + ", ".join(f"{names[c]} {len(neg_keys[c])}" for c in active))
    result.mined_keys = [np.zeros((0, 2), np.int64) for _ in range(num_classes)]
    for c in active:
        result.cache_keys[c] = neg_keys[c]
        result.mined_keys[c] = np.concatenate(mined[c]) if mined[c] else result.mined_keys[c]
        if not result.fitted[c]:
            result.problems.append(f"class '{names[c]}' has no negative examples (IoU < {neg_iou}): zero detector")
    for line in result.problems:
        log(f"svm: {line}")
    return result


class LinearSVMHead(nn.Module):
    """Scores of C linear SVMs on (scaled) region features; kept in the model's state dict.

    Args:
        in_features: D, the feature length (fc7: 4096 for AlexNet / VGG16).
        num_classes: C.
    """

    def __init__(self, *, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, in_features))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def trained(self) -> bool:
        return bool(self.fitted.any())

    def load_result(self, result: SVMResult, scale: float) -> None:
        self.weight.copy_(torch.from_numpy(result.weight))
        self.bias.copy_(torch.from_numpy(result.bias))
        self.fitted.copy_(torch.from_numpy(result.fitted))
        self.scale.fill_(scale)

    def forward(self, features: Tensor) -> Tensor:
        """(R, D) -> (R, C) SVM scores; a class with a zero detector scores -inf (never detected)."""
        scores = (features * self.scale) @ self.weight.t() + self.bias
        return scores.masked_fill(~self.fitted, float("-inf"))
