"""Selective search (Uijlings et al., "Selective Search for Object Recognition", IJCV 2013).

Proposals come from hierarchically grouping a graph-based over-segmentation (Sec. 3.1), diversified
over colour spaces, segmentation thresholds k and similarity measures (Sec. 3.2, "diversification
strategies"), and ranked across strategies (Sec. 3.3, "combining locations"): within each hierarchy a
region's position counts from the top (the whole image is 1), is multiplied by a uniform random
number, all strategies are sorted together on that value and lower-ranked duplicate boxes dropped.

Modes are the paper's (Sec. 5.1):

- ``single``: HSV, k = 100, C+T+S+F (1 strategy);
- ``fast``: HSV and Lab, k in {50, 100}, C+T+S+F and T+S+F (8 strategies);
- ``quality``: HSV, Lab, rgI, H and I, k in {50, 100, 150, 300}, C+T+S+F, T+S+F, F and S (80).

``backend="opencv"`` runs OpenCV-contrib's ``ximgproc`` implementation of the same paper instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import cv2
import numpy as np

from proposals import segmentation
from proposals.features import COLOUR_SPACES, Segmenter, build_regions, colour_codes, convert_colour, segment, \
    texture_codes
from proposals.grouping import check_similarity, hierarchical_grouping
from proposals.segmentation import pixel_graph

Mode = Literal["single", "fast", "quality"]
Backend = Literal["ours", "opencv"]

MODES: dict[str, tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]] = {
    "single": (("hsv",), (100,), ("CTSF",)),
    "fast": (("hsv", "lab"), (50, 100), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300), ("CTSF", "TSF", "F", "S")),
}


@dataclass(frozen=True)
class Strategy:
    """One diversification strategy: a colour space, a segmentation threshold k and a similarity."""

    colour_space: str
    k: float
    similarity: str


def strategies(mode: Mode = "fast", *, colour_spaces: Sequence[str] | None = None, ks: Sequence[float] | None = None,
               similarities: Sequence[str] | None = None) -> list[Strategy]:
    """The strategies of a mode, with any of its three axes replaced.

    Returns:
        Every combination colour space x k x similarity, in that nesting order.
    """
    if mode not in MODES:
        raise ValueError(f"unknown selective search mode '{mode}' (choose from {', '.join(MODES)})")
    default_spaces, default_ks, default_sims = MODES[mode]
    spaces = [s.lower() for s in (colour_spaces or default_spaces)]
    for space in spaces:
        if space not in COLOUR_SPACES:
            raise ValueError(f"unknown colour space '{space}' (choose from {', '.join(COLOUR_SPACES)})")
    ks = list(ks or default_ks)
    if any(not np.isfinite(k) or k <= 0 for k in ks):
        raise ValueError(f"segmentation thresholds k must be positive, got {ks}")
    sims = [check_similarity(s) for s in (similarities or default_sims)]
    return [Strategy(space, float(k), sim) for space in spaces for k in ks for sim in sims]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"selective search needs an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"selective search needs a uint8 image, got dtype {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])


def resize_to_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink ``image`` so that its longer side is at most ``max_side`` (never enlarges)."""
    height, width = image.shape[:2]
    if max_side <= 0 or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def rank_hierarchies(hierarchies: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Combine the hierarchies of several strategies into one ranked, duplicate-free box list (Sec. 3.3).

    Args:
        hierarchies: per strategy, (n_s, 4) boxes in the order the regions were formed.
        rng: draws one uniform number per region, strategy by strategy.

    Returns:
        (N, 4) boxes, best first, each box once.
    """
    if not hierarchies:
        return np.zeros((0, 4), dtype=np.float64)
    values = []
    for boxes in hierarchies:
        position = np.arange(len(boxes), 0, -1, dtype=np.float64)   # the last merge (whole image) is 1
        values.append(position * rng.random(len(boxes)))
    boxes = np.concatenate(hierarchies)[np.argsort(np.concatenate(values), kind="stable")]
    # Duplicates are removed only after ranking, so a box found by many strategies keeps its best rank.
    _, first = np.unique(np.ascontiguousarray(boxes).view([("", boxes.dtype)] * 4).ravel(), return_index=True)
    return boxes[np.sort(first)]


def _ours(image: np.ndarray, plan: list[Strategy], *, seed: int, sigma: float, min_size: int | None,
          segmenter: Segmenter) -> np.ndarray:
    by_space: dict[str, dict[float, list[Strategy]]] = defaultdict(lambda: defaultdict(list))
    for strategy in plan:
        by_space[strategy.colour_space][strategy.k].append(strategy)
    found: dict[Strategy, np.ndarray] = {}
    for space, by_k in by_space.items():
        converted = convert_colour(image, space)
        sims = [s.similarity for group in by_k.values() for s in group]
        colour = colour_codes(converted) if any("C" in s for s in sims) else None
        texture = texture_codes(converted) if any("T" in s for s in sims) else None
        # one sorted edge list serves every k of this colour space
        shared = segmenter == "opencv" and segmentation.available(converted)
        graph = pixel_graph(converted, sigma=sigma) if shared else None
        for k, group in by_k.items():
            labels = segment(converted, k, sigma=sigma, min_size=min_size, segmenter=segmenter, graph=graph)
            regions = build_regions(labels, colour=colour, texture=texture)
            for strategy in group:
                found[strategy] = hierarchical_grouping(regions, strategy.similarity)
    return rank_hierarchies([found[s] for s in plan], np.random.default_rng(seed))


def _opencv(image: np.ndarray, mode: Mode, *, sigma: float) -> np.ndarray:
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))   # OpenCV wants BGR
    if mode == "single":
        search.switchToSingleStrategy(k=200, sigma=sigma)
    elif mode == "fast":
        search.switchToSelectiveSearchFast(sigma=sigma)
    else:
        search.switchToSelectiveSearchQuality(sigma=sigma)
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)   # (x, y, w, h), best first
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def selective_search(image: np.ndarray, mode: Mode = "fast", *, backend: Backend = "ours", max_side: int = 1000,
                     min_box_size: int = 10, top_k: int | None = 2000, seed: int = 0,
                     colour_spaces: Sequence[str] | None = None, ks: Sequence[float] | None = None,
                     similarities: Sequence[str] | None = None, sigma: float = 0.8, min_size: int | None = None,
                     segmenter: Segmenter = "opencv") -> np.ndarray:
    """Class-agnostic object proposals for one image.

    Args:
        image: (H, W, 3) uint8 RGB (grayscale (H, W) is accepted too).
        mode: ``single``, ``fast`` or ``quality`` (the paper's, see the module docstring).
        backend: ``ours`` or ``opencv`` (OpenCV-contrib's implementation; it uses only ``mode``, ``sigma`` and
            the size knobs, and its ranking draws from an RNG that Python cannot seed, so its order -- and
            hence its top-k -- may differ between runs).
        max_side: images with a longer side are processed shrunk to it; boxes are scaled back. <=0: never.
        min_box_size: boxes narrower or lower than this (image pixels, capped at the image size) are dropped.
        top_k: keep at most this many best-ranked boxes; None or <=0 keeps all.
        seed: seed of the ranking's random factor (Sec. 3.3); same seed, same boxes in the same order.
        colour_spaces, ks, similarities: replace the mode's axes, e.g. ``ks=[50, 100]``,
            ``similarities=["C+T+S+F"]``; colour spaces from rgb, hsv, lab, rgi, i, h.
        sigma: Gaussian smoothing before segmentation (the paper uses 0.8).
        min_size: smallest initial segment in pixels (default: k, as in the authors' code).
        segmenter: ``opencv`` or ``skimage`` implementation of the Felzenszwalb-Huttenlocher segmentation.

    Returns:
        (N, 4) float32 ``(x1, y1, x2, y2)`` in ``image``'s pixels, best-ranked first.
    """
    image = _as_rgb(image)
    height, width = image.shape[:2]
    small = resize_to_max_side(image, int(max_side))
    if backend == "ours":
        plan = strategies(mode, colour_spaces=colour_spaces, ks=ks, similarities=similarities)
        boxes = _ours(small, plan, seed=int(seed), sigma=float(sigma), min_size=min_size, segmenter=segmenter)
    elif backend == "opencv":
        if mode not in MODES:
            raise ValueError(f"unknown selective search mode '{mode}' (choose from {', '.join(MODES)})")
        boxes = _opencv(small, mode, sigma=float(sigma))
    else:
        raise ValueError(f"unknown selective search backend '{backend}' (choose ours or opencv)")
    scale = np.array([width / small.shape[1], height / small.shape[0]] * 2)
    boxes = np.clip(boxes * scale, 0, [width, height, width, height]).astype(np.float32)
    extent = boxes[:, 2:] - boxes[:, :2]
    keep = (extent[:, 0] >= min(min_box_size, width)) & (extent[:, 1] >= min(min_box_size, height))
    boxes = boxes[keep]
    if top_k is not None and top_k > 0:
        boxes = boxes[:top_k]
    return np.ascontiguousarray(boxes)
