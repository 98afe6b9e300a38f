"""False-positive analysis of Hoiem, Chodpathumwan and Dai, "Diagnosing Error in Object Detectors" (ECCV 2012).

The R-CNN paper (Sec. 3.2 / Fig. 5) used this analysis. Each ranked detection of a
class is one of:

* ``correct``: a true positive exactly as the VOC devkit counts it;
* ``localization``: overlaps an object of its own class with 0.1 <= IoU < 0.5, or
  is a duplicate (IoU >= 0.5 with an object already detected);
* ``similar``: IoU >= 0.1 with an object of a similar class (same group);
* ``other``: IoU >= 0.1 with an object of any other class;
* ``background``: everything else,

tested in that order. Detections the devkit ignores (matching a difficult object)
are left out. The cost of each error type is the AP gained when its false
positives are removed from the ranking (true positives stay as they are: removing
a false positive never changes which detection matched an object first).

Similar classes come from a grouping. For PASCAL VOC the groups of Hoiem et al.:
all animals including person, all vehicles, furniture (chair, diningtable,
sofa), and aeroplane with bird (their "similar objects" for aeroplane are bird,
boat and car). Other datasets have none unless given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from detect.analysis.curves import RankedClass, ap_from_tp_fp, rank_classes
from detect.config import VOC_CLASSES
from detect.data.records import ImageRecord
from detect.data.voc import from_voc_pixels
from detect.errors import ConfigError
from detect.utils.io import save_figure

ERROR_TYPES = ("correct", "localization", "similar", "other", "background")
CORRECT, LOCALIZATION, SIMILAR, OTHER, BACKGROUND = range(5)
FALSE_POSITIVE_TYPES = ERROR_TYPES[1:]
IGNORED = -1
# Hoiem et al.'s plot colours: white-ish correct, blue localisation, red similar, green other, purple background.
COLORS = ("#f0f0f0", "#3465a4", "#cc0000", "#4e9a06", "#75507b")

VOC_SIMILAR_GROUPS: dict[str, list[str]] = {
    "animals": ["bird", "cat", "cow", "dog", "horse", "person", "sheep"],
    "vehicles": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
    "furniture": ["chair", "diningtable", "sofa"],
    "airborne": ["aeroplane", "bird"],
}


def default_similar_groups(class_names: list[str]) -> dict[str, list[str]]:
    """VOC's groups when every class is a VOC class (restricted to those present), else none."""
    if not class_names or not set(class_names) <= set(VOC_CLASSES):
        return {}
    present = set(class_names)
    groups = {name: [c for c in members if c in present] for name, members in VOC_SIMILAR_GROUPS.items()}
    return {name: members for name, members in groups.items() if len(members) >= 2}


def parse_similar_groups(spec: str | None, class_names: list[str]) -> dict[str, list[str]]:
    """Groups from a command-line value.

    Args:
        spec: ``None`` or ``"default"`` (see :func:`default_similar_groups`), ``"none"``, an inline
            ``"animals=cat,dog;vehicles=car,bus"`` (names optional: ``"cat,dog;car,bus"``), or a
            JSON / YAML file mapping group names to class lists.

    Raises:
        ConfigError: naming an unknown class or an unreadable file.
    """
    if spec is None or spec == "default":
        return default_similar_groups(class_names)
    if spec == "none":
        return {}
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"similar-class groups: cannot read {path} ({exc})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
            raise ConfigError(f"{path}: expected a mapping of group name -> list of class names")
        groups = {str(k): [str(c) for c in v] for k, v in loaded.items()}
        where = str(path)
    else:
        groups = {}
        for i, part in enumerate(p for p in spec.split(";") if p.strip()):
            name, _, members = part.rpartition("=")
            groups[name.strip() or f"group{i + 1}"] = [c.strip() for c in members.split(",") if c.strip()]
        where = "similar-class groups"
    known = set(class_names)
    for name, members in groups.items():
        unknown = [c for c in members if c not in known]
        if unknown:
            raise ConfigError(f"{where}: group '{name}' names unknown classes {unknown} "
                              f"(the classes are {', '.join(class_names)})")
    return groups


def similar_matrix(class_names: list[str], groups: dict[str, list[str]]) -> np.ndarray:
    """(C, C) bool: classes i and j share a group (never a class with itself)."""
    index = {name: i for i, name in enumerate(class_names)}
    out = np.zeros((len(class_names), len(class_names)), dtype=bool)
    for members in groups.values():
        ids = [index[c] for c in members if c in index]
        out[np.ix_(ids, ids)] = True
    np.fill_diagonal(out, False)
    return out


@dataclass
class ClassDiagnosis:
    """The ranked, labelled detections of one class (ignored ones removed).

    Attributes:
        name: class name.
        npos: objects that count (non-difficult).
        ap: the class's AP.
        scores: (D,) decreasing.
        kinds: (D,) index into :data:`ERROR_TYPES`.
        image_index: (D,) index of each detection's image in the records.
        boxes: (D, 4) xyxy in the library convention.
        matched: (D,) for correct detections the index of the object (within its image's record), else -1.
        ap_without: AP with the false positives of each type removed.
    """

    name: str
    npos: int
    ap: float
    scores: np.ndarray
    kinds: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    matched: np.ndarray
    ap_without: dict[str, float] = field(default_factory=dict)

    def shares(self, k: int | None = None) -> dict[str, float]:
        """Share of each type among the top ``k`` detections (default: as many as there are objects)."""
        k = self.npos if k is None else k
        top = self.kinds[: max(k, 0)]
        return {name: float(np.mean(top == i)) if len(top) else 0.0 for i, name in enumerate(ERROR_TYPES)}


def _classify(rc: RankedClass, c: int, records: list[ImageRecord], similar: np.ndarray,
              metric: str) -> ClassDiagnosis:
    kinds = np.full(len(rc.scores), IGNORED, dtype=np.int64)
    matched = np.full(len(rc.scores), -1, dtype=np.int64)
    boxes = from_voc_pixels(rc.boxes) if len(rc.boxes) else np.zeros((0, 4))
    kinds[rc.tp > 0] = CORRECT
    for i in np.unique(rc.image_index):
        rows = np.flatnonzero(rc.image_index == i)
        record = records[i]
        if len(record.labels) == 0:
            kinds[rows[rc.fp[rows] > 0]] = BACKGROUND
            continue
        iou = box_iou(torch.from_numpy(boxes[rows]), torch.from_numpy(record.boxes.astype(np.float64))).numpy()
        same = record.labels == c
        sim = similar[c, record.labels]
        other = ~same & ~sim

        def best(mask: np.ndarray) -> np.ndarray:
            return iou[:, mask].max(axis=1) if mask.any() else np.zeros(len(rows))

        if same.any():
            # the devkit's match: the same-class object of largest overlap, the first one on ties
            matched[rows] = np.where(rc.tp[rows] > 0, np.flatnonzero(same)[np.argmax(iou[:, same], axis=1)], -1)
        fp_kind = np.select([best(same) >= 0.1, best(sim) >= 0.1, best(other) >= 0.1],
                            [LOCALIZATION, SIMILAR, OTHER], BACKGROUND)
        is_fp = rc.fp[rows] > 0
        kinds[rows[is_fp]] = fp_kind[is_fp]
    keep = kinds != IGNORED
    ap_without = {}
    for t, name in enumerate(ERROR_TYPES[1:], start=1):
        ap_without[name] = ap_from_tp_fp(rc.tp, np.where(kinds == t, 0.0, rc.fp), rc.npos, metric)
    ap_without["all false positives"] = ap_from_tp_fp(rc.tp, np.zeros_like(rc.fp), rc.npos, metric)
    return ClassDiagnosis(rc.name, rc.npos, rc.ap, rc.scores[keep], kinds[keep], rc.image_index[keep], boxes[keep],
                          matched[keep], ap_without)


@dataclass
class Diagnosis:
    """Error analysis of a whole split.

    Attributes:
        classes: one :class:`ClassDiagnosis` per class.
        groups: the similar-class groups used.
        metric: "voc07" or "voc10".
    """

    classes: list[ClassDiagnosis]
    groups: dict[str, list[str]]
    metric: str

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Every class's detections merged by score: (scores, kinds), best first."""
        scores = np.concatenate([d.scores for d in self.classes]) if self.classes else np.zeros(0)
        kinds = np.concatenate([d.kinds for d in self.classes]) if self.classes else np.zeros(0, np.int64)
        order = np.argsort(-scores, kind="stable")
        return scores[order], kinds[order]

    @property
    def npos(self) -> int:
        return sum(d.npos for d in self.classes)

    def impact(self) -> dict[str, dict[str, float]]:
        """Per false-positive type (and all together): mAP without it and the gain over the mAP."""
        def mean(values) -> float:
            valid = [v for v in values if not math.isnan(v)]
            return float(np.mean(valid)) if valid else float("nan")

        base = mean(d.ap for d in self.classes)
        out = {"none removed": {"mAP": base, "gain": 0.0}}
        for name in (*FALSE_POSITIVE_TYPES, "all false positives"):
            value = mean(d.ap_without[name] for d in self.classes)
            out[name] = {"mAP": value, "gain": value - base}
        return out

    def to_json(self) -> dict:
        _, kinds = self.pooled()
        overall = {name: float(np.mean(kinds[: self.npos] == i)) if self.npos and len(kinds) else 0.0
                   for i, name in enumerate(ERROR_TYPES)}
        per_class = {d.name: {"ap": d.ap, "npos": d.npos, "ap_without": d.ap_without,
                              "counts": {name: int(np.sum(d.kinds == i)) for i, name in enumerate(ERROR_TYPES)}}
                     for d in self.classes}
        return {"metric": self.metric, "similar_groups": self.groups, "impact": self.impact(),
                "top_npos_shares": {"overall": overall, **{d.name: d.shares() for d in self.classes}},
                "per_class": per_class}


def diagnose(records: list[ImageRecord], detections: dict, class_names: list[str], *,
             groups: dict[str, list[str]] | None = None, metric: str = "voc07") -> Diagnosis:
    """Label every ranked detection of every class (see the module docstring).

    Args:
        records: ground truth of the split.
        detections: image_id -> {"boxes", "scores", "labels"} (library convention).
        groups: similar-class groups; None uses :func:`default_similar_groups`.
    """
    groups = default_similar_groups(class_names) if groups is None else groups
    similar = similar_matrix(class_names, groups)
    ranked = rank_classes(records, detections, class_names, metric=metric)
    return Diagnosis([_classify(rc, c, records, similar, metric) for c, rc in enumerate(ranked)], groups, metric)


def cumulative_shares(kinds: np.ndarray) -> np.ndarray:
    """(D, 5): share of each type among the top 1, 2, ..., D detections."""
    onehot = kinds[:, None] == np.arange(len(ERROR_TYPES))[None, :]
    return np.cumsum(onehot, axis=0) / np.arange(1, len(kinds) + 1)[:, None]


def plot_error_shares(diagnosis: Diagnosis, path: str | Path) -> Path:
    """Stacked areas of the share of each type among the top-k detections, overall and per class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, pooled_kinds = diagnosis.pooled()
    panels = [("overall", pooled_kinds, diagnosis.npos)] + [(d.name, d.kinds, d.npos) for d in diagnosis.classes]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (name, kinds, npos) in zip(axes.ravel(), panels):
        ax.set(title=f"{name} ({npos} objects)", ylim=(0, 1), xlabel="top-ranked detections", ylabel="share")
        if len(kinds) == 0:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
            continue
        shares = cumulative_shares(kinds)
        x = np.arange(1, len(kinds) + 1)
        ax.stackplot(x, shares.T, colors=COLORS, labels=ERROR_TYPES, edgecolor="#888888", linewidth=0.3)
        if len(kinds) > 1:
            ax.set_xscale("log")
        ax.set_xlim(1, max(len(kinds), 2))
        if npos > 0:
            ax.axvline(npos, color="black", linestyle="--", linewidth=0.8)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(ERROR_TYPES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path, dpi=80)
