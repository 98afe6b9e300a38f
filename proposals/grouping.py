"""Hierarchical grouping of selective search (Uijlings et al. 2013, Sec. 3.1-3.2, Algorithm 1).

Starting from the initial regions, the two most similar neighbours are merged again and again
until one region covers the image; every region ever formed is a proposal. Similarity is a sum of
the paper's measures (Sec. 3.2), each in [0, 1]:

- colour ``C``: histogram intersection of the colour histograms;
- texture ``T``: histogram intersection of the texture histograms;
- size ``S``: ``1 - (size_i + size_j) / size(image)``, which makes small regions merge early;
- fill ``F``: ``1 - (size(BB_ij) - size_i - size_j) / size(image)``, which favours regions that fit
  into each other.

Written by hand because no maintained library implements this grouping. The pair similarities live
in a binary heap with lazy deletion (a popped pair whose region has already been merged is skipped);
a merge computes the new region's histograms as the size-weighted mean of its parts (Sec. 3.2) and
its similarity to each of its neighbours. The loop runs compiled by numba
(:func:`proposals.grouping_kernels.merge_all`, about 7x faster); the Python loop here is used
without numba and gives the same boxes, bit for bit (tests/test_grouping_kernels.py).
"""

from __future__ import annotations

import heapq

import numpy as np

from proposals import grouping_kernels as kernels
from proposals.features import RegionSet

SIMILARITY_TERMS = "CTSF"


def check_similarity(similarity: str) -> str:
    """Normalise a similarity combination such as ``"C+T+S+F"`` or ``"tsf"`` to ``"CTSF"`` order."""
    letters = similarity.replace("+", "").upper()
    if not letters or any(ch not in SIMILARITY_TERMS for ch in letters) or len(set(letters)) != len(letters):
        raise ValueError(f"similarity '{similarity}' must combine the letters C, T, S, F (e.g. 'C+T+S+F')")
    return "".join(ch for ch in SIMILARITY_TERMS if ch in letters)


def hierarchical_grouping(regions: RegionSet, similarity: str) -> np.ndarray:
    """Merge regions greedily by similarity until none are left to merge.

    Args:
        regions: the initial regions with the histograms ``similarity`` needs.
        similarity: letters of the measures to add up, e.g. ``"CTSF"``, ``"TSF"``, ``"F"``, ``"S"``.

    Returns:
        (n + m, 4) float64 boxes ``(x1, y1, x2, y2)``: the n initial regions in label order, then the
        m merged regions in the order they were formed (the last one covers the whole image when the
        region graph is connected).
    """
    sim = check_similarity(similarity)
    n = regions.n
    capacity = max(2 * n - 1, 1)
    area = regions.image_area
    use_size, use_fill = "S" in sim, "F" in sim

    parts = []
    for letter, hist in (("C", regions.colour), ("T", regions.texture)):
        if letter in sim:
            if hist is None:
                raise ValueError(f"similarity '{sim}' needs the {letter} histograms, which were not computed")
            parts.append(hist)
    hist = None
    if parts:
        dims = sum(p.shape[1] for p in parts)
        hist = np.empty((capacity, dims), dtype=np.float32)
        hist[:n] = np.concatenate(parts, axis=1)
    sizes = np.empty(capacity, dtype=np.float64)
    sizes[:n] = regions.sizes
    boxes = np.empty((capacity, 4), dtype=np.float64)
    boxes[:n] = regions.boxes

    if kernels.numba is not None:
        flat = hist if hist is not None else np.empty((capacity, 0), dtype=np.float32)   # D = 0: no C, T
        pairs = np.ascontiguousarray(regions.pairs, dtype=np.int64).reshape(-1, 2)
        count = kernels.merge_all(pairs, flat, sizes, boxes, n, float(area), hist is not None, use_size, use_fill)
    else:
        count = _merge_python(regions.pairs, hist, sizes, boxes, n=n, area=area, use_size=use_size,
                              use_fill=use_fill)
    return boxes[:count].copy()


def _merge_python(pairs: np.ndarray, hist: np.ndarray | None, sizes: np.ndarray, boxes: np.ndarray, *, n: int,
                  area: float, use_size: bool, use_fill: bool) -> int:
    """The grouping without numba (and the reference of :func:`proposals.grouping_kernels.merge_all`): first scores
    vectorised, then :func:`_merge_all`. Arguments as there; returns how many rows are in use."""
    neighbours: list[set[int]] = [set() for _ in range(n)]
    heap: list[tuple[float, int, int]] = []
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        first = np.zeros(len(pairs), dtype=np.float64)
        if hist is not None:
            first += np.minimum(hist[a], hist[b]).sum(axis=1)
        joint = sizes[a] + sizes[b]
        if use_size:
            first += 1.0 - joint / area
        if use_fill:
            extent = np.maximum(boxes[a, 2:], boxes[b, 2:]) - np.minimum(boxes[a, :2], boxes[b, :2])
            first += 1.0 - (extent.prod(axis=1) - joint) / area
        a_list, b_list = a.tolist(), b.tolist()
        for i, j in zip(a_list, b_list):
            neighbours[i].add(j)
            neighbours[j].add(i)
        # Ties are broken by the region ids, so the merge order is a pure function of the input.
        heap = list(zip((-first).tolist(), a_list, b_list))
        heapq.heapify(heap)
    return _merge_all(heap, neighbours, hist, sizes, boxes, n=n, area=area, use_size=use_size, use_fill=use_fill)


def _merge_all(heap: list[tuple[float, int, int]], neighbours: list[set[int]], hist: np.ndarray | None,
               sizes: np.ndarray, boxes: np.ndarray, *, n: int, area: float, use_size: bool, use_fill: bool) -> int:
    """Algorithm 1's loop: pop the most similar live pair, merge it, score the new region's neighbours.

    Fills rows n.. of ``hist`` (C, D), ``sizes`` (C,) and ``boxes`` (C, 4) in place and returns how many
    rows are in use. Sizes and boxes are followed as Python floats (a merge touches a handful of
    neighbours, where numpy's per-call cost would dominate); it is the same IEEE double arithmetic, in
    the same order, as a vectorised score, so the merges do not depend on it. Histograms stay float32
    rows, merged in float64 as the size-weighted mean (Sec. 3.2).
    """
    size_of = sizes[:n].tolist()
    box_of = [tuple(b) for b in boxes[:n].tolist()]
    alive = [True] * n
    heappop, heappush, f64 = heapq.heappop, heapq.heappush, np.float64
    t = n
    while heap:
        _, i, j = heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        alive.append(True)
        si, sj = size_of[i], size_of[j]
        st = si + sj
        size_of.append(st)
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = box_of[i], box_of[j]
        x1, y1 = (ax1 if ax1 < bx1 else bx1), (ay1 if ay1 < by1 else by1)
        x2, y2 = (ax2 if ax2 > bx2 else bx2), (ay2 if ay2 > by2 else by2)
        box_of.append((x1, y1, x2, y2))
        if hist is not None:
            # float64 scalars: with Python floats numpy would compute this mean in float32
            hist[t] = (hist[i] * f64(si) + hist[j] * f64(sj)) / f64(st)
        around = (neighbours[i] | neighbours[j]) - {i, j}
        neighbours[i] = neighbours[j] = set()
        for u in around:
            nu = neighbours[u]
            nu.discard(i)
            nu.discard(j)
            nu.add(t)
        neighbours.append(around)
        if around:
            others = list(around)
            if hist is not None:
                scores = np.minimum(hist[others], hist[t]).sum(axis=1).tolist()
            else:
                scores = [0.0] * len(others)
            for score, u in zip(scores, others):
                if use_size or use_fill:
                    joint = size_of[u] + st
                    if use_size:
                        score += 1.0 - joint / area
                    if use_fill:
                        ux1, uy1, ux2, uy2 = box_of[u]
                        w = (ux2 if ux2 > x2 else x2) - (ux1 if ux1 < x1 else x1)
                        h = (uy2 if uy2 > y2 else y2) - (uy1 if uy1 < y1 else y1)
                        score += 1.0 - (w * h - joint) / area
                heappush(heap, (-score, u, t))
        t += 1
    if t > n:
        sizes[n:t] = size_of[n:]
        boxes[n:t] = box_of[n:]
    return t
