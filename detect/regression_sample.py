"""Stage 4's training pairs (R-CNN Appendix C), at most a fixed number per class: a seeded sample.

Box regression trains on the pool5 features of every row with IoU > 0.6 with a ground-truth box. Those
rows are few per image but pool5 is wide (the tiny trunk's 6272 floats, 24.5x its fc7; VGG16's 25088),
so holding all of them is what kept the streaming mode from a bounded footprint (79% of the full cache
on bccd). The ridge fit's sufficient statistics do not help: X^T X per class is D5 x D5 (25088^2
float64 = 5 GB for VGG16, 315 MB for the tiny trunk), more than the rows themselves on a small dataset.
So each class keeps at most ``max_rows`` rows: the rows with the smallest seeded random keys
(bottom-k sampling). A row's key depends only on the seed, its image id and its row index, never on
the order images arrive in, so the cached and the streaming modes keep the same rows and fit bitwise
the same regressors; the kept rows are fitted in image order, then row order, which with no cap
(``max_rows=0``) is exactly the order of all rows.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np
import torch
from torchvision.ops import box_iou


def row_keys(seed: int, image_id: str, num_rows: int) -> np.ndarray:
    """(P,) the sample keys of an image's rows (ground truth first, then proposals), uniform in [0, 1)."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())]).random(num_rows)


class RegressionSample:
    """Per class, at most ``max_rows`` stage-4 rows with their proposals, ground-truth boxes and pool5.

    Args:
        num_classes: C; dim: D5, pool5's length.
        max_rows: rows kept per class (0: all of them).
        min_overlap: a row trains its best-overlapping ground-truth box's class if that IoU exceeds this.
        seed: the sample's seed (``train.seed``).
    """

    def __init__(self, *, num_classes: int, dim: int, max_rows: int, min_overlap: float, seed: int) -> None:
        self.num_classes, self.dim, self.max_rows = num_classes, dim, max_rows
        self.min_overlap, self.seed = min_overlap, seed
        # per class: lists of chunks (pool5 float16, boxes, gt boxes, keys, (image index, row) order)
        self._chunks = [[] for _ in range(num_classes)]
        self.seen = np.zeros(num_classes, np.int64)      # eligible rows offered, kept or not
        self.nbytes = 0

    def add(self, *, image_index: int, image_id: str, num_rows: int, rows: np.ndarray, boxes: np.ndarray,
            gt_boxes: np.ndarray, gt_classes: np.ndarray, pool5: Callable[[np.ndarray], np.ndarray]) -> None:
        """Offer some of an image's rows; an image may be offered in several calls (disjoint rows).

        Args:
            image_index: the image's position among the training images (the fit's order).
            image_id: its id (with ``seed`` and the row, the key); num_rows: P, all its rows.
            rows: (R,) the offered rows' indices in [0, P); boxes: (R, 4) their boxes.
            gt_boxes: (G, 4) the image's ground-truth boxes; gt_classes: (G,) their classes.
            pool5: ``positions (n,) into rows -> (n, D5)`` pool5 of those rows, asked only for rows kept.
        """
        rows = np.asarray(rows, np.int64)
        if not len(rows) or not len(gt_boxes):
            return
        iou = box_iou(torch.as_tensor(np.asarray(boxes, np.float32)), torch.as_tensor(np.asarray(gt_boxes, np.float32)))
        best = iou.max(dim=1)
        eligible = np.flatnonzero((best.values > self.min_overlap).numpy())
        classes = np.asarray(gt_classes, np.int64)[best.indices.numpy()[eligible]]
        keys = row_keys(self.seed, image_id, num_rows)
        admitted = {}
        for c in np.unique(classes).tolist():
            at = eligible[classes == c]
            self.seen[c] += len(at)
            at = self._admitted(c, at, keys[rows[at]])
            if len(at):
                admitted[c] = at
        wanted = np.concatenate(list(admitted.values())) if admitted else np.zeros(0, np.int64)
        if not len(wanted):
            return
        features, start = np.asarray(pool5(wanted), dtype=np.float16), 0     # grouped by class, as ``admitted``
        boxes, gt_boxes, gt_of = np.asarray(boxes, np.float32), np.asarray(gt_boxes, np.float32), best.indices.numpy()
        for c, at in admitted.items():
            self._push(c, features[start: start + len(at)], boxes[at], gt_boxes[gt_of[at]], keys[rows[at]],
                       np.stack([np.full(len(at), image_index, np.int64), rows[at]], axis=1))
            start += len(at)

    def _admitted(self, c: int, at: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The positions of ``at`` whose keys could be among class ``c``'s ``max_rows`` smallest."""
        if not self.max_rows:
            return at
        held = [k for *_, k, _ in self._chunks[c]]
        if sum(map(len, held)) >= self.max_rows:
            at = at[keys < max(k.max() for k in held)]     # cannot beat the current largest kept key
        return at

    def _push(self, c: int, pool5, boxes, gt_boxes, keys, order) -> None:
        """Add a chunk to class ``c``; above ``max_rows``, keep the smallest keys (ties: image, then row)."""
        chunks = self._chunks[c]
        chunks.append((pool5, boxes, gt_boxes, keys, order))
        if self.max_rows and sum(len(ch[3]) for ch in chunks) > self.max_rows:
            merged = [np.concatenate(parts) for parts in zip(*chunks)]
            keep = np.lexsort((merged[4][:, 1], merged[4][:, 0], merged[3]))[: self.max_rows]
            chunks[:] = [tuple(a[keep] for a in merged)]
        self.nbytes = sum(a.nbytes for ch in (x for cl in self._chunks for x in cl) for a in ch)

    def counts(self) -> list[int]:
        """Rows held per class."""
        return [sum(len(ch[3]) for ch in chunks) for chunks in self._chunks]

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All classes' rows in image order, then row order: (N, D5) float32 pool5, (N, 4) proposals,
        (N, 4) their ground-truth boxes, (N,) classes."""
        parts = [(*(np.concatenate(a) for a in zip(*chunks)), np.full(sum(len(ch[3]) for ch in chunks), c))
                 for c, chunks in enumerate(self._chunks) if chunks]
        if not parts:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, np.int64)
        pool5, boxes, gt_boxes, _, order, classes = (np.concatenate(a) for a in zip(*parts))
        at = np.lexsort((order[:, 1], order[:, 0]))
        return pool5[at].astype(np.float32), boxes[at], gt_boxes[at], classes[at]
