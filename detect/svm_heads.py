"""R-CNN's per-class linear SVMs, trained with hard negative mining (R-CNN Sec. 2.3, Appendix B).

For each class, positives are the ground-truth boxes' features and negatives the
proposals whose IoU with every box of the class is below 0.3. All negatives do not
fit in memory, so the SVM is trained with hard negative mining as the authors'
``rcnn_train.m`` does: going through the training images once (one pass suffices,
Sec. 2.3), the first image's negatives seed the cache; after that only negatives
scoring above ``hard_thresh`` (-1.0001: inside the margin) are added, and after each
retraining those scoring below ``easy_thresh`` (-1.2) are evicted. A class is retrained
once more than ``retrain_limit`` new negatives came in -- and, unlike the paper, more
than ``retrain_growth`` times its last training set, so that the retrainings cost
O(hard negatives) in all rather than O(retrainings x positives), which grows with the
square of the images -- and at the end. Each image is read once per pass and scored
for all classes in one product; the cache grows in place. So the stage's time is
linear in the images.

Each retraining is liblinear's L2-regularised hinge-loss SVM with ``-w1 2 -c 0.001
-B 10`` -- scikit-learn's ``LinearSVC(loss="hinge")`` with ``class_weight`` and
``intercept_scaling``, which wraps the same liblinear. Features are scaled so
their mean L2 norm is 20 (``rcnn_scale_features``), which is what the small C assumes.
liblinear's dual coordinate descent visits the samples in a random order; it is seeded
(``seed``), so the same features always give bitwise the same detectors.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm


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
        retrainings: liblinear fits, all classes.
        trained_rows: the training set size (positives + cached negatives) of each fit, in order.
        scored_rows: negative scores computed (per class: each negative once per pass, the cache at each eviction).
    """

    weight: np.ndarray
    bias: np.ndarray
    fitted: np.ndarray
    cache_keys: list[np.ndarray] = field(default_factory=list)
    mined_keys: list[np.ndarray] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    retrainings: int = 0
    trained_rows: list[int] = field(default_factory=list)
    scored_rows: int = 0


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


class NegativeCache:
    """One class's cache of hard negatives: their features and ``(image, row)`` keys, grown in place.

    Rows are appended to a buffer that doubles when full, so adding n rows costs O(n); concatenating the
    whole cache for each image (what made the mining quadratic in the images) is avoided.

    Args:
        dim: D, the feature length.
    """

    def __init__(self, *, dim: int) -> None:
        self._x = np.zeros((0, dim), np.float32)
        self._keys = np.zeros((0, 2), np.int64)
        self.size = 0
        self._members: set[tuple[int, int]] | None = None   # built only when a later pass revisits an image

    def __len__(self) -> int:
        return self.size

    @property
    def x(self) -> np.ndarray:
        """(K, D) float32: the cached negatives' features."""
        return self._x[: self.size]

    @property
    def keys(self) -> np.ndarray:
        """(K, 2) int64: their ``(image index, row)``."""
        return self._keys[: self.size]

    def add(self, x: np.ndarray, keys: np.ndarray) -> None:
        """Append (n, D) features with their (n, 2) keys."""
        need = self.size + len(x)
        if need > len(self._x):
            capacity = max(need, 2 * len(self._x), 256)
            grown_x = np.empty((capacity, self._x.shape[1]), np.float32)
            grown_keys = np.empty((capacity, 2), np.int64)
            grown_x[: self.size], grown_keys[: self.size] = self.x, self.keys
            self._x, self._keys = grown_x, grown_keys
        self._x[self.size: need], self._keys[self.size: need] = x, keys
        self.size = need
        if self._members is not None:
            self._members.update(map(tuple, keys.tolist()))

    def evict(self, keep: np.ndarray) -> None:
        """Keep only the rows where the (K,) bool ``keep`` is True, in their order."""
        kept = np.flatnonzero(keep)
        self._x[: len(kept)], self._keys[: len(kept)] = self.x[kept], self.keys[kept]
        self.size = len(kept)
        self._members = None

    def missing(self, image: int, rows: np.ndarray) -> np.ndarray:
        """The (n,) ``rows`` of image ``image`` that are not cached."""
        if self._members is None:
            self._members = set(map(tuple, self.keys.tolist()))
        return rows[[(image, int(r)) not in self._members for r in rows.tolist()]] if len(rows) else rows


@dataclass
class MiningSettings:
    """How :func:`train_svms` mines and retrains (R-CNN Appendix B).

    The defaults are ``rcnn_train.m``'s fixed retraining rule, image by image, with a strict tolerance; the
    config's ``rcnn.svm`` defaults (``retrain_growth: 0.5``, ``batch_images: 8``) are the
    scalable ones.

    Attributes:
        hard_thresh: a negative scoring above this is hard: added to the cache.
        easy_thresh: after each retraining, cached negatives scoring below this are evicted.
        neg_iou: a row is a negative for class c when its IoU with class c's boxes is below this.
        retrain_limit: retrain a class once more than this many hard negatives came in since its last training.
        retrain_growth: ... and at least this fraction of its last training set (positives + cache). A
            retraining costs O(training set); waiting for a fixed fraction of it makes the retrainings'
            total cost linear in the hard negatives (a geometric series) instead of O(retrainings x positives)
            -- quadratic in the images. 0: the paper's fixed limit only.
        batch_images: images mined with the same SVMs between two retraining checks (each image's
            negatives are scored for all classes in one matrix product).
        epochs: passes over the images (Sec. 2.3: one pass suffices; mAP stops improving after it).
        tol, max_iter: liblinear's stopping tolerance (``-e``: 0.1 is liblinear's default for ``-s 3``,
            which ``rcnn_train.m`` keeps) and iteration cap.
    """

    hard_thresh: float = -1.0001
    easy_thresh: float = -1.2
    neg_iou: float = 0.3
    retrain_limit: int = 2000
    retrain_growth: float = 0.0
    batch_images: int = 1
    epochs: int = 1
    tol: float = 1e-4
    max_iter: int = 5000


def _positives(images, num_classes: int, dim: int, scale: float) -> list[np.ndarray]:
    """Per class, (P_c, D) float32 scaled features of its ground-truth rows (all images, read once)."""
    positives = [[] for _ in range(num_classes)]
    for img in images:
        for c in np.unique(img.gt_classes[img.gt_classes >= 0]).tolist():
            if c < num_classes:
                positives[c].append(np.asarray(img.features[img.gt_classes == c], dtype=np.float32) * scale)
    return [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in positives]


def _batches(n: int, size: int):
    """Image index ranges: the first image alone (it seeds the caches, as in rcnn_train.m), then ``size`` at a time."""
    if n:
        yield range(0, 1)
    for start in range(1, n, size):
        yield range(start, min(start + size, n))


def train_svms(images: Sequence[ImageFeatures], num_classes: int, *, C: float = 0.001, pos_weight: float = 2.0,
               bias_multiplier: float = 10.0, mining: MiningSettings | None = None, scale: float = 1.0,
               class_names: Sequence[str] | None = None, seed: int = 0, progress: bool = False,
               log: Callable[[str], None] = print, **settings) -> SVMResult:
    """One-vs-rest linear SVMs with hard negative mining over the images' cached features (Appendix B).

    Each class keeps its positives and a cache of hard negatives. Going through the images in batches,
    the negatives (IoU < ``neg_iou``) of a batch are scored by the current SVMs of all classes at once;
    those above ``hard_thresh`` join their class's cache. A class is retrained when enough new hard
    negatives came in (see :class:`MiningSettings`), at the first image and at the end; after each
    retraining the easy negatives are evicted. Every image is read once per pass and each retraining
    sees only positives + cache, so the time is linear in the images.

    Args:
        images: the training images' rows (indexable; read twice: positives, then mining).
        num_classes: C.
        C, pos_weight, bias_multiplier: liblinear's ``-c``, ``-w1``, ``-B``.
        mining: the mining settings; or give its fields as keywords (``retrain_limit=20``).
        scale: features are multiplied by this (see :func:`feature_scale`).
        seed: liblinear's seed (each retraining of class c uses ``seed + c``).
        progress: a progress bar per pass (images/s, ETA; each class's cache size and retrainings).

    Returns:
        :class:`SVMResult`; a class without positives (or negatives) gets a zero detector and a line in ``problems``.
    """
    m = dataclasses.replace(mining or MiningSettings(), **settings)
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    dim = np.asarray(images[0].features[:0]).shape[1] if len(images) else 0
    pos = _positives(images, num_classes, dim, scale)
    result = SVMResult(np.zeros((num_classes, dim), np.float32), np.zeros(num_classes, np.float32),
                       np.zeros(num_classes, bool))
    active = [c for c in range(num_classes) if len(pos[c])]
    result.problems += [f"class '{names[c]}' has no positive (ground-truth) examples in the training features: "
                        "it gets a zero detector and produces no detections" for c in range(num_classes) if not len(pos[c])]
    caches = {c: NegativeCache(dim=dim) for c in active}
    mined = {c: [] for c in active}
    added = dict.fromkeys(active, 0)
    last_size = dict.fromkeys(active, 0)

    def retrain(c: int) -> None:
        cache = caches[c]
        w, b = fit_linear_svm(pos[c], cache.x, C=C, pos_weight=pos_weight, bias_multiplier=bias_multiplier,
                              seed=seed + c, tol=m.tol, max_iter=m.max_iter)
        result.weight[c], result.bias[c], result.fitted[c] = w, b, True
        result.trained_rows.append(len(pos[c]) + len(cache))
        result.retrainings += 1
        last_size[c], added[c] = len(pos[c]) + len(cache), 0
        cache.evict(cache.x @ w + b >= m.easy_thresh)
        result.scored_rows += last_size[c] - len(pos[c])

    for epoch in range(m.epochs):
        bar = tqdm(total=len(images), desc=f"svm pass {epoch + 1}/{m.epochs}", unit="img", disable=not progress,
                   dynamic_ncols=True, leave=True)
        for batch in _batches(len(images), m.batch_images):
            for c, keys in _mine_batch(images, batch, active, result, m, scale, caches, epoch > 0):
                mined[c].append(keys)
                added[c] += len(keys)
            first, last = epoch == 0 and batch.start == 0, epoch == m.epochs - 1 and batch.stop == len(images)
            for c in active:
                due = added[c] > max(m.retrain_limit, m.retrain_growth * last_size[c])
                if (first or due or (last and added[c])) and len(caches[c]):
                    retrain(c)
            bar.update(len(batch))
            bar.set_postfix_str(", ".join(f"{names[c]} {len(caches[c])}" for c in active), refresh=False)
        bar.close()
        log(f"svm: hard negative pass {epoch + 1}/{m.epochs}: cache sizes "
            + ", ".join(f"{names[c]} {len(caches[c])}" for c in active) + f"; {result.retrainings} retrainings")
    result.cache_keys = [caches[c].keys.copy() if c in caches else np.zeros((0, 2), np.int64)
                         for c in range(num_classes)]
    result.mined_keys = [np.concatenate(mined[c]) if mined.get(c) else np.zeros((0, 2), np.int64)
                         for c in range(num_classes)]
    result.problems += [f"class '{names[c]}' has no negative examples (IoU < {m.neg_iou}): zero detector"
                        for c in active if not result.fitted[c]]
    for line in result.problems:
        log(f"svm: {line}")
    return result


def _mine_batch(images, batch: range, active: list[int], result: SVMResult, m: MiningSettings, scale: float,
                caches: dict[int, NegativeCache], revisit: bool):
    """Score one batch's negatives with the current SVMs; add the hard ones to the caches.

    Yields (class, (n, 2) keys of the rows added). A class not trained yet scores 0 everywhere: every
    negative is hard, which is how the first image seeds the cache.
    """
    if not active:
        return
    weight, bias = result.weight[active].T, result.bias[active]
    for i in batch:
        img = images[i]
        negative = np.asarray(img.overlaps)[:, active] < m.neg_iou
        rows = np.flatnonzero(negative.any(axis=1))
        if not len(rows):
            continue
        x = np.asarray(img.features[rows], dtype=np.float32) * scale
        hard = negative[rows] & (x @ weight + bias > m.hard_thresh)
        result.scored_rows += int(negative.sum())
        for k, c in enumerate(active):
            idx = np.flatnonzero(hard[:, k])
            if revisit:
                idx = idx[np.isin(rows[idx], caches[c].missing(i, rows[idx]))]
            if len(idx):
                keys = np.stack([np.full(len(idx), i), rows[idx]], axis=1).astype(np.int64)
                caches[c].add(x[idx], keys)
                yield c, keys


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
