"""The grouping loop of selective search, compiled (numba, just in time and cached on disk).

:mod:`proposals.grouping` calls :func:`merge_all` when numba is installed and keeps its Python loop
otherwise (and as the reference the tests compare with); both give the same bits. That matters because the
similarities decide the merge order (a pair is popped before another on a tie-break of its ids), so
a float that differed in its last bit could change the boxes. Hence:

- histogram intersections are float32 sums in numpy's own pairwise order (:func:`min_sum`), not a
  plain running sum;
- everything else is the same IEEE operations in the same order as the numpy code (numba does not
  contract a * b + c into a fused multiply-add unless fastmath is on, and it is off here).

Nothing here is compiled at install: the first call in a fresh process loads the machine code that
an earlier run cached in ``__pycache__`` (or compiles it once, when there is no cache yet).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:              # optional: the numpy / Python versions are used instead
    numba = None

# numpy's pairwise summation works on blocks of this many elements (PW_BLOCKSIZE in its loops).
_BLOCK = 128


def _compiled(function):
    return numba.njit(cache=True, nogil=True)(function) if numba is not None else function


@_compiled
def _block_min_sum(x, y, lo, n):   # pragma: no cover - compiled by numba
    # one leaf of numpy's pairwise sum (n <= 128): 8 interleaved partial sums, then the tail
    if n < 8:
        total = np.float32(0.0)
        for i in range(lo, lo + n):
            total += min(x[i], y[i])
        return total
    r0, r1, r2, r3 = min(x[lo], y[lo]), min(x[lo + 1], y[lo + 1]), min(x[lo + 2], y[lo + 2]), \
        min(x[lo + 3], y[lo + 3])
    r4, r5, r6, r7 = min(x[lo + 4], y[lo + 4]), min(x[lo + 5], y[lo + 5]), min(x[lo + 6], y[lo + 6]), \
        min(x[lo + 7], y[lo + 7])
    i = lo + 8
    end = lo + n - n % 8
    while i < end:
        r0 += min(x[i], y[i])
        r1 += min(x[i + 1], y[i + 1])
        r2 += min(x[i + 2], y[i + 2])
        r3 += min(x[i + 3], y[i + 3])
        r4 += min(x[i + 4], y[i + 4])
        r5 += min(x[i + 5], y[i + 5])
        r6 += min(x[i + 6], y[i + 6])
        r7 += min(x[i + 7], y[i + 7])
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        total += min(x[i], y[i])
        i += 1
    return total


@_compiled
def min_sum(x, y):   # pragma: no cover - compiled by numba
    """``np.minimum(x, y).sum()`` for (D,) float32 rows, bit for bit: in numpy's pairwise order.

    numpy sums runs of at most 128 elements as 8 interleaved partial sums and splits longer runs into
    two halves (the first a multiple of 8 long), recursively, adding the halves' sums; any other order
    rounds differently. The recursion is walked with an explicit stack: numba's on-disk cache of
    recursive functions crashes when loaded (numba issue 6061).
    """
    starts = np.empty(64, dtype=np.int64)     # a node: its run and how many children are done
    lengths = np.empty(64, dtype=np.int64)
    done = np.empty(64, dtype=np.int64)
    values = np.empty(64, dtype=np.float32)   # sums of finished subtrees, left before right
    depth, stacked = 1, 0
    starts[0], lengths[0], done[0] = 0, len(x), 0
    while depth > 0:
        lo, n = starts[depth - 1], lengths[depth - 1]
        if n <= _BLOCK:
            values[stacked] = _block_min_sum(x, y, lo, n)
            stacked += 1
            depth -= 1
            continue
        half = n // 2
        half -= half % 8
        if done[depth - 1] == 2:
            values[stacked - 2] = values[stacked - 2] + values[stacked - 1]
            stacked -= 1
            depth -= 1
            continue
        left = done[depth - 1] == 0
        done[depth - 1] += 1
        starts[depth] = lo if left else lo + half
        lengths[depth] = half if left else n - half
        done[depth] = 0
        depth += 1
    return values[0]


@_compiled
def _pair_score(hist, sizes, boxes, p, q, area, use_hist, use_size, use_fill):   # pragma: no cover - numba
    # Term by term in the order of grouping.py's numpy code: intersection (float32, widened), S, F.
    score = np.float64(min_sum(hist[p], hist[q])) if use_hist else 0.0
    joint = sizes[p] + sizes[q]
    if use_size:
        score += 1.0 - joint / area
    if use_fill:
        w = max(boxes[p, 2], boxes[q, 2]) - min(boxes[p, 0], boxes[q, 0])
        h = max(boxes[p, 3], boxes[q, 3]) - min(boxes[p, 1], boxes[q, 1])
        score += 1.0 - (w * h - joint) / area
    return score


@_compiled
def _before(key, a, b, k, i, j):   # pragma: no cover - compiled by numba
    # Python's tuple order on (key, a, b), as heapq compared them: ties go to the smaller ids.
    return key < k or (key == k and (a < i or (a == i and b < j)))


@_compiled
def _sift_down(keys, first, second, pos, count):   # pragma: no cover - compiled by numba
    key, a, b = keys[pos], first[pos], second[pos]
    while True:
        child = 2 * pos + 1
        if child >= count:
            break
        if child + 1 < count and _before(keys[child + 1], first[child + 1], second[child + 1],
                                         keys[child], first[child], second[child]):
            child += 1
        if not _before(keys[child], first[child], second[child], key, a, b):
            break
        keys[pos], first[pos], second[pos] = keys[child], first[child], second[child]
        pos = child
    keys[pos], first[pos], second[pos] = key, a, b


@_compiled
def _sift_up(keys, first, second, pos):   # pragma: no cover - compiled by numba
    key, a, b = keys[pos], first[pos], second[pos]
    while pos > 0:
        parent = (pos - 1) // 2
        if not _before(key, a, b, keys[parent], first[parent], second[parent]):
            break
        keys[pos], first[pos], second[pos] = keys[parent], first[parent], second[parent]
        pos = parent
    keys[pos], first[pos], second[pos] = key, a, b


@_compiled
def _grown(array, size):   # pragma: no cover - compiled by numba
    if size < len(array):
        return array
    bigger = np.empty(2 * len(array) + 16, dtype=array.dtype)
    for i in range(len(array)):         # a loop: a slice assignment takes seconds longer to compile
        bigger[i] = array[i]
    return bigger


@_compiled
def merge_all(pairs, hist, sizes, boxes, n, area, use_hist, use_size, use_fill):   # pragma: no cover - numba
    """Algorithm 1's loop, as :func:`proposals.grouping._merge_all`; returns how many rows are in use.

    Args:
        pairs: (E, 2) int64 adjacent initial regions.
        hist: (C, D) float32, rows :n filled (D may be 0 when ``use_hist`` is False); C >= 2n - 1.
        sizes: (C,) float64, boxes: (C, 4) float64, rows :n filled.

    The pair heap holds (-similarity, a, b) with lazy deletion; neighbour lists are linked lists that
    keep merged regions until their owner is merged itself (skipped then, so no removal is needed).
    """
    capacity = sizes.shape[0]
    keys = np.empty(len(pairs) + 16, dtype=np.float64)
    first = np.empty(len(pairs) + 16, dtype=np.int64)
    second = np.empty(len(pairs) + 16, dtype=np.int64)
    head = np.full(capacity, -1, dtype=np.int64)
    link = np.empty(2 * len(pairs) + 16, dtype=np.int64)
    other = np.empty(2 * len(pairs) + 16, dtype=np.int64)
    links = 0
    for e in range(len(pairs)):
        a, b = pairs[e, 0], pairs[e, 1]
        keys[e], first[e], second[e] = -_pair_score(hist, sizes, boxes, a, b, area, use_hist, use_size,
                                                    use_fill), a, b
        other[links], link[links], head[a] = b, head[a], links
        other[links + 1], link[links + 1], head[b] = a, head[b], links + 1
        links += 2
    count = len(pairs)
    for pos in range(count // 2 - 1, -1, -1):
        _sift_down(keys, first, second, pos, count)
    alive = np.zeros(capacity, dtype=np.bool_)
    for r in range(n):
        alive[r] = True
    seen = np.full(capacity, -1, dtype=np.int64)
    around = np.empty(capacity, dtype=np.int64)
    t = n
    while count > 0:
        i, j = first[0], second[0]
        count -= 1
        keys[0], first[0], second[0] = keys[count], first[count], second[count]
        _sift_down(keys, first, second, 0, count)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        alive[t] = True
        sizes[t] = sizes[i] + sizes[j]
        boxes[t, 0], boxes[t, 1] = min(boxes[i, 0], boxes[j, 0]), min(boxes[i, 1], boxes[j, 1])
        boxes[t, 2], boxes[t, 3] = max(boxes[i, 2], boxes[j, 2]), max(boxes[i, 3], boxes[j, 3])
        # the size-weighted mean in float64, rounded to float32 (numpy's float32 row times a float64 scalar)
        for d in range(hist.shape[1]):
            hist[t, d] = (np.float64(hist[i, d]) * sizes[i] + np.float64(hist[j, d]) * sizes[j]) / sizes[t]
        found = 0
        for r in (i, j):
            e = head[r]
            while e >= 0:
                u = other[e]
                if alive[u] and seen[u] != t:
                    seen[u] = t
                    around[found] = u
                    found += 1
                e = link[e]
        for f in range(found):
            u = around[f]
            link, other = _grown(link, links + 1), _grown(other, links + 1)
            other[links], link[links], head[u] = t, head[u], links
            other[links + 1], link[links + 1], head[t] = u, head[t], links + 1
            links += 2
            keys, first, second = _grown(keys, count), _grown(first, count), _grown(second, count)
            keys[count] = -_pair_score(hist, sizes, boxes, u, t, area, use_hist, use_size, use_fill)
            first[count], second[count] = u, t
            _sift_up(keys, first, second, count)
            count += 1
        t += 1
    return t
