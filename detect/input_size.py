"""Object sizes at the network input, and the input size and anchors chosen from them.

The model resizes every image so that its shorter side is ``min_size`` and its longer at
most ``max_size`` (Faster R-CNN Sec. 3.3: 600 / 1000). On photos much larger than that,
small objects shrink to a few pixels, below what a stride-8 or stride-16 trunk can tell
apart, and the anchors of a paper recipe (128-512 px) match none of them. This module
measures the objects as the network sees them and applies one rule:

* **input size**: the smallest shorter side (a multiple of 32, at least 256) at which
  95% of the objects of every class are at least 16 px (``sqrt(w * h)``;
  ``model.input.auto_min_object``) at the network input; the longer side is then chosen
  so that no image is shrunk further by it. The shorter side is never above the largest
  native shorter side (upsampling adds no detail) and both sides stay under 1333 px
  (Detectron's largest default, ``model.input.auto_max_size``); when a cap stops the
  rule early, the suggestion says which, and the fraction it does reach.
* **anchors**: k-means of the objects' log sizes and log aspect ratios at that input
  size (as many sizes and ratios as the config lists), so that most objects have an
  anchor at IoU >= 0.7 (the RPN's positive threshold, Sec. 3.1.2).

A config asks for the rule with ``model.input.auto: true`` and / or ``model.anchors.auto:
true``; :func:`apply_auto_sizes` resolves them from the training records before the model
is built, so the run's ``config.yaml`` and checkpoints hold the numbers actually used.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.cluster import KMeans

from detect.config import Config
from detect.data.image import image_size
from detect.data.records import ImageRecord
from detect.errors import ConfigError, DatasetError, ImageReadError

MIN_SIDE = 16.0          # px at the network input: one feature cell at stride 16, two at stride 8
COVERAGE = 0.95          # fraction of the objects that must reach MIN_SIDE
MAX_SIZE = 1333          # largest side the rule picks (Detectron's 800 / 1333 default)
MIN_SHORT = 256          # smallest shorter side it picks (the tiny recipes' size)
SIZE_STEP = 32           # shorter sides are multiples of this (the trunks' padding)


@dataclass(frozen=True)
class ObjectTable:
    """Every object of a set of records, in native pixels: one row per box."""

    widths: np.ndarray       # (N,) box widths
    heights: np.ndarray      # (N,) box heights
    labels: np.ndarray       # (N,) class indices
    image_short: np.ndarray  # (N,) shorter side of the box's image
    image_long: np.ndarray   # (N,) longer side of the box's image
    shorts: np.ndarray       # (M,) shorter side of every image of known size (boxes or not)
    longs: np.ndarray        # (M,) longer side of every image of known size

    def scales(self, min_size: int, max_size: int) -> np.ndarray:
        """(N,) the resize factor of each box's image: ``min(min_size / short, max_size / long)``."""
        return np.minimum(min_size / self.image_short, max_size / self.image_long)

    def longer_side(self, short: int, *, max_size: int = MAX_SIZE, step: int = SIZE_STEP) -> int:
        """The longer-side cap paired with ``short``: the widest image not shrunk further, at most ``max_size``."""
        aspect = float((self.longs / self.shorts).max()) if len(self.shorts) else 4 / 3
        return max(short, min(max_size, math.ceil(short * aspect / step) * step))

    def sides(self, min_size: int, max_size: int) -> np.ndarray:
        """(N,) ``sqrt(w * h)`` of each box at the network input."""
        return np.sqrt(self.widths * self.heights) * self.scales(min_size, max_size)


def _record_size(record: ImageRecord) -> tuple[int, int] | None:
    """``(width, height)`` from the annotation, else from the image header; None when unknown."""
    if record.width > 0 and record.height > 0:
        return record.width, record.height
    try:
        return image_size(record.path)
    except ImageReadError:
        return None


def object_table(records: Sequence[ImageRecord]) -> ObjectTable:
    """Collect the boxes and image sizes of ``records`` (images of unknown size are left out)."""
    cols: dict[str, list] = {k: [] for k in ("w", "h", "label", "short", "long")}
    shorts, longs = [], []
    for record in records:
        size = _record_size(record)
        if size is None:
            continue
        short, long = min(size), max(size)
        shorts.append(short)
        longs.append(long)
        n = len(record.boxes)
        cols["w"].append(record.boxes[:, 2] - record.boxes[:, 0])
        cols["h"].append(record.boxes[:, 3] - record.boxes[:, 1])
        cols["label"].append(record.labels)
        cols["short"].append(np.full(n, short, np.float64))
        cols["long"].append(np.full(n, long, np.float64))
    cat = {k: np.concatenate(v).astype(np.float64) if v else np.zeros(0) for k, v in cols.items()}
    return ObjectTable(widths=cat["w"], heights=cat["h"], labels=cat["label"].astype(np.int64),
                       image_short=cat["short"], image_long=cat["long"],
                       shorts=np.asarray(shorts, np.float64), longs=np.asarray(longs, np.float64))


def resized_box_shapes(records: Sequence[ImageRecord], min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) widths and (N,) heights of all boxes after resizing their images like the model's input pipeline."""
    table = object_table(records)
    scale = table.scales(min_size, max_size)
    return table.widths * scale, table.heights * scale


@dataclass(frozen=True)
class ClassSizes:
    """Object sizes of one class (or of all, ``name="all"``) at the network input, in px of ``sqrt(w * h)``."""

    name: str
    count: int
    median: float
    p5: float
    under_16: float          # fraction of the objects smaller than 16 px
    under_32: float


def size_statistics(records: Sequence[ImageRecord], class_names: Sequence[str], *, min_size: int,
                    max_size: int) -> list[ClassSizes]:
    """One :class:`ClassSizes` per class (classes without objects: count 0, NaN sizes), then one for all."""
    table = object_table(records)
    sides = table.sides(min_size, max_size)
    rows = []
    for index, name in [*enumerate(class_names), (-1, "all")]:
        s = sides if index < 0 else sides[table.labels == index]
        if len(s) == 0:
            rows.append(ClassSizes(name, 0, math.nan, math.nan, math.nan, math.nan))
            continue
        rows.append(ClassSizes(name, len(s), float(np.median(s)), float(np.percentile(s, 5)),
                               float((s < 16).mean()), float((s < 32).mean())))
    return rows


@dataclass(frozen=True)
class InputSuggestion:
    """The rule's input size, and what it reaches.

    Attributes:
        min_size, max_size: shorter side and cap of the longer side (``model.input``).
        covered: fraction of all the objects at least ``min_side`` px at that size.
        worst: the lowest such fraction of a class (the rule's criterion).
        limited_by: "" when ``worst`` reaches ``coverage``, else the cap that stopped the rule.
    """

    min_size: int
    max_size: int
    covered: float
    worst: float
    min_side: float
    coverage: float
    limited_by: str = ""

    def describe(self) -> str:
        text = (f"shorter side {self.min_size}, longer <= {self.max_size}: {self.covered:.1%} of the objects "
                f"(at least {self.worst:.1%} of each class) >= {self.min_side:g} px at the network input")
        if self.limited_by:
            text += f" (target {self.coverage:.0%} not reached: capped by the {self.limited_by})"
        return text


def suggest_input_size(records: Sequence[ImageRecord], *, min_side: float = MIN_SIDE, coverage: float = COVERAGE,
                       max_size: int = MAX_SIZE, min_short: int = MIN_SHORT, step: int = SIZE_STEP) -> InputSuggestion:
    """The smallest input size at which ``coverage`` of each class's objects are at least ``min_side`` px.

    Candidate shorter sides run from ``min_short`` up in multiples of ``step`` to the cap
    ``min(largest native shorter side, max_size)``; each is paired with the longer-side cap
    ``ceil(short * widest aspect / step) * step`` (at most ``max_size``) and scored with the
    model's own resize. Returns the first that reaches ``coverage`` for every class (so a
    rare small class is not outvoted by a common large one), else the cap.

    Raises:
        DatasetError: no object in an image of known size.
    """
    table = object_table(records)
    if len(table.widths) == 0:
        raise DatasetError("no objects in images of known size: cannot choose an input size from the data "
                           "(set model.input.auto=false and give model.input.min_size / max_size)")
    native = int(table.shorts.max())
    cap = min(native, max_size)
    lo = min(min_short, cap)
    candidates = sorted({lo, cap, *range(math.ceil(lo / step) * step, cap, step)})
    classes = [table.labels == c for c in np.unique(table.labels)]
    for short in candidates:
        long = table.longer_side(short, max_size=max_size, step=step)
        # a tolerance so that an object landing exactly on min_side counts whatever the float rounding
        big = table.sides(short, long) >= min_side - 1e-6
        covered, worst = float(big.mean()), min(float(big[c].mean()) for c in classes)
        if worst >= coverage:
            return InputSuggestion(short, long, covered, worst, min_side, coverage)
    return InputSuggestion(short, long, covered, worst, min_side, coverage,
                           limited_by="images' native size" if native <= max_size else f"largest size {max_size}")


def anchor_coverage(widths: np.ndarray, heights: np.ndarray, sizes, ratios) -> np.ndarray:
    """Best IoU of each box with an anchor shape of the same centre, (N,).

    Centred IoU is the best an anchor of that shape can reach; the grid stride only lowers it.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    ratios = np.asarray(ratios, dtype=np.float64)
    aw = (sizes[None, :] / np.sqrt(ratios)[:, None]).ravel()
    ah = (sizes[None, :] * np.sqrt(ratios)[:, None]).ravel()
    inter = np.minimum(widths[:, None], aw[None]) * np.minimum(heights[:, None], ah[None])
    union = (widths * heights)[:, None] + (aw * ah)[None] - inter
    return (inter / union).max(axis=1)


def suggest_anchors(widths: np.ndarray, heights: np.ndarray, num_sizes: int = 3, num_ratios: int = 3,
                    seed: int = 0) -> tuple[list[float], list[float]]:
    """Cluster log sqrt(area) into ``num_sizes`` sizes and log(h / w) into ``num_ratios`` ratios (k-means).

    Boxes of fewer distinct sizes (ratios) than asked for give that many, rather than repeated anchors.

    Raises:
        DatasetError: no boxes.
    """
    if len(widths) == 0:
        raise DatasetError("no boxes: anchors cannot be chosen from the data")

    def centres(values: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(np.unique(np.round(values, 6))))
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(values.reshape(-1, 1))
        return np.sort(np.exp(km.cluster_centers_.ravel()))

    sizes = centres(0.5 * np.log(widths * heights), num_sizes)
    ratios = centres(np.log(heights / widths), num_ratios)
    return [round(float(s), 1) for s in sizes], [round(float(r), 2) for r in ratios]


def training_scales(short: int, factors: Sequence[float], *, step: int = SIZE_STEP) -> list[int]:
    """The multi-scale training sides ``short * f``, rounded to multiples of ``step`` (sorted, unique)."""
    return sorted({max(step, round(short * f / step) * step) for f in factors})


def apply_auto_sizes(cfg: Config, records: Sequence[ImageRecord], *,
                     log: Callable[[str], None] | None = None) -> Config:
    """A copy of ``cfg`` whose ``model.input`` / ``model.anchors`` marked ``auto`` are chosen from ``records``.

    ``model.input.auto``: ``min_size``, ``test_min_size`` and ``max_size`` from :func:`suggest_input_size`
    (``model.input.auto_min_object``, capped by ``model.input.auto_max_size``). ``model.anchors.auto``:
    ``sizes`` and ``ratios`` by :func:`suggest_anchors` on the boxes at the (chosen) training sizes, as
    many as the config lists (fewer when the boxes have fewer distinct shapes).
    The resolved fields have ``auto: false``, so saving and reloading the result gives the same model.
    ``cfg`` itself is not changed; without ``auto`` it is returned as is.

    Raises:
        ConfigError: ``auto`` on a pipeline without that part (R-CNN has neither, Fast R-CNN no anchors).
        DatasetError: no objects to choose from.
    """
    m = cfg.model
    if not (m.input.auto or m.anchors.auto):
        return cfg
    where = cfg.source or "config"
    if m.input.auto and m.pipeline == "rcnn":
        raise ConfigError(f"{where}: model.input.auto: R-CNN warps each proposal to rcnn.crop_size and never resizes "
                          "whole images; set model.input.auto=false")
    if m.anchors.auto and m.pipeline != "faster_rcnn":
        raise ConfigError(f"{where}: model.anchors.auto: the {m.pipeline} pipeline has no anchors (only Faster "
                          "R-CNN's RPN does); set model.anchors.auto=false")
    cfg = copy.deepcopy(cfg)
    inp, anchors = cfg.model.input, cfg.model.anchors
    say = log or (lambda message: None)
    if inp.auto:
        choice = suggest_input_size(records, min_side=inp.auto_min_object, max_size=inp.auto_max_size)
        inp.min_size, inp.test_min_size, inp.max_size, inp.auto = [choice.min_size], choice.min_size, choice.max_size, False
        say(f"model.input.auto: {choice.describe()}")
        if list(inp.auto_scales) != [1.0]:
            inp.min_size = training_scales(choice.min_size, inp.auto_scales)
            inp.max_size = object_table(records).longer_side(max(inp.min_size), max_size=inp.auto_max_size)
            say(f"model.input.auto_scales: training shorter sides {inp.min_size} (one drawn per image), longer "
                f"<= {inp.max_size}; testing at {inp.test_min_size}")
    if anchors.auto:
        shapes = [resized_box_shapes(records, s, inp.max_size) for s in inp.min_size]
        widths, heights = np.concatenate([w for w, _ in shapes]), np.concatenate([h for _, h in shapes])
        anchors.sizes, anchors.ratios = suggest_anchors(widths, heights, len(anchors.sizes), len(anchors.ratios))
        anchors.auto = False
        hit = float((anchor_coverage(widths, heights, anchors.sizes, anchors.ratios) >= 0.7).mean())
        say(f"model.anchors.auto: sizes {anchors.sizes}, ratios {anchors.ratios}: {hit:.1%} of the boxes have a "
            "centred anchor at IoU >= 0.7")
    return cfg
