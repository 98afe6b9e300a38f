"""R-CNN bounding-box regression (R-CNN Appendix C): class-specific ridge regression on pool5 features.

For each class, a proposal P with IoU > 0.6 with a ground-truth box G of that
class (the closest one) gives one training pair: its pool5 features and the
targets ``t = ((Gx - Px) / Pw, (Gy - Py) / Ph, log(Gw / Pw), log(Gh / Ph))``
(:class:`detect.boxes.BoxCoder` with unit weights). Four ridge regressions per
class with lambda = 1000 (scikit-learn ``Ridge(alpha=1000)``) predict them. As in
the authors' code the features are scaled to mean norm 20 and the targets are
standardised per class before the fit (the standardisation is folded back into
the weights, so the head applies one affine map). The solver is pinned to the closed-form
Cholesky one (what ``"auto"`` picks for dense features today): no random state, so the same
features always give bitwise the same regressors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from detect.boxes import BoxCoder

_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))


@dataclass
class RegressionResult:
    """(C, 4, D) weights, (C, 4) biases, (C,) fitted flags, training pairs per class, problems."""

    weight: np.ndarray
    bias: np.ndarray
    fitted: np.ndarray
    counts: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def regression_targets(proposals: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(N, 4) proposals and their (N, 4) ground-truth boxes -> (N, 4) Appendix C targets."""
    return _CODER.encode(torch.as_tensor(gt_boxes, dtype=torch.float64),
                         torch.as_tensor(proposals, dtype=torch.float64)).numpy()


def fit_box_regressors(features: np.ndarray, proposals: np.ndarray, gt_boxes: np.ndarray, classes: np.ndarray,
                       num_classes: int, *, alpha: float | Sequence[float] = 1000.0, scale: float = 1.0,
                       class_names: Sequence[str] | None = None,
                       log: Callable[[str], None] = print) -> RegressionResult:
    """Fit one ridge regressor (4 outputs) per class.

    Args:
        features: (N, D) pool5 features of the training proposals (already chosen: IoU > 0.6).
        proposals: (N, 4) the proposals; gt_boxes: (N, 4) the ground-truth box each overlaps most.
        classes: (N,) that box's class.
        alpha: ridge lambda (1000 in the paper), or one per class.
        scale: features are multiplied by this before the fit (and at test time).

    Returns:
        :class:`RegressionResult`; a class without training pairs is left unfitted (boxes pass unchanged).
    """
    from sklearn.linear_model import Ridge

    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    dim = features.shape[1]
    result = RegressionResult(np.zeros((num_classes, 4, dim), np.float32), np.zeros((num_classes, 4), np.float32),
                              np.zeros(num_classes, bool))
    targets = regression_targets(proposals, gt_boxes) if len(proposals) else np.zeros((0, 4))
    alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (num_classes,))
    for c in range(num_classes):
        idx = np.flatnonzero(classes == c)
        result.counts.append(int(idx.size))
        if idx.size < 2:
            result.problems.append(f"class '{names[c]}': {idx.size} proposals with enough overlap; "
                                   "no box regression for it")
            continue
        y = targets[idx]
        mean, std = y.mean(axis=0), y.std(axis=0) + 1e-6
        ridge = Ridge(alpha=float(alphas[c]), solver="cholesky").fit(np.asarray(features[idx], dtype=np.float32) * scale, (y - mean) / std)
        result.weight[c] = ridge.coef_ * std[:, None]
        result.bias[c] = ridge.intercept_ * std + mean
        result.fitted[c] = True
    for line in result.problems:
        log(f"bbox regression: {line}")
    return result


class BoxRegressionHead(nn.Module):
    """Class-specific linear box regressors on pool5 features; kept in the model's state dict.

    Args:
        in_features: D, the pool5 length (AlexNet 256 * 6 * 6).
        num_classes: C.
    """

    def __init__(self, *, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, 4, in_features))
        self.register_buffer("bias", torch.zeros(num_classes, 4))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def trained(self) -> bool:
        return bool(self.fitted.any())

    def load_result(self, result: RegressionResult, scale: float) -> None:
        self.weight.copy_(torch.from_numpy(result.weight))
        self.bias.copy_(torch.from_numpy(result.bias))
        self.fitted.copy_(torch.from_numpy(result.fitted))
        self.scale.fill_(scale)

    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        """(R, D) pool5 features and (R, 4) proposals -> (R, C, 4) refined boxes (unfitted classes: unchanged)."""
        num_classes = self.weight.shape[0]
        deltas = (features * self.scale) @ self.weight.flatten(0, 1).t() + self.bias.flatten()
        deltas = deltas.view(-1, num_classes, 4) * self.fitted.view(1, -1, 1)
        return _CODER.decode(deltas.flatten(1), boxes).view(-1, num_classes, 4)
