"""Initial regions and their features for selective search (Uijlings et al. 2013, Sec. 3.1-3.2).

One :class:`RegionSet` per (colour space, k): the Felzenszwalb-Huttenlocher segmentation of the
image in that colour space, plus everything hierarchical grouping needs about each region -- size,
bounding box, the colour histogram (25 bins per channel) and the texture histogram (Gaussian
derivatives with sigma 1 in 8 orientations, 10 bins per orientation and channel), and the list of
neighbouring region pairs. Strategies that share a colour space and k share one RegionSet, and the
texture responses of a colour space are computed once and shared by every k.

The graph segmentation itself comes from a maintained implementation (OpenCV-contrib's
``ximgproc.segmentation`` graph segmentation by default -- the same C++ the OpenCV backend uses, about
3x faster than scikit-image's ``felzenszwalb`` -- or scikit-image's). Colour conversion and the
texture filters are OpenCV's; the per-pixel passes (texture codes, histogram counts, sizes, boxes and
adjacency) run compiled by numba (:mod:`proposals.feature_kernels`), with the numpy code here used
without numba -- the same values either way (tests/test_feature_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from proposals import feature_kernels as kernels
from proposals import segmentation
from proposals.segmentation import PixelGraph

COLOUR_SPACES = ("rgb", "hsv", "lab", "rgi", "i", "h")
COLOUR_BINS = 25
TEXTURE_BINS = 10
TEXTURE_ORIENTATIONS = 8

Segmenter = Literal["opencv", "skimage"]

# First derivative of a Gaussian with sigma 1 (radius 4), for cv2's correlation: positive on a rising edge.
_TAPS = np.arange(-4, 5, dtype=np.float64)
_GAUSSIAN = (np.exp(-0.5 * _TAPS ** 2) / np.exp(-0.5 * _TAPS ** 2).sum()).astype(np.float32)
_DERIVATIVE = (_TAPS * _GAUSSIAN).astype(np.float32)


def convert_colour(image: np.ndarray, space: str) -> np.ndarray:
    """An RGB image in one of the paper's colour spaces (Table 1), each channel scaled to 0..255.

    Args:
        image: (H, W, 3) uint8 RGB.
        space: rgb | hsv | lab | rgi (normalised r, g plus intensity) | i (intensity) | h (hue).

    Returns:
        (H, W, C) uint8 with C = 3, or 1 for ``i`` and ``h``.
    """
    if space == "rgb":
        return image
    if space == "hsv":
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)   # FULL: hue over 0..255 instead of 0..179
        return hsv
    if space == "lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2Lab)      # 8-bit Lab: L*255/100, a+128, b+128
    if space == "h":
        return cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)[:, :, :1]
    total = image.astype(np.float32).sum(axis=2)
    intensity = (total / 3.0).round().astype(np.uint8)
    if space == "i":
        return intensity[:, :, None]
    if space == "rgi":
        norm = 255.0 / np.maximum(total, 1.0)
        r = (image[:, :, 0] * norm).round().astype(np.uint8)
        g = (image[:, :, 1] * norm).round().astype(np.uint8)
        return np.stack([r, g, intensity], axis=2)
    raise ValueError(f"unknown colour space '{space}' (choose from {', '.join(COLOUR_SPACES)})")


def segment(image: np.ndarray, k: float, *, sigma: float = 0.8, min_size: int | None = None,
            segmenter: Segmenter = "opencv", graph: PixelGraph | None = None) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation (the paper's initial regions, Sec. 3.1).

    Args:
        image: (H, W, C) uint8 in any colour space; ``k`` is on the usual 0..255 pixel scale.
        min_size: smallest segment in pixels; the paper's code uses ``k``.
        segmenter: ``opencv`` gives OpenCV-contrib's labels, computed by :mod:`proposals.segmentation`
            for 3-channel images when numba is installed (faster, same labels) and by OpenCV otherwise.
        graph: ``pixel_graph(image, sigma=sigma)``, to share its sorted edges between several k.

    Returns:
        (H, W) int32 labels 0..n-1, every label present.
    """
    min_size = int(k) if min_size is None else int(min_size)
    if segmenter == "opencv" and segmentation.available(image):
        graph = graph if graph is not None else segmentation.pixel_graph(image, sigma=float(sigma))
        return segmentation.graph_segmentation(graph, k, min_size=min_size)    # labels already 0..n-1
    if segmenter == "opencv":
        seg = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=float(sigma), k=float(k), min_size=min_size)
        labels = seg.processImage(np.ascontiguousarray(image))
    elif segmenter == "skimage":
        from skimage.segmentation import felzenszwalb

        single = image.shape[2] == 1
        labels = felzenszwalb(image[:, :, 0] if single else image, scale=float(k), sigma=float(sigma),
                              min_size=min_size, channel_axis=None if single else -1)
    else:
        raise ValueError(f"unknown segmenter '{segmenter}' (choose opencv or skimage)")
    labels = np.asarray(labels, dtype=np.int32)
    if labels.size and int(labels.max()) + 1 != len(np.unique(labels)):
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)
    return labels


def colour_codes(image: np.ndarray) -> np.ndarray:
    """Per pixel, the colour-histogram bin of each channel: (H*W, C) int, values in 0..25*C-1."""
    channels = image.shape[2]
    bins = (image.reshape(-1, channels).astype(np.int32) * COLOUR_BINS) >> 8
    return bins + np.arange(channels, dtype=np.int32) * COLOUR_BINS


def texture_codes(image: np.ndarray) -> np.ndarray:
    """Per pixel, the texture-histogram bin of each (channel, axis): (H*W, 4*C) int, values in 0..80*C-1.

    Gaussian derivatives (sigma 1) along x and y are steered to 0, 45, 90 and 135 degrees; the
    positive and negative halves of each are the paper's 8 orientations. A pixel's response lies in
    one half, so only that half's bin is coded here; :func:`texture_histograms` adds the other half's
    zero. Responses are scaled by the channel's largest one so that the 10 bins span the image's
    contrast, as in the authors' code.
    """
    channels = image.shape[2]
    img = image.astype(np.float32)
    gx = cv2.sepFilter2D(img, cv2.CV_32F, _DERIVATIVE, _GAUSSIAN, borderType=cv2.BORDER_REFLECT).reshape(-1, channels)
    gy = cv2.sepFilter2D(img, cv2.CV_32F, _GAUSSIAN, _DERIVATIVE, borderType=cv2.BORDER_REFLECT).reshape(-1, channels)
    diag = np.float32(np.sqrt(0.5))
    if kernels.numba is not None:
        return kernels.texture_codes(gx, gy, diag, TEXTURE_BINS, TEXTURE_ORIENTATIONS)
    steered = np.stack([gx, (gx + gy) * diag, gy, (gy - gx) * diag], axis=2).reshape(-1, channels * 4)
    magnitude = np.abs(steered)
    peak = magnitude.max(axis=0).reshape(channels, 4).max(axis=1)                         # per channel
    magnitude *= np.repeat(TEXTURE_BINS / np.maximum(peak, 1e-6), 4).astype(np.float32)
    code = magnitude.astype(np.int32)
    np.minimum(code, TEXTURE_BINS - 1, out=code)
    # A negative response goes to orientation o + 4 of its (channel, axis o): 4 * 10 codes further on.
    code += (steered < 0).astype(np.int32) * (4 * TEXTURE_BINS)
    channel, axis = np.divmod(np.arange(channels * 4, dtype=np.int32), 4)
    code += (channel * TEXTURE_ORIENTATIONS + axis) * TEXTURE_BINS
    return code


def _counts(labels: np.ndarray, codes: np.ndarray, dims: int, n: int) -> np.ndarray:
    if kernels.numba is not None:
        return kernels.region_counts(labels.reshape(-1), codes, n, dims)
    flat = labels.reshape(-1, 1).astype(np.int64) * dims + codes
    return np.bincount(flat.ravel(), minlength=n * dims).reshape(n, dims).astype(np.float32)


def _normalise(hist: np.ndarray) -> np.ndarray:
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    return hist


def colour_histograms(labels: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """L1-normalised colour histograms per region: (n, 25*C) float32 (Sec. 3.2, s_colour)."""
    return _normalise(_counts(labels, codes, COLOUR_BINS * codes.shape[1], n))


def texture_histograms(labels: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """L1-normalised texture histograms per region: (n, 80*C) float32 (Sec. 3.2, s_texture)."""
    channels = codes.shape[1] // 4
    hist = _counts(labels, codes, TEXTURE_BINS * TEXTURE_ORIENTATIONS * channels, n)
    halves = hist.reshape(n, channels, 2, 4, TEXTURE_BINS)
    pixels = halves.sum(axis=4)                      # (n, C, 2, 4): pixels whose response is in each half
    halves[..., 0] += pixels[:, :, ::-1, :]          # ... contribute a zero response to the other half
    return _normalise(hist)


def neighbour_pairs(labels: np.ndarray, n: int) -> np.ndarray:
    """Pairs of 4-connected adjacent regions, (E, 2) int64 with a < b, sorted."""
    pairs = [np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1),
             np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], axis=1)]
    pairs = np.concatenate(pairs).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def region_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """Bounding boxes ``(x1, y1, x2, y2)`` of each region in pixel-edge coordinates: (n, 4) float64."""
    boxes = np.zeros((n, 4), dtype=np.float64)
    for i, found in enumerate(ndimage.find_objects(labels + 1, max_label=n)):
        rows, cols = found
        boxes[i] = (cols.start, rows.start, cols.stop, rows.stop)
    return boxes


@dataclass
class RegionSet:
    """Initial regions of one segmentation and their features (n regions, E neighbour pairs).

    Attributes:
        sizes: (n,) float64 pixel counts.
        boxes: (n, 4) float64 ``(x1, y1, x2, y2)``.
        colour: (n, 25*C) float32 L1-normalised colour histograms, or None when not needed.
        texture: (n, 80*C) float32 L1-normalised texture histograms, or None when not needed.
        pairs: (E, 2) int64 adjacent region pairs.
        image_area: H * W.
    """

    sizes: np.ndarray
    boxes: np.ndarray
    colour: np.ndarray | None
    texture: np.ndarray | None
    pairs: np.ndarray
    image_area: float

    @property
    def n(self) -> int:
        return len(self.sizes)


def build_regions(labels: np.ndarray, *, colour: np.ndarray | None = None,
                  texture: np.ndarray | None = None) -> RegionSet:
    """Features of the regions in ``labels`` from precomputed per-pixel codes.

    Args:
        labels: (H, W) int32 labels 0..n-1.
        colour: (H*W, C) from :func:`colour_codes`, or None to skip colour histograms.
        texture: (H*W, 4*C) from :func:`texture_codes`, or None to skip texture histograms.
    """
    n = int(labels.max()) + 1
    colour_hist = texture_hist = None
    if colour is not None:
        colour_hist = colour_histograms(labels, colour, n)
    if texture is not None:
        texture_hist = texture_histograms(labels, texture, n)
    if kernels.numba is not None:
        sizes, boxes, keys = kernels.region_geometry(np.ascontiguousarray(labels, dtype=np.int32), n)
        keys = np.unique(keys)
        pairs = np.stack([keys // n, keys % n], axis=1)
    else:
        sizes = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
        boxes, pairs = region_boxes(labels, n), neighbour_pairs(labels, n)
    return RegionSet(sizes=sizes, boxes=boxes, colour=colour_hist, texture=texture_hist, pairs=pairs,
                     image_area=float(labels.size))
