"""R-CNN's per-class linear SVMs (R-CNN Sec. 2.3): liblinear's solver, the feature scale, the test-time head.

Each training of a class's SVM is liblinear's L2-regularised hinge-loss SVM with ``-w1 2 -c 0.001
-B 10`` -- scikit-learn's ``LinearSVC(loss="hinge")`` with ``class_weight`` and
``intercept_scaling``, which wraps the same liblinear. Features are scaled so
their mean L2 norm is 20 (``rcnn_scale_features``), which is what the small C assumes.
liblinear's dual coordinate descent visits the samples in a random order; it is seeded
(``seed``), so the same features always give bitwise the same detectors. Which negatives each
training sees is the hard negative mining of :mod:`detect.hard_negatives`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from detect.hard_negatives import ImageFeatures, SVMResult


def scale_sample(num_images: int, max_images: int = 200) -> range:
    """Which images :func:`feature_scale` reads: up to ``max_images``, evenly spaced (``rcnn_scale_features``)."""
    return range(0, num_images, max(1, num_images // max_images))


def scale_rows(num_rows: int, max_rows: int = 100) -> np.ndarray:
    """Which rows of a sampled image :func:`feature_scale` reads: up to ``max_rows``, evenly spaced.

    A row sample, not all of the image's ~2,000 rows as the paper's code reads, so that the streaming mode
    can compute the scale before mining at the cost of ~200 x 100 warps instead of 200 images' worth; the
    mean norm of 20,000 rows is as good an estimate of the factor.
    """
    return np.unique(np.linspace(0, num_rows - 1, min(num_rows, max_rows)).round().astype(np.int64))


def feature_scale(images: Sequence[ImageFeatures], target_norm: float = 20.0, max_images: int = 200,
                  max_rows: int = 100) -> float:
    """The factor that makes the mean L2 norm of the features ``target_norm`` (0: no scaling).

    The mean is taken over the rows :func:`scale_rows` picks in the images :func:`scale_sample` picks.
    """
    if target_norm <= 0:
        return 1.0
    norms = []
    for i in scale_sample(len(images), max_images):
        features = images[i].features
        norms.append(np.linalg.norm(np.asarray(features[scale_rows(len(features), max_rows)], np.float32), axis=1))
    return scale_from_norms(norms, target_norm)


def scale_from_norms(norms: Sequence[np.ndarray], target_norm: float = 20.0) -> float:
    """``target_norm`` over the mean of the sampled rows' (n,) L2 norms (1 without rows)."""
    if target_norm <= 0:
        return 1.0
    norms = np.concatenate(norms) if len(norms) else np.zeros(0)
    mean = float(norms.mean()) if norms.size else 0.0
    return target_norm / mean if mean > 0 else 1.0


def fit_linear_svm(positives: np.ndarray, negatives: np.ndarray, *, C: float, pos_weight: float,
                   bias_multiplier: float, seed: int = 0, tol: float = 1e-4,
                   max_iter: int = 5000) -> tuple[np.ndarray, float]:
    """liblinear ``-s 3 -w1 pos_weight -c C -B bias_multiplier`` on positives (+1) and negatives (-1).

    ``seed`` fixes liblinear's sample order (unseeded, sklearn draws it from numpy's global RNG).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([positives, negatives]).astype(np.float32, copy=False)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    svm = LinearSVC(C=C, loss="hinge", dual=True, class_weight={1: pos_weight, -1: 1.0},
                    intercept_scaling=bias_multiplier, max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # liblinear's cap on iterations; the paper's too
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


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
