"""Felzenszwalb-Huttenlocher graph segmentation with OpenCV-contrib's labels, faster (IJCV 2004).

OpenCV-contrib's ``ximgproc.segmentation.GraphSegmentation`` took about half of selective search's
time: it builds every 4-neighbour edge twice, sorts them all and runs the union-find for each k
anew. This module computes the same labels -- the same float32 edge weights, the same merges, the
same small-region clean-up and the same raster-order label ids -- from each undirected edge once,
sorts the edges of an image once for every k (:class:`PixelGraph`), and runs the union-find
compiled by numba (just in time, cached on disk; nothing to build at install). Without numba,
:func:`available` is False and callers use OpenCV's implementation.

Why the labels are OpenCV's although ties are ordered differently: within edges of one weight w,
a merge leaves a component with threshold w + k/size > w, so which components merge at w does not
depend on the order; the clean-up pass depends on the order in principle, and edges are kept in
raster order (horizontal edges, then vertical ones) within a weight, which gave OpenCV's labels on
every 3-channel segmentation of bccd and raccoon images tried (HSV, Lab, rgI at k = 50..300; see
:func:`available` for single-channel images). tests/test_selective_search.py checks against OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

try:
    import numba
except ImportError:              # optional: OpenCV's segmentation is used instead
    numba = None


def available(image: np.ndarray) -> bool:
    """Whether to segment ``image`` (H, W, C) here rather than with OpenCV: numba is installed and C = 3.

    Single-channel images (the ``h`` and ``i`` colour spaces) have many edges of exactly equal weight,
    and on some of them (hue of bccd and raccoon images) OpenCV's order of those ties gave other
    labels in the clean-up pass; for them OpenCV's own implementation is used.
    """
    return numba is not None and image.ndim == 3 and image.shape[2] == 3


@dataclass(frozen=True)
class PixelGraph:
    """4-neighbour pixel graph of one image, edges sorted by weight (E = H(W-1) + (H-1)W).

    Attributes:
        source, target: (E,) int32 flat pixel indices of each edge's ends.
        weight: (E,) float32 Euclidean colour distance of the smoothed image, ascending.
        shape: (H, W).
    """

    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    shape: tuple[int, int]


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # OpenCV adds each channel's squared float32 difference in double and stores the sum as float32.
    total = np.zeros(a.shape[:-1], dtype=np.float32)
    for channel in range(a.shape[-1]):
        diff = (a[..., channel] - b[..., channel]).astype(np.float64)
        total = (total.astype(np.float64) + diff * diff).astype(np.float32)
    return np.sqrt(total)


def pixel_graph(image: np.ndarray, *, sigma: float = 0.8) -> PixelGraph:
    """The sorted edge list of ``image`` (H, W, C) uint8 after Gaussian smoothing with ``sigma``."""
    sigma = sigma if sigma > 0 else 0.001          # OpenCV's setSigma does the same
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma, sigma)
    smooth = smooth.reshape(image.shape[0], image.shape[1], -1)
    height, width = smooth.shape[:2]
    weight = np.concatenate([_distance(smooth[:, :-1], smooth[:, 1:]).ravel(),
                             _distance(smooth[:-1, :], smooth[1:, :]).ravel()])
    index = np.arange(height * width, dtype=np.int32).reshape(height, width)
    source = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    # Non-negative float32 sort like their bit patterns; the edge number below them keeps ties in order.
    keys = (weight.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(len(weight), dtype=np.uint64)
    order = (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    offset = np.where(order < height * (width - 1), 1, width).astype(np.int32)   # right or lower neighbour
    source = source[order]
    return PixelGraph(source=source, target=source + offset, weight=weight[order], shape=(height, width))


def _union_find(source, target, weight, n, k, min_size):   # pragma: no cover - compiled by numba
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    threshold = np.full(n, k, dtype=np.float32)
    for e in range(len(weight)):
        a, b = _root(parent, source[e]), _root(parent, target[e])
        if a != b and weight[e] <= threshold[a] and weight[e] <= threshold[b]:
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            threshold[a] = weight[e] + k / np.float32(size[a])
    first = np.empty(n, dtype=np.int32)
    for p in range(n):
        first[p] = _root(parent, p)
    for e in range(len(weight)):        # merge regions under min_size into a neighbour, edges in order
        # Skipped without a root search: zero-weight edges (OpenCV skips them), and edges that cannot
        # merge -- inside one first-pass segment (every joined edge is), or between segments that had
        # min_size pixels at some point (a component only grows; size[] of a former root is its size
        # when it was absorbed).
        a, b = first[source[e]], first[target[e]]
        if weight[e] == 0 or a == b or (size[a] >= min_size and size[b] >= min_size):
            continue
        a, b = _root(parent, a), _root(parent, b)
        if a != b and (size[a] < min_size or size[b] < min_size):
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
    labels = np.empty(n, dtype=np.int32)
    mapped = np.full(n, -1, dtype=np.int32)
    count = 0
    for p in range(n):                  # ids in the raster order of each region's first pixel
        r = _root(parent, first[p])
        if mapped[r] < 0:
            mapped[r] = count
            count += 1
        labels[p] = mapped[r]
    return labels


def _root_py(parent, p):   # pragma: no cover - compiled by numba
    while parent[p] != p:               # path halving: the tree's shape does not change the partition
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


if numba is not None:
    _root = numba.njit(cache=True, nogil=True)(_root_py)
    _union_find = numba.njit(cache=True, nogil=True)(_union_find)


def graph_segmentation(graph: PixelGraph, k: float, *, min_size: int) -> np.ndarray:
    """OpenCV-contrib's ``GraphSegmentation`` labels for threshold ``k``: (H, W) int32 in 0..n-1."""
    if numba is None:
        raise RuntimeError("the compiled graph segmentation needs numba; use OpenCV's instead")
    labels = _union_find(graph.source, graph.target, graph.weight, graph.shape[0] * graph.shape[1],
                         np.float32(k), int(min_size))
    return labels.reshape(graph.shape)
