"""Per-pixel loops of selective search's region features, compiled (numba, just in time, cached on disk).

:mod:`proposals.features` calls these when numba is installed and keeps its numpy versions otherwise
(and as the reference the tests compare with). They give the same values: counts are integers
(exact in float32 below 2**24 pixels), and the texture codes are the same float32 operations in the
same order as the numpy code. One pass over the pixels replaces numpy's many temporary (H*W, 12)
arrays, which were most of the time.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:              # optional: the numpy versions are used instead
    numba = None


def _compiled(function):
    return numba.njit(cache=True, nogil=True)(function) if numba is not None else function


@_compiled
def _steered(gx, gy, diag, axis):   # pragma: no cover - compiled by numba
    # the derivative steered to 0, 45, 90 or 135 degrees, in float32 as features.texture_codes does
    if axis == 0:
        return gx
    if axis == 1:
        return (gx + gy) * diag
    if axis == 2:
        return gy
    return (gy - gx) * diag


@_compiled
def texture_codes(gx, gy, diag, bins, orientations):   # pragma: no cover - compiled by numba
    """Texture-histogram bins from Gaussian derivatives, as :func:`proposals.features.texture_codes`.

    Args:
        gx, gy: (P, C) float32 derivatives along x and y.
        diag: float32 sqrt(1/2); bins: bins per orientation (10); orientations: per channel (8).

    Returns:
        (P, 4*C) int32: column 4c + o codes channel c, axis o; a negative response counts in
        orientation o + 4.
    """
    pixels, channels = gx.shape
    peak = np.zeros(channels, dtype=np.float32)
    for p in range(pixels):
        for c in range(channels):
            for axis in range(4):
                peak[c] = max(peak[c], abs(_steered(gx[p, c], gy[p, c], diag, axis)))
    scale = np.empty(channels, dtype=np.float32)
    for c in range(channels):
        scale[c] = np.float32(bins) / max(peak[c], np.float32(1e-6))
    codes = np.empty((pixels, 4 * channels), dtype=np.int32)
    for p in range(pixels):
        for c in range(channels):
            for axis in range(4):
                response = _steered(gx[p, c], gy[p, c], diag, axis)
                code = min(np.int32(abs(response) * scale[c]), bins - 1)
                if response < 0:
                    code += 4 * bins
                codes[p, 4 * c + axis] = code + (c * orientations + axis) * bins
    return codes


@_compiled
def region_counts(labels, codes, n, dims):   # pragma: no cover - compiled by numba
    """Histogram counts per region: (n, dims) float32, ``counts[labels[p], codes[p, j]] += 1``.

    Args:
        labels: (P,) int32 region of each pixel; codes: (P, K) int32 bins in 0..dims-1.
    """
    counts = np.zeros((n, dims), dtype=np.float32)
    for p in range(len(labels)):
        row = labels[p]
        for j in range(codes.shape[1]):
            counts[row, codes[p, j]] += 1
    return counts


@_compiled
def region_geometry(labels, n):   # pragma: no cover - compiled by numba
    """Sizes, boxes and adjacent pairs of the regions of one label map.

    Args:
        labels: (H, W) int32 labels 0..n-1, every label present.

    Returns:
        (n,) float64 pixel counts; (n, 4) float64 boxes ``(x1, y1, x2, y2)`` in pixel edges; (K,) int64
        keys ``a * n + b`` (a < b) of 4-connected regions, with repeats: ``np.unique`` them (sorting
        here would make the first compilation several seconds longer).
    """
    height, width = labels.shape
    sizes = np.zeros(n, dtype=np.float64)
    boxes = np.empty((n, 4), dtype=np.float64)
    for r in range(n):                  # loops, not slice assignments: those compile seconds longer
        boxes[r, 0], boxes[r, 1], boxes[r, 2], boxes[r, 3] = width, height, 0, 0
    keys = np.empty(2 * height * width, dtype=np.int64)
    found = 0
    for y in range(height):
        for x in range(width):
            here = labels[y, x]
            sizes[here] += 1
            boxes[here, 0], boxes[here, 1] = min(boxes[here, 0], x), min(boxes[here, 1], y)
            boxes[here, 2], boxes[here, 3] = max(boxes[here, 2], x + 1), max(boxes[here, 3], y + 1)
            for there in (labels[y, x + 1] if x + 1 < width else here, labels[y + 1, x] if y + 1 < height else here):
                if there != here:
                    keys[found] = min(here, there) * n + max(here, there)
                    # a border runs along many pixels: drop a repeat of the last key (np.unique does the rest)
                    found += 1 if found == 0 or keys[found] != keys[found - 1] else 0
    return sizes, boxes, keys[:found].copy()
