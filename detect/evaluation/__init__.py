"""Evaluation: PASCAL VOC AP exactly as the devkit, and COCO AP/AR through pycocotools."""

from detect.evaluation.coco import evaluate_coco, records_to_coco
from detect.evaluation.results import (detections_to_coco, read_coco_results, read_voc_results, write_coco_results, write_voc_results)
from detect.evaluation.voc import evaluate_voc

METRIC_NAMES = {"voc07": "VOC07", "voc10": "VOC10", "coco": "COCO"}


def format_ap(ap: float | None) -> str:
    """An AP for a table: four decimals, ``n/a`` for a class without ground truth (None or NaN)."""
    return "n/a" if ap is None or ap != ap else f"{ap:.4f}"


def evaluate(records, detections, class_names, metric: str = "voc07") -> dict:
    """Evaluate in-memory detections with one metric ("voc07", "voc10", "coco") or "all" (a dict of the three)."""
    if metric == "all":
        return {m: evaluate(records, detections, class_names, m) for m in ("voc07", "voc10", "coco")}
    if metric == "coco":
        dataset, image_ids, category_ids = records_to_coco(records, class_names)
        return evaluate_coco(dataset, detections_to_coco(detections, image_ids, category_ids),
                             class_names=class_names, category_ids=category_ids)
    return evaluate_voc(records, detections, class_names, metric)


__all__ = ["METRIC_NAMES", "format_ap", "evaluate", "evaluate_voc", "evaluate_coco", "records_to_coco", "read_voc_results",
           "write_voc_results", "read_coco_results", "write_coco_results"]
