"""COCO AP/AR through pycocotools' COCOeval: the 12 standard numbers, plus AP per class."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detect.data.coco import coco_from_dict
from detect.data.records import ImageRecord
from detect.evaluation.results import check_coco_results

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def records_to_coco(records: list[ImageRecord], class_names: list[str]) -> tuple[dict, dict[str, int], list[int]]:
    """Ground truth as a COCO instances dict.

    Returns:
        (dataset, image_ids, category_ids): our image id -> COCO integer id (1.. in record order),
        and category id of each label (label + 1). ``difficult`` objects become ``iscrowd=1``.
    """
    images, annotations = [], []
    image_ids: dict[str, int] = {}
    ann_id = 1
    for i, record in enumerate(records, start=1):
        image_ids[record.image_id] = i
        images.append({"id": i, "file_name": record.path.name if hasattr(record.path, "name") else str(record.path),
                       "width": int(record.width), "height": int(record.height), "voc_id": record.image_id})
        for box, label, difficult in zip(record.boxes.astype(np.float64), record.labels, record.difficult):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": ann_id, "image_id": i, "category_id": int(label) + 1,
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h,
                                "iscrowd": int(bool(difficult)), "ignore": int(bool(difficult))})
            ann_id += 1
    categories = [{"id": c + 1, "name": name, "supercategory": "none"} for c, name in enumerate(class_names)]
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return dataset, image_ids, [c + 1 for c in range(len(class_names))]


def evaluate_coco(gt: COCO | dict, results: list[dict], *, class_names: list[str] | None = None,
                  category_ids: list[int] | None = None, verbose: bool = False, source: str = "results") -> dict:
    """Run COCOeval (bbox) on results records.

    Records are checked first (COCOeval itself would drop an unknown category and rank a NaN score
    silently): a bad one is a :class:`~detect.errors.ResultsFormatError` naming ``source`` and its index.

    Returns:
        {"metric": "coco", "mAP": AP, "stats": {AP, AP50, ..., ARl}, "per_class": {name: AP@[.5:.95]}}.
    """
    coco_gt = gt if isinstance(gt, COCO) else coco_from_dict(gt)
    check_coco_results(results, source, image_ids=coco_gt.getImgIds(), category_ids=coco_gt.getCatIds())
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:   # loadRes cannot take an empty list; an empty result set scores 0
            coco_dt = coco_from_dict({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                                      "annotations": []})
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(sink.getvalue(), end="")
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    if category_ids is None:
        category_ids = sorted(coco_gt.getCatIds())
    if class_names is None:
        class_names = [coco_gt.cats[c]["name"] for c in category_ids]
    per_class = {}
    precision = evaluator.eval["precision"]   # (T, R, K, A, M)
    cat_index = {c: k for k, c in enumerate(evaluator.params.catIds)}
    for name, cid in zip(class_names, category_ids):
        p = precision[:, :, cat_index[cid], 0, -1]
        p = p[p > -1]
        per_class[name] = float(np.mean(p)) if p.size else float("nan")
    return {"metric": "coco", "mAP": stats["AP"], "stats": stats, "per_class": per_class}
