"""PASCAL VOC format: ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt``, ``JPEGImages/``.

The only place where VOC's 1-based inclusive pixel boxes meet the library's
0-based continuous ``(x1, y1, x2, y2)``: ``x1 = xmin - 1``, ``x2 = xmax``.
XML is parsed with defusedxml so entity bombs and external entities are refused.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from detect.config import VOC_CLASSES
from detect.data.records import ImageRecord
from detect.errors import DatasetError
from detect.utils.io import atomic_write_bytes, atomic_write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def from_voc_pixels(boxes: np.ndarray) -> np.ndarray:
    """VOC ``(xmin, ymin, xmax, ymax)`` 1-based inclusive -> library xyxy."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, :2] -= 1.0
    return boxes


def to_voc_pixels(boxes: np.ndarray) -> np.ndarray:
    """Library xyxy -> VOC ``(xmin, ymin, xmax, ymax)`` 1-based inclusive (floats, not rounded)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, :2] += 1.0
    return boxes


class DegenerateBoxWarning(UserWarning):
    """A box was dropped because it has no area or lies outside the image."""


def read_split(root: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first column; blank lines ignored)."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DatasetError(f"split file not found: {path} (available splits: {available or 'none'})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"split file {path} is not UTF-8 text") from None
    ids = []
    for line in text.splitlines():
        parts = line.split()
        if parts:
            ids.append(parts[0])
    if not ids:
        raise DatasetError(f"split file {path} is empty: it lists no image ids")
    return ids


def _text(node: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        return default
    return child.text.strip()


def parse_annotation_xml(path: Path) -> ET.Element:
    """Parse one annotation file safely; any problem is a DatasetError naming the file."""
    try:
        return SafeET.parse(str(path)).getroot()
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {path}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read annotation ({exc.strerror or exc})") from None
    except DefusedXmlException as exc:
        raise DatasetError(f"{path}: refused unsafe XML ({type(exc).__name__}: {exc})") from None
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed XML at line {exc.position[0]}, column {exc.position[1]}: {exc}") from None


def read_objects(path: Path) -> tuple[dict, list[dict]]:
    """Raw content of one annotation: ``({'filename', 'width', 'height'}, [objects])``.

    Objects keep VOC pixels: ``{'name', 'bbox': (xmin, ymin, xmax, ymax), 'difficult', 'truncated', 'index'}``.
    """
    root = parse_annotation_xml(path)
    size = root.find("size")
    try:
        width = int(float(_text(size, "width", "0")))
        height = int(float(_text(size, "height", "0")))
    except (ValueError, OverflowError):
        raise DatasetError(f"{path}: <size> has a non-numeric width or height") from None
    meta = {"filename": _text(root, "filename"), "width": width, "height": height}
    objects = []
    for index, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if not name:
            raise DatasetError(f"{path}: object #{index} has no <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(f"{path}: object #{index} ('{name}') has no <bndbox>")
        try:
            bbox = tuple(float(_text(bnd, tag, "")) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(f"{path}: object #{index} ('{name}') has a missing or non-numeric box coordinate") from None
        flags = {}
        for tag in ("difficult", "truncated"):
            raw = _text(obj, tag, "0")
            try:
                flags[tag] = bool(int(float(raw)))
            except (ValueError, OverflowError):
                raise DatasetError(f"{path}: object #{index} ('{name}') has <{tag}>{raw}</{tag}>, expected 0 or 1") from None
        objects.append({"name": name, "bbox": bbox, "index": index, **flags})
    return meta, objects


def box_problem(box: np.ndarray, width: int, height: int) -> str | None:
    """Why a library-convention box cannot be used, or None. Boxes may touch but not leave the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.all(np.isfinite(box)):
        return "has non-finite coordinates"
    if x2 <= x1 or y2 <= y1:
        return f"is degenerate (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})"
    if width > 0 and height > 0 and (x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height):
        return f"lies outside the {width}x{height} image"
    return None


def discover_classes(root: Path, split: str, *, strict: bool = False) -> list[str]:
    """Sorted class names found in the annotations of a split (unreadable files are skipped unless strict)."""
    names: set[str] = set()
    for image_id in read_split(root, split):
        try:
            _, objects = read_objects(Path(root) / "Annotations" / f"{image_id}.xml")
        except DatasetError:
            if strict:
                raise
            continue   # reported when the split itself is loaded
        names.update(obj["name"] for obj in objects)
    if not names:
        raise DatasetError(f"{root}: no objects in split '{split}', so no classes can be discovered; list them in data.classes")
    return sorted(names)


def find_image(root: Path, image_id: str, filename: str | None = None) -> Path:
    """The image file for an id: ``JPEGImages/<id>.jpg`` or another known extension."""
    folder = Path(root) / "JPEGImages"
    candidate = folder / f"{image_id}.jpg"
    if candidate.is_file():
        return candidate
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    if filename and (folder / filename).is_file():
        return folder / filename
    return folder / f"{image_id}.jpg"   # missing: reported when read


def load_record(root: Path, image_id: str, class_to_index: dict[str, int], *,
                unknown: Counter | None = None) -> ImageRecord:
    """Read one annotation into an :class:`ImageRecord`; unusable boxes are dropped with a warning.

    An object of a class outside ``class_to_index`` is an error naming it, or, given ``unknown``,
    is left out and counted there by class name (so a split can report all of them at once).
    """
    path = Path(root) / "Annotations" / f"{image_id}.xml"
    meta, objects = read_objects(path)
    width, height = meta["width"], meta["height"]
    boxes, labels, difficult, truncated = [], [], [], []
    for obj in objects:
        name = obj["name"]
        if name not in class_to_index:
            if unknown is None:
                raise DatasetError(f"{path}: object #{obj['index']} has class '{name}', which is not in the class list "
                                   f"{sorted(class_to_index)}; set data.classes (or 'auto')")
            unknown[name] += 1
            continue
        box = from_voc_pixels(np.array(obj["bbox"]))[0]
        problem = box_problem(box, width, height)
        if problem:
            warnings.warn(f"{path}: dropped object #{obj['index']} ('{name}'): box {obj['bbox']} {problem}",
                          DegenerateBoxWarning, stacklevel=2)
            continue
        if width > 0 and height > 0:
            box = np.clip(box, 0, [width, height, width, height])
        boxes.append(box)
        labels.append(class_to_index[name])
        difficult.append(obj["difficult"])
        truncated.append(obj["truncated"])
    return ImageRecord(image_id=image_id, path=find_image(root, image_id, meta["filename"]), width=width, height=height,
                       boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
                       difficult=np.array(difficult, bool), truncated=np.array(truncated, bool))


def _unknown_classes_message(root: Path, split: str, unknown: Counter, files: int, class_names: list[str]) -> str:
    """One line for a class list that does not fit the annotations: what was found, and what to set."""
    found = ", ".join(f"'{name}' ({count})" for name, count in sorted(unknown.items()))
    return (f"{root}: {sum(unknown.values())} objects in {files} annotation files of split '{split}' have classes "
            f"not in data.classes {class_names}: {found}; set data.classes=auto to use the classes the "
            f"annotations name, or list them all")


class VOCDataset:
    """A split of a VOC-format dataset as a list of :class:`ImageRecord` (annotations only, no pixels).

    Args:
        root: the folder holding ``Annotations``, ``ImageSets`` and ``JPEGImages``.
        split: name of a file in ``ImageSets/Main``.
        classes: class names (label i is ``classes[i]``), ``"voc"`` or ``"auto"``.
        strict: raise on an unreadable annotation instead of skipping it with a warning.
    """

    def __init__(self, root: str | Path, split: str, *, classes: list[str] | str = "voc", strict: bool = False,
                 class_split: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found: {self.root}")
        self.split = split
        if classes == "voc":
            classes = list(VOC_CLASSES)
        elif classes == "auto":
            classes = discover_classes(self.root, class_split or split, strict=strict)
        elif isinstance(classes, str):
            raise DatasetError(f"data.classes must be a list of names, 'voc' or 'auto', got '{classes}'")
        self.class_names: list[str] = list(classes)
        index = {name: i for i, name in enumerate(self.class_names)}
        ids = read_split(self.root, split)
        duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if duplicates:
            warnings.warn(f"{self.root}/ImageSets/Main/{split}.txt lists ids more than once: {duplicates[:10]}; using each once")
            ids = list(dict.fromkeys(ids))
        self.records: list[ImageRecord] = []
        self.skipped: list[tuple[str, str]] = []
        unknown: Counter = Counter()
        files_with_unknown = 0
        for image_id in ids:
            before = sum(unknown.values())
            try:
                self.records.append(load_record(self.root, image_id, index, unknown=unknown))
            except DatasetError as exc:
                if strict:
                    raise
                self.skipped.append((image_id, str(exc)))
                warnings.warn(f"skipped image {image_id}: {exc}")
            files_with_unknown += sum(unknown.values()) > before
        if unknown:
            raise DatasetError(_unknown_classes_message(self.root, split, unknown, files_with_unknown, self.class_names))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]


def write_annotation(path: Path, record: ImageRecord, class_names: list[str], *, depth: int = 3) -> None:
    """Write one VOC XML file for ``record`` (boxes rounded to VOC's integer pixels)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = Path(record.path).name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", record.width), ("height", record.height), ("depth", depth)):
        ET.SubElement(size, tag).text = str(int(value))
    ET.SubElement(root, "segmented").text = "0"
    voc = to_voc_pixels(record.boxes)
    for box, label, diff, trunc in zip(voc, record.labels, record.difficult, record.truncated):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(trunc))
        ET.SubElement(obj, "difficult").text = str(int(diff))
        bnd = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bnd, tag).text = str(int(round(float(value))))
    ET.indent(root)
    atomic_write_bytes(Path(path), ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n")


def write_split(root: Path, split: str, ids: list[str]) -> None:
    atomic_write_text(Path(root) / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
