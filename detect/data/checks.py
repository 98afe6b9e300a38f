"""Annotation checks for a VOC-format split: find what the loaders would drop or trip over.

The loader (:class:`detect.data.voc.VOCDataset`) skips unreadable annotations
and drops unusable boxes with a warning, so a training run on a damaged
dataset silently sees less data. This module reads the same raw files with the
same helpers (:func:`read_split`, :func:`read_objects`, :func:`box_problem`,
:func:`find_image`, :func:`read_image`) and lists every problem, naming the
file and, for object-level problems, the object's index and class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from detect.config import VOC_CLASSES
from detect.data.image import read_image
from detect.data.voc import box_problem, find_image, from_voc_pixels, read_objects, read_split
from detect.errors import DatasetError, ImageReadError

# kind -> heading in the report. Errors make a split unclean; notes are reported but legal in VOC.
ERROR_KINDS: dict[str, str] = {
    "empty_split": "empty or unreadable split file",
    "duplicate_id": "ids listed more than once in the split file",
    "missing_annotation": "missing annotation files",
    "bad_annotation": "malformed, unsafe or incomplete XML",
    "missing_image": "missing images",
    "unreadable_image": "truncated or corrupt images",
    "size_mismatch": "image size differs from the XML <size>",
    "unknown_class": "objects of a class not in the class list",
    "degenerate_box": "degenerate boxes (x2 <= x1 or y2 <= y1, or not finite)",
    "box_outside_image": "boxes entirely outside the image",
}
NOTE_KINDS: dict[str, str] = {
    "empty_image": "images with no objects",
    "box_exceeds_image": "boxes that cross the image border (the loader clips them)",
}


@dataclass(frozen=True)
class Problem:
    """One finding. ``object_index`` and ``class_name`` are set for object-level kinds."""

    kind: str
    file: str
    message: str
    image_id: str | None = None
    object_index: int | None = None
    class_name: str | None = None

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS


@dataclass
class CheckReport:
    """Everything found in one split."""

    root: str
    split: str
    classes: list[str]
    num_images: int = 0
    num_objects: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def clean(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def to_json(self) -> dict:
        return {"root": self.root, "split": self.split, "classes": self.classes, "num_images": self.num_images,
                "num_objects": self.num_objects, "clean": self.clean, "counts": self.counts(),
                "problems": [asdict(p) for p in self.problems]}

    def format(self, *, max_per_kind: int = 20) -> str:
        """A readable report grouped by kind, errors first, at most ``max_per_kind`` lines per kind."""
        lines = [f"{self.root} [{self.split}]: {self.num_images} images, {self.num_objects} objects, "
                 f"{len(self.classes)} classes ({', '.join(self.classes)})"]
        counts = self.counts()
        for kinds, label in ((ERROR_KINDS, "problem"), (NOTE_KINDS, "note")):
            for kind, heading in kinds.items():
                if kind not in counts:
                    continue
                lines.append(f"\n{label}: {heading} [{kind}]: {counts[kind]}")
                found = [p for p in self.problems if p.kind == kind]
                lines.extend(f"  {p.message}" for p in found[:max_per_kind])
                if len(found) > max_per_kind:
                    lines.append(f"  ... and {len(found) - max_per_kind} more (use --json for the full list)")
        errors = len(self.errors)
        lines.append(f"\n{'clean' if not errors else f'{errors} problem(s) found'}"
                     + (f", {len(self.problems) - errors} note(s)" if len(self.problems) > errors else ""))
        return "\n".join(lines)


def _voc_box(obj: dict) -> str:
    return "VOC box ({})".format(", ".join(f"{v:g}" for v in obj["bbox"]))


def _object_problem(kind: str, path: Path, image_id: str, obj: dict, why: str) -> Problem:
    return Problem(kind, str(path), f"{path}: object #{obj['index']} ('{obj['name']}') {why}",
                   image_id=image_id, object_index=obj["index"], class_name=obj["name"])


def check_voc(root: str | Path, split: str, classes: list[str] | str = "auto", *,
              check_images: bool = True) -> CheckReport:
    """Check one split of a VOC-format dataset.

    Args:
        root: the folder holding ``Annotations``, ``ImageSets`` and ``JPEGImages``.
        split: name of a file in ``ImageSets/Main``.
        classes: class names, ``"voc"`` for the 20 PASCAL classes, or ``"auto"``
            (every name found is known, so no ``unknown_class`` is reported).
        check_images: decode every image (finds truncated files and size mismatches).

    Raises:
        DatasetError: the root or the split file does not exist (a usage error,
            not a finding).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    split_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_path.is_file():
        read_split(root, split)          # raises, listing the available splits
    if classes == "voc":
        classes = list(VOC_CLASSES)
    elif isinstance(classes, str) and classes != "auto":
        raise DatasetError(f"classes must be a list of names, 'voc' or 'auto', got '{classes}'")

    problems: list[Problem] = []
    try:
        ids = read_split(root, split)
    except (DatasetError, UnicodeDecodeError) as exc:
        problems.append(Problem("empty_split", str(split_path), f"{split_path}: {exc}" if isinstance(exc, UnicodeDecodeError)
                                else str(exc)))
        ids = []
    for image_id, count in Counter(ids).items():
        if count > 1:
            problems.append(Problem("duplicate_id", str(split_path), f"{split_path}: id '{image_id}' is listed {count} times",
                                    image_id=image_id))
    ids = list(dict.fromkeys(ids))

    parsed: list[tuple[str, Path, dict, list[dict]]] = []
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            problems.append(Problem("missing_annotation", str(xml), f"{xml}: annotation file not found (listed in "
                                    f"{split_path})", image_id=image_id))
            continue
        try:
            meta, objects = read_objects(xml)
        except DatasetError as exc:
            problems.append(Problem("bad_annotation", str(xml), str(exc), image_id=image_id))
            continue
        except (OSError, OverflowError, UnicodeError) as exc:   # what read_objects lets through (e.g. <width>inf)
            problems.append(Problem("bad_annotation", str(xml), f"{xml}: cannot read annotation "
                                    f"({type(exc).__name__}: {exc})", image_id=image_id))
            continue
        parsed.append((image_id, xml, meta, objects))

    if classes == "auto":
        classes = sorted({obj["name"] for _, _, _, objects in parsed for obj in objects})
    known = set(classes)
    report = CheckReport(root=str(root), split=split, classes=list(classes), num_images=len(ids))
    for image_id, xml, meta, objects in parsed:
        report.num_objects += len(objects)
        problems.extend(_check_image(root, image_id, xml, meta, check_images))
        if not objects:
            problems.append(Problem("empty_image", str(xml), f"{xml}: no objects", image_id=image_id))
        for obj in objects:
            problems.extend(_check_object(xml, image_id, meta, obj, known))
    report.problems = problems
    return report


def _check_image(root: Path, image_id: str, xml: Path, meta: dict, decode: bool) -> list[Problem]:
    image_path = find_image(root, image_id, meta["filename"])
    if not image_path.is_file():
        return [Problem("missing_image", str(image_path), f"{image_path}: image not found (annotated in {xml})",
                        image_id=image_id)]
    if not decode:
        return []
    try:
        height, width = read_image(image_path).shape[:2]
    except ImageReadError as exc:
        return [Problem("unreadable_image", str(image_path), str(exc), image_id=image_id)]
    if (width, height) != (meta["width"], meta["height"]):
        return [Problem("size_mismatch", str(xml), f"{xml}: <size> says {meta['width']}x{meta['height']} but "
                        f"{image_path.name} is {width}x{height}", image_id=image_id)]
    return []


def _check_object(xml: Path, image_id: str, meta: dict, obj: dict, known: set[str]) -> list[Problem]:
    found = []
    if obj["name"] not in known:
        found.append(_object_problem("unknown_class", xml, image_id, obj, f"has class '{obj['name']}', which is not in "
                                     f"the class list {sorted(known)}"))
    box = from_voc_pixels(np.array(obj["bbox"]))[0]
    width, height = meta["width"], meta["height"]
    problem = box_problem(box, width, height)
    if problem is not None:
        x1, y1, x2, y2 = box
        kind = "degenerate_box" if not np.all(np.isfinite(box)) or x2 <= x1 or y2 <= y1 else "box_outside_image"
        found.append(_object_problem(kind, xml, image_id, obj, f"{_voc_box(obj)} {problem}"))
    elif width > 0 and height > 0 and (box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height):
        found.append(_object_problem("box_exceeds_image", xml, image_id, obj,
                                     f"{_voc_box(obj)} crosses the border of the {width}x{height} image"))
    return found
