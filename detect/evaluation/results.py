"""Detection results at the file-format edges: VOC results files and COCO results JSON.

In memory, detections are ``{image_id: {"boxes": (N,4) xyxy, "scores": (N,), "labels": (N,)}}``
in the library's box convention. VOC files hold 1-based pixels, one file per class
(``comp4_det_<split>_<class>.txt``, lines ``image_id score xmin ymin xmax ymax``); COCO
JSON holds ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` records.
Numbers are written with Python's shortest round-trip ``repr``, so evaluating the
files gives bit-for-bit the same result as evaluating the detections in memory.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from detect.data.records import ImageRecord
from detect.data.voc import to_voc_pixels
from detect.errors import ResultsFormatError
from detect.evaluation.voc import ClassDetections
from detect.utils.io import atomic_open, atomic_write_json, read_json


def detection_to_numpy(output: dict) -> dict:
    """One image's ``predict`` output (tensors, any device) as the numpy dict every evaluator takes."""
    return {"boxes": output["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
            "scores": output["scores"].detach().float().cpu().numpy().reshape(-1),
            "labels": output["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)}


def voc_results_path(out_dir: str | Path, split: str, class_name: str, prefix: str = "comp4") -> Path:
    return Path(out_dir) / f"{prefix}_det_{split}_{class_name}.txt"


def _num(value: float) -> str:
    return repr(float(value))


def write_voc_results(out_dir: str | Path, detections: dict, class_names: list[str], split: str,
                      *, image_ids: list[str] | None = None, prefix: str = "comp4") -> list[Path]:
    """Write one VOC results file per class; returns the paths (every class gets a file, maybe empty)."""
    order = image_ids if image_ids is not None else list(detections)
    lines: list[list[str]] = [[] for _ in class_names]
    for image_id in order:
        det = detections.get(image_id)
        if det is None:
            continue
        voc = to_voc_pixels(np.asarray(det["boxes"], dtype=np.float64))
        for box, score, label in zip(voc, np.asarray(det["scores"]).reshape(-1), np.asarray(det["labels"]).reshape(-1)):
            lines[int(label)].append(f"{image_id} {_num(score)} {_num(box[0])} {_num(box[1])} {_num(box[2])} {_num(box[3])}\n")
    paths = []
    for name, class_lines in zip(class_names, lines):
        path = voc_results_path(out_dir, split, name, prefix)
        with atomic_open(path, "w") as handle:
            handle.writelines(class_lines)
        paths.append(path)
    return paths


def _parse_voc_lines_checked(path: Path, image_index: dict[str, int]) -> ClassDetections:
    """Line-by-line parse: slow, but names the first bad line exactly."""
    images, scores, boxes = [], [], []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ResultsFormatError(f"{path}:{lineno}: expected 6 fields 'image_id score xmin ymin xmax ymax', got {len(parts)}")
            image_id = parts[0]
            if image_id not in image_index:
                raise ResultsFormatError(f"{path}:{lineno}: unrecognized image '{image_id}' (not in the evaluated split)")
            try:
                score = float(parts[1])
            except ValueError:
                raise ResultsFormatError(f"{path}:{lineno}: score '{parts[1]}' is not a number") from None
            try:
                box = [float(v) for v in parts[2:]]
            except ValueError:
                raise ResultsFormatError(f"{path}:{lineno}: box '{' '.join(parts[2:])}' has a non-numeric coordinate") from None
            if not np.isfinite(score) or not np.all(np.isfinite(box)):
                raise ResultsFormatError(f"{path}:{lineno}: non-finite score or coordinate")
            images.append(image_index[image_id])
            scores.append(score)
            boxes.append(box)
    return ClassDetections(np.asarray(images, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                           np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def read_voc_results_file(path: Path, image_index: dict[str, int]) -> ClassDetections:
    """Parse one class's results file; any malformed line is an error naming the file and line.

    The common, well-formed case is parsed with numpy in bulk; anything unexpected falls back to
    the line-by-line parser, which finds and names the offending line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsFormatError(f"{path}: not a UTF-8 text file") from None
    tokens = text.split()
    rows = sum(1 for line in text.splitlines() if line.strip())
    if len(tokens) != 6 * rows:
        return _parse_voc_lines_checked(path, image_index)
    if rows == 0:
        return ClassDetections(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))
    table = np.array(tokens, dtype=object).reshape(rows, 6)
    try:
        numbers = table[:, 1:].astype(np.float64)
        unique_ids, inverse = np.unique(table[:, 0].astype(str), return_inverse=True)
        lookup = np.array([image_index[i] for i in unique_ids], dtype=np.int64)
    except (ValueError, KeyError):
        return _parse_voc_lines_checked(path, image_index)
    if not np.all(np.isfinite(numbers)):
        return _parse_voc_lines_checked(path, image_index)
    return ClassDetections(lookup[inverse.reshape(-1)], numbers[:, 0].copy(), numbers[:, 1:].copy())


def read_voc_results(det_dir: str | Path, split: str, class_names: list[str], records: list[ImageRecord],
                     *, prefix: str | None = None) -> list[ClassDetections]:
    """Read the per-class results files of a directory (``<prefix>_det_<split>_<class>.txt``).

    The prefix is found automatically (comp3/comp4/...) when not given. A class whose file is
    missing has no detections (with a warning); no file at all is an error.
    """
    det_dir = Path(det_dir)
    if not det_dir.is_dir():
        raise ResultsFormatError(f"detections directory not found: {det_dir}")
    image_index = {r.image_id: i for i, r in enumerate(records)}
    out, missing = [], []
    for name in class_names:
        if prefix is not None:
            candidates = [voc_results_path(det_dir, split, name, prefix)]
        else:
            candidates = sorted(det_dir.glob(f"*_det_{split}_{name}.txt"))
        existing = [c for c in candidates if c.is_file()]
        if len(existing) > 1:
            raise ResultsFormatError(f"{det_dir}: several results files for class '{name}': {[c.name for c in existing]}; pass a prefix")
        if not existing:
            missing.append(name)
            out.append(ClassDetections(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4))))
            continue
        out.append(read_voc_results_file(existing[0], image_index))
    if len(missing) == len(class_names):
        raise ResultsFormatError(f"{det_dir}: no results files '*_det_{split}_<class>.txt' for any of {class_names}")
    if missing:
        warnings.warn(f"{det_dir}: no results file for classes {missing}; they count as having no detections")
    return out


def detections_to_coco(detections: dict, image_ids: dict[str, int], category_ids: list[int]) -> list[dict]:
    """Library detections -> COCO results records (``bbox`` as ``[x, y, w, h]``)."""
    results = []
    for image_id, det in detections.items():
        if image_id not in image_ids:
            raise ResultsFormatError(f"detections for image '{image_id}', which is not in the annotations")
        coco_id = image_ids[image_id]
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        for box, score, label in zip(boxes, np.asarray(det["scores"]).reshape(-1), np.asarray(det["labels"]).reshape(-1)):
            results.append({"image_id": coco_id, "category_id": int(category_ids[int(label)]),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                            "score": float(score)})
    return results


def write_coco_results(path: str | Path, detections: dict, image_ids: dict[str, int], category_ids: list[int]) -> Path:
    """Write a COCO results JSON; ``image_ids`` maps our ids to COCO's integers, ``category_ids[label]`` the category."""
    atomic_write_json(path, detections_to_coco(detections, image_ids, category_ids), indent=None)
    return Path(path)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coco_entry_problem(rec, image_ids, category_ids) -> str | None:
    """What is wrong with one COCO results record, or None."""
    if not isinstance(rec, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(rec):
        return "must have image_id, category_id, bbox and score"
    bbox, score = rec["bbox"], rec["score"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"has bbox {bbox!r}, expected [x, y, w, h] numbers"
    if not _is_number(score):
        return f"has non-numeric score {score!r}"
    if not math.isfinite(score):
        return f"has a non-finite score ({score})"
    if not all(math.isfinite(v) for v in bbox):
        return f"has a non-finite bbox coordinate {bbox}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"has a negative width or height in bbox {bbox} ([x, y, w, h])"
    if image_ids is not None and rec["image_id"] not in image_ids:
        return f"has image_id {rec['image_id']!r}, not an image of the ground truth"
    if category_ids is not None and rec["category_id"] not in category_ids:
        return f"has category_id {rec['category_id']!r}, not a category of the ground truth"
    return None


def check_coco_results(data, where: str | Path, *, image_ids=None, category_ids=None) -> list[dict]:
    """Validate COCO results records; the first bad one is an error naming ``where``, its index and the problem.

    Args:
        data: the parsed JSON (must be a list of records).
        where: the file (or "results") named in the error.
        image_ids, category_ids: the ground truth's ids (None: not checked).
    """
    if not isinstance(data, list):
        raise ResultsFormatError(f"{where}: expected a JSON list of detections, got {type(data).__name__}")
    image_ids = set(image_ids) if image_ids is not None else None
    category_ids = set(category_ids) if category_ids is not None else None
    for i, rec in enumerate(data):
        problem = _coco_entry_problem(rec, image_ids, category_ids)
        if problem is not None:
            raise ResultsFormatError(f"{where}: entry {i} {problem}")
    return data


def read_coco_results(path: str | Path, *, image_ids=None, category_ids=None) -> list[dict]:
    """Load and validate a COCO results JSON (a list of detection records); see :func:`check_coco_results`."""
    path = Path(path)
    return check_coco_results(read_json(path, ResultsFormatError, "results file"), path, image_ids=image_ids,
                              category_ids=category_ids)
