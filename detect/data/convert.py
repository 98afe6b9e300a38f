"""Converters between the two annotation formats: VOC split -> COCO JSON, COCO JSON -> VOC tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from detect.data.coco import COCODataset
from detect.data.voc import VOCDataset, find_image, write_annotation, write_split
from detect.errors import DatasetError
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


SPLIT_NAMES = ("train", "val", "trainval", "test")


def make_splits(voc_root: str | Path, *, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                overwrite: bool = False) -> dict[str, list[str]]:
    """Write ``ImageSets/Main/{train,val,trainval,test}.txt`` for a VOC folder that has none.

    Every ``Annotations/<id>.xml`` whose image is in ``JPEGImages`` is assigned by a seeded shuffle
    (scikit-learn's ``train_test_split``): ``test_fraction`` of them to test, ``val_fraction`` of all to
    val, the rest to train; trainval is train + val (VOC's convention; the defaults give 60/20/20 as the
    synthetic set). Returns the ids per split, each sorted.

    Raises:
        DatasetError: no Annotations folder, fewer than 2 usable ids, bad fractions, or split files already
            there (unless ``overwrite``).
    """
    from sklearn.model_selection import train_test_split

    root = Path(voc_root)
    folder = root / "Annotations"
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found: a VOC folder has Annotations/*.xml and JPEGImages/")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise DatasetError(f"split fractions test={test_fraction}, val={val_fraction}: each in [0, 1) with a "
                           "positive test fraction and a sum below 1")
    existing = [name for name in SPLIT_NAMES if (root / "ImageSets" / "Main" / f"{name}.txt").exists()]
    if existing and not overwrite:
        raise DatasetError(f"{root / 'ImageSets' / 'Main'} already has {', '.join(f'{n}.txt' for n in existing)}; "
                           "pass --overwrite to replace them")
    ids = sorted(p.stem for p in folder.glob("*.xml") if find_image(root, p.stem).is_file())
    if len(ids) < 2:
        raise DatasetError(f"{folder}: {len(ids)} annotation files with an image in JPEGImages/; need at least 2")
    trainval, test = train_test_split(ids, test_size=max(1, round(test_fraction * len(ids))), random_state=seed)
    n_val = round(val_fraction * len(ids))
    train, val = (train_test_split(trainval, test_size=n_val, random_state=seed) if 0 < n_val < len(trainval)
                  else (trainval, []))
    splits = {"train": sorted(train), "val": sorted(val), "trainval": sorted(trainval), "test": sorted(test)}
    for name, members in splits.items():
        write_split(root, name, members)
    return splits
