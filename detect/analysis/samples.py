"""Which images to show in a report: best detections, worst false positives, missed objects.

Picks come from the error analysis (:mod:`detect.analysis.error_analysis`), so
"best" means the highest-scoring true positives, "worst" the highest-scoring false
positives (with their error type), and "missed" the objects that no correct
detection above the display threshold found. One sample per image in each list.
Drawing uses Pillow through :mod:`detect.visualize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from detect.analysis.error_analysis import CORRECT, ERROR_TYPES, Diagnosis
from detect.data.records import ImageRecord
from detect.visualize import Tag, render_detections

GT_COLOR = (255, 255, 255)
MISSED_COLOR = (255, 0, 255)


@dataclass
class Sample:
    """One image to draw.

    Attributes:
        image_index: index into the records.
        caption: one line describing why it was picked.
        boxes, scores, labels: detections to draw (library convention).
        kinds: error type names of those detections ("" when not classified).
        missed: (M, 4) objects to mark as missed.
        missed_labels: (M,) their classes.
    """

    image_index: int
    caption: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    missed: np.ndarray
    missed_labels: np.ndarray


def _flat(diagnosis: Diagnosis) -> dict[str, np.ndarray]:
    parts = {"score": [], "kind": [], "image": [], "box": [], "label": [], "matched": []}
    for c, d in enumerate(diagnosis.classes):
        parts["score"].append(d.scores)
        parts["kind"].append(d.kinds)
        parts["image"].append(d.image_index)
        parts["box"].append(d.boxes.reshape(-1, 4))
        parts["label"].append(np.full(len(d.scores), c, dtype=np.int64))
        parts["matched"].append(d.matched)
    if not diagnosis.classes:
        return {"score": np.zeros(0), "kind": np.zeros(0, np.int64), "image": np.zeros(0, np.int64),
                "box": np.zeros((0, 4)), "label": np.zeros(0, np.int64), "matched": np.zeros(0, np.int64)}
    flat = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(-flat["score"], kind="stable")
    return {k: v[order] for k, v in flat.items()}


def _one_per_image(rows: np.ndarray, image: np.ndarray, count: int) -> list[int]:
    seen, out = set(), []
    for r in rows.tolist():
        if image[r] not in seen:
            seen.add(int(image[r]))
            out.append(r)
        if len(out) == count:
            break
    return out


def pick_samples(diagnosis: Diagnosis, records: list[ImageRecord], class_names: list[str], *, count: int = 6,
                 score_thresh: float = 0.5) -> dict[str, list[Sample]]:
    """``{"best": [...], "worst": [...], "missed": [...]}``, each at most ``count`` images."""
    flat = _flat(diagnosis)
    empty = np.zeros((0, 4)), np.zeros(0, np.int64)

    def sample(r: int, caption: str) -> Sample:
        return Sample(int(flat["image"][r]), caption, flat["box"][r:r + 1], flat["score"][r:r + 1],
                      flat["label"][r:r + 1], [ERROR_TYPES[flat["kind"][r]]], *empty)

    best = [sample(r, f"{class_names[flat['label'][r]]} {flat['score'][r]:.3f}: correct")
            for r in _one_per_image(np.flatnonzero(flat["kind"] == CORRECT), flat["image"], count)]
    worst = [sample(r, f"{class_names[flat['label'][r]]} {flat['score'][r]:.3f}: {ERROR_TYPES[flat['kind'][r]]} error")
             for r in _one_per_image(np.flatnonzero(flat["kind"] != CORRECT), flat["image"], count)]

    found = {(int(i), int(m)) for i, m, k, s in zip(flat["image"], flat["matched"], flat["kind"], flat["score"])
             if k == CORRECT and s >= score_thresh}
    candidates = []
    for i, record in enumerate(records):
        lost = [j for j in range(len(record.labels)) if not record.difficult[j] and (i, j) not in found]
        if lost:
            area = float(sum((record.boxes[j, 2] - record.boxes[j, 0]) * (record.boxes[j, 3] - record.boxes[j, 1])
                             for j in lost))
            candidates.append((-len(lost), -area, i, lost))
    missed = []
    for _, _, i, lost in sorted(candidates)[:count]:
        shown = np.flatnonzero((flat["image"] == i) & (flat["score"] >= score_thresh))
        names = ", ".join(sorted({class_names[records[i].labels[j]] for j in lost}))
        missed.append(Sample(i, f"{len(lost)} missed ({names}) at score >= {score_thresh:g}", flat["box"][shown],
                             flat["score"][shown], flat["label"][shown], [ERROR_TYPES[k] for k in flat["kind"][shown]],
                             records[i].boxes[lost], records[i].labels[lost]))
    return {"best": best, "worst": worst, "missed": missed}


def draw_sample(image: np.ndarray, record: ImageRecord, sample: Sample, class_names: list[str], *,
                fit: tuple[int, int] = (480, 480), enlarge: bool = False, label_mode: str = "auto") -> np.ndarray:
    """Ground truth in thin white, missed objects in magenta, the sample's detections in their class colour.

    The image is shrunk first and drawn at its final size, so tags keep a readable font in a thumbnail.

    Args:
        image: (H, W, 3) uint8 RGB of ``record``.
        fit: (max width, max height) of the result.
        enlarge: scale a smaller image up to ``fit`` too (a thumbnail of a small image), not only down.

    Returns:
        (h, w, 3) uint8.
    """
    scale = min(fit[0] / image.shape[1], fit[1] / image.shape[0])
    scale = scale if enlarge else min(1.0, scale)
    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if scale != 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        canvas = canvas.resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 250))
    for box in np.asarray(record.boxes, np.float64).reshape(-1, 4) * scale:
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=GT_COLOR, width=line)
    missed = []
    for box, label in zip(np.asarray(sample.missed, np.float64).reshape(-1, 4) * scale, sample.missed_labels):
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=MISSED_COLOR, width=2 * line)
        name = class_names[int(label)]
        missed.append(Tag((x1, y1, x2, y2), (f"missed {name}", name), MISSED_COLOR))
    return render_detections(np.asarray(canvas), np.asarray(sample.boxes, np.float64).reshape(-1, 4) * scale,
                             sample.scores, sample.labels, class_names, label_mode=label_mode,
                             extra_tags=missed).image
