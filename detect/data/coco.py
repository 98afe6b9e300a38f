"""COCO instances JSON, read through pycocotools.

``bbox = [x, y, w, h]`` converts to the library's ``(x, y, x + w, y + h)``.
Crowd annotations are kept with ``difficult=True`` (ignored regions): training
drops them, VOC-style evaluation neither rewards nor penalises them, and COCO
evaluation hands the original annotations to COCOeval unchanged.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from detect.data.records import ImageRecord
from detect.data.voc import DegenerateBoxWarning
from detect.errors import DatasetError
from detect.utils.io import read_json


def load_coco_json(path: str | Path) -> dict:
    """Read and minimally validate an instances JSON; errors name the file."""
    path = Path(path)
    data = read_json(path, DatasetError, "COCO annotations")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list '{key}'")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
            raise DatasetError(f"{path}: annotation #{i} must have image_id, category_id and bbox")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{path}: annotation #{i} (id {ann.get('id')}) has bbox {bbox!r}, expected [x, y, w, h]")
    return data


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO object built from an in-memory dataset, without its prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODataset:
    """A COCO split as :class:`ImageRecord` objects.

    Args:
        annotations: instances JSON path.
        image_root: folder that ``file_name`` is relative to.
        classes: ``"auto"`` (categories sorted by id) or a list of category names to keep, in label order.
    """

    def __init__(self, annotations: str | Path, image_root: str | Path, *, classes: list[str] | str = "auto") -> None:
        self.annotations = Path(annotations)
        self.image_root = Path(image_root)
        self.data = load_coco_json(self.annotations)
        self.coco = coco_from_dict(self.data)
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        by_name = {c["name"]: c["id"] for c in cats}
        if classes in ("auto", "voc") or classes is None:
            if classes == "voc":
                warnings.warn(f"{self.annotations}: data.classes='voc' ignored for COCO; using the file's categories")
            self.class_names = [c["name"] for c in cats]
        else:
            unknown = [n for n in classes if n not in by_name]
            if unknown:
                raise DatasetError(f"{self.annotations}: classes {unknown} are not categories of this file "
                                   f"(it has {sorted(by_name)})")
            self.class_names = list(classes)
        self.category_ids = [by_name[n] for n in self.class_names]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.image_ids: dict[str, int] = {}
        self.records: list[ImageRecord] = []
        for img in sorted(self.coco.dataset["images"], key=lambda im: im["id"]):
            boxes, labels, crowd = [], [], []
            for ann in self.coco.imgToAnns.get(img["id"], []):
                if ann["category_id"] not in label_of:
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if w <= 0 or h <= 0:
                    warnings.warn(f"{self.annotations}: dropped annotation id {ann.get('id')} of image "
                                  f"'{img.get('file_name')}': degenerate bbox {ann['bbox']}", DegenerateBoxWarning)
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[ann["category_id"]])
                crowd.append(bool(ann.get("iscrowd", 0)))
            key = str(img["id"])
            self.image_ids[key] = img["id"]
            self.records.append(ImageRecord(
                image_id=key, path=self.image_root / img["file_name"], width=int(img.get("width", 0)),
                height=int(img.get("height", 0)), boxes=np.array(boxes, np.float32).reshape(-1, 4),
                labels=np.array(labels, np.int64), difficult=np.array(crowd, bool), truncated=np.zeros(len(labels), bool)))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]
