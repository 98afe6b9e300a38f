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
its similarity to all its neighbours in one vectorised step.
"""

from __future__ import annotations

import heapq

import numpy as np

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

    def similarity_to(t: int, others: np.ndarray) -> np.ndarray:
        score = np.zeros(len(others), dtype=np.float64)
        if hist is not None:
            score += np.minimum(hist[others], hist[t]).sum(axis=1)
        if use_size or use_fill:
            joint = sizes[others] + sizes[t]
            if use_size:
                score += 1.0 - joint / area
            if use_fill:
                lo = np.minimum(boxes[others, :2], boxes[t, :2])
                hi = np.maximum(boxes[others, 2:], boxes[t, 2:])
                score += 1.0 - ((hi - lo).prod(axis=1) - joint) / area
        return score

    neighbours: list[set[int]] = [set() for _ in range(n)]
    heap: list[tuple[float, int, int]] = []
    pairs = regions.pairs
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

    alive = [True] * n
    t = n
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        alive.append(True)
        si, sj = sizes[i], sizes[j]
        sizes[t] = si + sj
        boxes[t, :2] = np.minimum(boxes[i, :2], boxes[j, :2])
        boxes[t, 2:] = np.maximum(boxes[i, 2:], boxes[j, 2:])
        if hist is not None:
            hist[t] = (hist[i] * si + hist[j] * sj) / (si + sj)
        around = (neighbours[i] | neighbours[j]) - {i, j}
        neighbours[i] = neighbours[j] = set()
        for u in around:
            nu = neighbours[u]
            nu.discard(i)
            nu.discard(j)
            nu.add(t)
        neighbours.append(around)
        if around:
            others = np.fromiter(around, dtype=np.int64, count=len(around))
            for score, u in zip(similarity_to(t, others).tolist(), others.tolist()):
                heapq.heappush(heap, (-score, u, t))
        t += 1
    return boxes[:t].copy()
