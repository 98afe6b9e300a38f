"""Converters between the two annotation formats: VOC split -> COCO JSON, COCO JSON -> VOC tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from detect.data.coco import COCODataset
from detect.data.voc import VOCDataset, write_annotation, write_split
from detect.evaluation.coco import records_to_coco
from detect.utils.io import atomic_write_json


def voc_to_coco(voc_root: str | Path, split: str, out_json: str | Path, *, classes: list[str] | str = "auto") -> dict:
    """Write a VOC split's annotations as a COCO instances JSON; returns the dataset dict.

    Image ids are 1.. in split order; ``file_name`` is relative to ``JPEGImages``; ``voc_id`` keeps the VOC id;
    difficult objects become ``iscrowd=1`` so that COCOeval ignores them.
    """
    dataset = VOCDataset(voc_root, split, classes=classes, strict=True)
    coco, _, _ = records_to_coco(dataset.records, dataset.class_names)
    atomic_write_json(out_json, coco)
    return coco


def coco_to_voc(annotations: str | Path, image_root: str | Path, out_root: str | Path, split: str, *,
                classes: list[str] | str = "auto", link_images: bool = True) -> int:
    """Write a COCO JSON as a VOC tree (Annotations, ImageSets/Main/<split>.txt, JPEGImages).

    Images are hard-linked (or copied when linking is impossible) into ``JPEGImages`` under their
    COCO file stem; crowd boxes become ``difficult``. Returns the number of images written.
    """
    dataset = COCODataset(annotations, image_root, classes=classes)
    out_root = Path(out_root)
    (out_root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    ids = []
    for record in dataset.records:
        stem = Path(record.path).stem
        target = out_root / "JPEGImages" / Path(record.path).name
        if not target.exists():
            try:
                if not link_images:
                    raise OSError
                os.link(record.path, target)
            except OSError:
                shutil.copy2(record.path, target)
        record.path = target
        write_annotation(out_root / "Annotations" / f"{stem}.xml", record, dataset.class_names)
        ids.append(stem)
    write_split(out_root, split, ids)
    return len(ids)
