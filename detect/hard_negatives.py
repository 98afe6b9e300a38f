"""Hard negative mining for R-CNN's linear SVMs (R-CNN Sec. 2.3, Appendix B): one loop for both feature modes.

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

:func:`mine_svms` takes the positives and the images' rows batch by batch from an iterator, so the
same loop serves the feature cache (:func:`train_svms`, stage 3 after stage 2) and the streaming mode
that computes each batch's features as it goes (:func:`detect.rcnn_training.fit_svms_streaming`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from detect.runlog import ProgressBar
from detect.svm_heads import fit_linear_svm


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
        peak_bytes: the most the positives and the caches' buffers held (after a batch was mined).
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
    peak_bytes: int = 0


class NegativeCache:
    """One class's cache of hard negatives: their features and ``(image, row)`` keys, grown in place.

    Rows are appended to a buffer that doubles when full, so adding n rows costs O(n); concatenating the
    whole cache for each image (what made the mining quadratic in the images) is avoided. The rows are
    kept as given, unscaled, in their own dtype (float16 from the feature cache or the streaming
    mode: half the memory of float32); the miner scales a copy when it trains, which gives the same
    float32 values as scaling them on the way in.

    Args:
        dim: D, the feature length.
        dtype: the rows' dtype (an empty cache takes that of the first rows added).
    """

    def __init__(self, *, dim: int, dtype=np.float32) -> None:
        self._x = np.zeros((0, dim), dtype)
        self._keys = np.zeros((0, 2), np.int64)
        self.size = 0
        self._members: set[tuple[int, int]] | None = None   # built only when a later pass revisits an image

    def __len__(self) -> int:
        return self.size

    @property
    def x(self) -> np.ndarray:
        """(K, D): the cached negatives' features (unscaled)."""
        return self._x[: self.size]

    @property
    def keys(self) -> np.ndarray:
        """(K, 2) int64: their ``(image index, row)``."""
        return self._keys[: self.size]

    def add(self, x: np.ndarray, keys: np.ndarray) -> None:
        """Append (n, D) features with their (n, 2) keys."""
        need = self.size + len(x)
        if not self.size and x.dtype != self._x.dtype:
            self._x = np.zeros((0, self._x.shape[1]), x.dtype)
        if need > len(self._x):
            capacity = max(need, len(self._x) * 3 // 2, 256)     # 1.5x: geometric (O(rows) copies), less slack held than 2x
            grown_x = np.empty((capacity, self._x.shape[1]), self._x.dtype)
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

    @property
    def nbytes(self) -> int:
        """Bytes its buffers hold (their capacity, not only the rows in use)."""
        return self._x.nbytes + self._keys.nbytes

    def missing(self, image: int, rows: np.ndarray) -> np.ndarray:
        """The (n,) ``rows`` of image ``image`` that are not cached."""
        if self._members is None:
            self._members = set(map(tuple, self.keys.tolist()))
        return rows[[(image, int(r)) not in self._members for r in rows.tolist()]] if len(rows) else rows


@dataclass
class MiningSettings:
    """How :func:`mine_svms` mines and retrains (R-CNN Appendix B).

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


Batch = Sequence[tuple[int, ImageFeatures]]   # (image index, its rows): the images mined with the same SVMs


def positives_by_class(images: Iterable[ImageFeatures], num_classes: int, dim: int,
                       scale: float) -> list[np.ndarray]:
    """Per class, (P_c, D) float32 scaled features of its ground-truth rows, in image order."""
    positives = [[] for _ in range(num_classes)]
    for img in images:
        for c in np.unique(img.gt_classes[img.gt_classes >= 0]).tolist():
            if c < num_classes:
                positives[c].append(np.asarray(img.features[img.gt_classes == c], dtype=np.float32) * scale)
    return [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in positives]


def image_batches(n: int, size: int) -> Iterator[range]:
    """Image index ranges: the first image alone (it seeds the caches, as in rcnn_train.m), then ``size`` at a time."""
    if n:
        yield range(0, 1)
    for start in range(1, n, size):
        yield range(start, min(start + size, n))


def train_svms(images: Sequence[ImageFeatures], num_classes: int, *, scale: float = 1.0,
               mining: MiningSettings | None = None, **kwargs) -> SVMResult:
    """One-vs-rest linear SVMs with hard negative mining over the images' cached features (Appendix B).

    The positives are read first (all images), then :func:`mine_svms` goes through the images in
    :func:`image_batches`. Every image is read once per pass.

    Args:
        images: the training images' rows (indexable; read twice: positives, then mining).
        num_classes: C.
        scale: features are multiplied by this (see :func:`feature_scale`).
        mining: the mining settings; or give its fields as keywords (``retrain_limit=20``).
        kwargs: those of :func:`mine_svms` (``C``, ``seed``, ``progress``, ...) and of :class:`MiningSettings`.
    """
    fields = {f.name for f in dataclasses.fields(MiningSettings)}
    m = dataclasses.replace(mining or MiningSettings(), **{k: v for k, v in kwargs.items() if k in fields})
    dim = np.asarray(images[0].features[:0]).shape[1] if len(images) else 0
    positives = positives_by_class(images, num_classes, dim, scale)

    def batches(epoch: int) -> Iterator[Batch]:
        for batch in image_batches(len(images), m.batch_images):
            yield [(i, images[i]) for i in batch]

    return mine_svms(positives, batches, num_images=len(images), scale=scale, mining=m,
                     **{k: v for k, v in kwargs.items() if k not in fields})


def mine_svms(positives: list[np.ndarray], batches: Callable[[int], Iterable[Batch]], *, num_images: int,
              scale: float = 1.0, C: float = 0.001, pos_weight: float = 2.0, bias_multiplier: float = 10.0,
              mining: MiningSettings | None = None, class_names: Sequence[str] | None = None, seed: int = 0,
              progress: bool = False, log: Callable[[str], None] = print,
              on_batch: Callable[[Batch, int], None] | None = None) -> SVMResult:
    """Hard negative mining (Appendix B) over batches of images: the one loop of the cached and streaming modes.

    Each class keeps its positives and a cache of hard negatives. The negatives (IoU < ``neg_iou``) of a
    batch are scored by the current SVMs of all classes at once; those above ``hard_thresh`` join their
    class's cache. A class is retrained when enough new hard negatives came in (see
    :class:`MiningSettings`), at the first image and at the end of the last pass; after each retraining the
    easy negatives are evicted. Each retraining sees only positives + cache, so the time is linear in the
    images.

    Args:
        positives: per class, (P_c, D) float32 scaled ground-truth features (:func:`positives_by_class`).
        batches: ``batches(epoch)`` yields the pass's batches, each a list of (image index, rows); the
            indices key the cache, so they must be the same in every pass. The first batch of the first
            pass should be one image (:func:`image_batches`).
        num_images: the images of a pass (the progress bar's length).
        scale: the factor the images' features are multiplied by (the positives already are).
        C, pos_weight, bias_multiplier: liblinear's ``-c``, ``-w1``, ``-B``.
        seed: liblinear's seed (each retraining of class c uses ``seed + c``).
        progress: a bar per pass: images/s, ETA, and each class's cache size and retrainings.
        on_batch: called with each batch and the bytes the miner holds once the batch is mined (the
            streaming mode measures what it holds).

    Returns:
        :class:`SVMResult`; a class without positives (or negatives) gets a zero detector and a line in ``problems``.
    """
    m = mining or MiningSettings()
    miner = _Miner(positives, C=C, pos_weight=pos_weight, bias_multiplier=bias_multiplier, mining=m, seed=seed,
                   scale=scale, class_names=class_names)
    for epoch in range(m.epochs):
        bar = ProgressBar(total=num_images, desc=f"svm pass {epoch + 1}/{m.epochs}", unit="img", enabled=progress)
        done, first = 0, epoch == 0
        for batch in batches(epoch):
            if not batch:
                continue
            miner.mine(batch, revisit=epoch > 0)
            miner.retrain_due(first=first)
            first = False
            miner.result.peak_bytes = max(miner.result.peak_bytes, miner.nbytes)
            if on_batch is not None:
                on_batch(batch, miner.nbytes)
            bar.update(max(i for i, _ in batch) + 1 - done)
            done = max(i for i, _ in batch) + 1
            bar.describe(miner.status())
        if epoch == m.epochs - 1:
            miner.retrain_due(final=True)
            bar.describe(miner.status())
        bar.close()
        log(f"svm: hard negative pass {epoch + 1}/{m.epochs}: cache sizes {miner.status()}; "
            f"{miner.result.retrainings} retrainings")
    return miner.finish(log)


class _Miner:
    """The state of :func:`mine_svms`: per class, positives, a :class:`NegativeCache`, when it last trained."""

    def __init__(self, positives: list[np.ndarray], *, C: float, pos_weight: float, bias_multiplier: float,
                 mining: MiningSettings, seed: int, scale: float, class_names: Sequence[str] | None) -> None:
        num_classes = len(positives)
        dim = positives[0].shape[1] if num_classes else 0
        self.pos, self.m, self.scale, self.seed = positives, mining, scale, seed
        self.svm_args = dict(C=C, pos_weight=pos_weight, bias_multiplier=bias_multiplier)
        self.names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
        self.result = SVMResult(np.zeros((num_classes, dim), np.float32), np.zeros(num_classes, np.float32),
                                np.zeros(num_classes, bool))
        self.active = [c for c in range(num_classes) if len(positives[c])]
        self.result.problems += [f"class '{self.names[c]}' has no positive (ground-truth) examples in the training "
                                 "features: it gets a zero detector and produces no detections"
                                 for c in range(num_classes) if not len(positives[c])]
        self.caches = {c: NegativeCache(dim=dim) for c in self.active}
        self.mined = {c: [] for c in self.active}
        self.added = dict.fromkeys(self.active, 0)
        self.last_size = dict.fromkeys(self.active, 0)
        self.fits = dict.fromkeys(self.active, 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the positives and the caches' buffers."""
        return sum(p.nbytes for p in self.pos) + sum(cache.nbytes for cache in self.caches.values())

    def status(self) -> str:
        return ", ".join(f"{self.names[c]} {len(self.caches[c])} ({self.fits[c]} fits)" for c in self.active)

    def retrain(self, c: int) -> None:
        cache, result = self.caches[c], self.result
        negatives = np.asarray(cache.x, dtype=np.float32) * self.scale
        w, b = fit_linear_svm(self.pos[c], negatives, seed=self.seed + c, tol=self.m.tol, max_iter=self.m.max_iter,
                              **self.svm_args)
        result.weight[c], result.bias[c], result.fitted[c] = w, b, True
        result.trained_rows.append(len(self.pos[c]) + len(cache))
        result.retrainings += 1
        self.fits[c] += 1
        self.last_size[c], self.added[c] = len(self.pos[c]) + len(cache), 0
        cache.evict(negatives @ w + b >= self.m.easy_thresh)
        result.scored_rows += self.last_size[c] - len(self.pos[c])

    def retrain_due(self, *, first: bool = False, final: bool = False) -> None:
        """Retrain each class at the first batch, once enough hard negatives came in, or (``final``) if any did."""
        m = self.m
        for c in self.active:
            due = self.added[c] > max(m.retrain_limit, m.retrain_growth * self.last_size[c])
            if (first or due or (final and self.added[c])) and len(self.caches[c]):
                self.retrain(c)

    def mine(self, batch: Batch, *, revisit: bool) -> None:
        """Score a batch's negatives with the current SVMs; add the hard ones to the caches.

        A class not trained yet scores 0 everywhere: every negative is hard, which is how the first image
        seeds the cache. ``revisit``: a later pass, where a negative already cached is not added again.
        """
        if not self.active:
            return
        active, m = self.active, self.m
        weight, bias = self.result.weight[active].T, self.result.bias[active]
        for i, img in batch:
            negative = np.asarray(img.overlaps)[:, active] < m.neg_iou
            rows = np.flatnonzero(negative.any(axis=1))
            if not len(rows):
                continue
            given = np.asarray(img.features[rows])
            x = np.asarray(given, dtype=np.float32) * self.scale
            hard = negative[rows] & (x @ weight + bias > m.hard_thresh)
            self.result.scored_rows += int(negative.sum())
            for k, c in enumerate(active):
                idx = np.flatnonzero(hard[:, k])
                if revisit:
                    idx = idx[np.isin(rows[idx], self.caches[c].missing(i, rows[idx]))]
                if len(idx):
                    keys = np.stack([np.full(len(idx), i), rows[idx]], axis=1).astype(np.int64)
                    self.caches[c].add(given[idx], keys)
                    self.mined[c].append(keys)
                    self.added[c] += len(keys)

    def finish(self, log: Callable[[str], None]) -> SVMResult:
        result, num_classes = self.result, len(self.pos)
        result.cache_keys = [self.caches[c].keys.copy() if c in self.caches else np.zeros((0, 2), np.int64)
                             for c in range(num_classes)]
        result.mined_keys = [np.concatenate(self.mined[c]) if self.mined.get(c) else np.zeros((0, 2), np.int64)
                             for c in range(num_classes)]
        result.problems += [f"class '{self.names[c]}' has no negative examples (IoU < {self.m.neg_iou}): zero detector"
                            for c in self.active if not result.fitted[c]]
        for line in result.problems:
            log(f"svm: {line}")
        return result
