"""What a split holds: objects per class and object sizes, in image pixels and at the detector's input scale.

An object's size is ``sqrt(w * h)`` of its box, so the COCO ranges read as sides: small
below 32 px, medium below 96 px (areas 32² and 96², as :data:`detect.analysis.curves.SIZE_RANGES`).
At the input scale, each image is resized as the detector's test transform resizes it
(shorter side to ``min_size``, longer side at most ``max_size``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from detect.data.records import ImageRecord
from detect.utils.io import save_figure

SIZE_EDGES = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, math.inf)
COCO_EDGES = (0.0, 32.0, 96.0, math.inf)
COCO_NAMES = ("small", "medium", "large")


def class_distribution(records: list[ImageRecord], class_names: list[str]) -> dict[str, dict[str, int]]:
    """Per class: ``objects`` (all), ``difficult`` (of those) and ``images`` (holding at least one)."""
    out = {name: {"objects": 0, "difficult": 0, "images": 0} for name in class_names}
    for record in records:
        labels = np.asarray(record.labels, np.int64).reshape(-1)
        difficult = np.asarray(record.difficult, bool).reshape(-1)
        objects = np.bincount(labels, minlength=len(class_names))
        hard = np.bincount(labels[difficult], minlength=len(class_names))
        for c, name in enumerate(class_names):
            out[name]["objects"] += int(objects[c])
            out[name]["difficult"] += int(hard[c])
            out[name]["images"] += int(objects[c] > 0)
    return out


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor an image is resized by: shorter side to ``min_size`` unless the longer then exceeds ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def object_sides(records: list[ImageRecord], *,
                 resize: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sides)``: (N,) each, every object of ``records``; sides ``sqrt(w * h)`` in image pixels,
    or at the input scale of ``resize = (min_size, max_size)`` (then images of unknown size are left out)."""
    labels, sides = [], []
    for record in records:
        if resize is not None and (record.width <= 0 or record.height <= 0):
            continue
        boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4)
        side = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
        if resize is not None:
            side = side * resize_scale(record.height, record.width, *resize)
        labels.append(np.asarray(record.labels, np.int64).reshape(-1))
        sides.append(side)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(labels), np.concatenate(sides)


def size_histogram(labels: np.ndarray, sides: np.ndarray, class_names: list[str], *,
                   edges: tuple[float, ...] = SIZE_EDGES) -> dict:
    """Objects per size bin ``[edges[k], edges[k + 1])``: ``{"edges", "all": counts, "per_class": {name: counts}}``."""
    def counts(mask: np.ndarray) -> list[int]:
        return np.histogram(sides[mask], bins=np.asarray(edges))[0].astype(int).tolist()

    return {"edges": list(edges), "all": counts(np.ones(len(sides), bool)),
            "per_class": {name: counts(labels == c) for c, name in enumerate(class_names)}}


def bin_names(edges: tuple[float, ...]) -> list[str]:
    """``"8-16"`` style names of the bins, ``"512+"`` for the open last one."""
    def fmt(v: float) -> str:
        return f"{v:g}"

    return [f"{fmt(a)}+" if math.isinf(b) else f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]


def plot_distributions(distribution: dict[str, dict[str, int]], sides: dict[str, np.ndarray],
                       path: str | Path) -> Path:
    """Objects per class (bars) and histograms of object sides, one line per scale (log axis), as a PNG.

    Args:
        distribution: :func:`class_distribution`'s result.
        sides: scale name (e.g. "image pixels") -> (N,) sides.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bar_ax, size_ax) = plt.subplots(1, 2, figsize=(12, 3.6))
    names = list(distribution)
    bar_ax.bar(range(len(names)), [distribution[n]["objects"] for n in names], color="tab:blue")
    bar_ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right"
                      if len(names) > 6 else "center")
    bar_ax.set(title="objects per class", ylabel="objects")
    finite = [v[v > 0] for v in sides.values()]
    top = max([float(v.max()) for v in finite if len(v)] + [2.0])
    bins = np.geomspace(1.0, max(2.0, top * 1.05), 30)
    for name, values in sides.items():
        size_ax.hist(np.clip(values, 1.0, None), bins=bins, histtype="step", lw=1.5, label=name)
    for edge in (32, 96):
        size_ax.axvline(edge, color="grey", ls="--", lw=0.8)
    size_ax.set(title="object size sqrt(w*h) (dashed: 32 and 96 px)", xscale="log", xlabel="pixels",
                ylabel="objects")
    if sides:
        size_ax.legend(fontsize=8)
    for ax in (bar_ax, size_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
