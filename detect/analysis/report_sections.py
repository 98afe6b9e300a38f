"""The report's sections on the data, the training run, score thresholds and class confusion.

Each function adds one section to an :class:`~detect.analysis.html.HtmlReport` and returns
its numbers for ``analysis.json``; the numbers come from :mod:`~detect.analysis.dataset_stats`,
:mod:`~detect.analysis.training_log` and :mod:`~detect.analysis.confusion`.
"""

from __future__ import annotations

from pathlib import Path

from detect.analysis import confusion, dataset_stats, training_log
from detect.analysis.curves import RankedClass
from detect.analysis.html import HtmlReport
from detect.data.records import ImageRecord


def model_input_resize(model) -> tuple[int, int] | None:
    """``(shorter side, longest side)`` the detector resizes test images to; None when it has no such transform.

    The one place the report reads the model's input transform (``Detector.transform_for_test``); R-CNN's
    keeps images at their own size (None).
    """
    transform = getattr(model, "transform_for_test", None)
    if transform is None or not transform.resize:
        return None
    sizes = getattr(transform, "test_min_size", None), getattr(transform, "max_size", None)
    return (int(sizes[0]), int(sizes[1])) if all(isinstance(s, int) for s in sizes) else None


def dataset_section(page: HtmlReport, records: list[ImageRecord], class_names: list[str],
                    resize: tuple[int, int] | None) -> dict:
    page.section("Dataset")
    classes = dataset_stats.class_distribution(records, class_names)
    labels, sides = dataset_stats.object_sides(records)
    coco = dataset_stats.size_histogram(labels, sides, class_names, edges=dataset_stats.COCO_EDGES)
    page.table(["class", "objects", "difficult", "images", *dataset_stats.COCO_NAMES],
               [[name, c["objects"], c["difficult"], c["images"], *coco["per_class"][name]]
                for name, c in classes.items()]
               + [["all", sum(c["objects"] for c in classes.values()), sum(c["difficult"] for c in classes.values()),
                   len(records), *coco["all"]]])
    scales = {"image pixels": (labels, sides)}
    if resize is not None:
        scales[f"input pixels (test size {resize[0]}, max {resize[1]})"] = dataset_stats.object_sides(
            records, resize=resize)
    hists = {name: dataset_stats.size_histogram(lab, sd, class_names) for name, (lab, sd) in scales.items()}
    page.heading("Object sizes, sqrt(w·h) in pixels")
    bins = dataset_stats.bin_names(dataset_stats.SIZE_EDGES)
    rows = [[f"all, {name}", *h["all"]] for name, h in hists.items()]
    last = list(hists)[-1]
    rows += [[f"{c}, {last}", *hists[last]["per_class"][c]] for c in class_names]
    page.table(["objects", *bins], rows)
    dataset_stats.plot_distributions(classes, {name: sd for name, (_, sd) in scales.items()},
                                     page.path("figures/dataset.png"))
    page.figure("figures/dataset.png", "Objects per class and the distribution of object sizes.")
    page.text("small / medium / large as COCO (sides below 32 px, below 96 px, above; image pixels). At the input "
              "scale the detector sees each image resized as at test time; an object a few pixels wide there is "
              "hard to find whatever its size in the photo.", note=True)
    return {"classes": classes, "coco_sizes": coco, "size_histograms": hists}


def training_section(page: HtmlReport, path: Path | None) -> dict | None:
    page.section("Training curves")
    if path is None:
        page.text("no metrics.jsonl found next to the checkpoint (tools/analyze.py --metrics PATH names one)",
                  note=True)
        return None
    log = training_log.read_metrics_log(path)
    training_log.plot_training_curves(log, page.path("figures/training.png"))
    page.figure("figures/training.png", f"Loss terms, learning rate and evaluation mAP from {path}.")
    keys = [*log.loss_keys, *[k for k in ("lr", "grad_norm", "images_per_s") if k in log.train]]
    rows = []
    for key in keys:
        iterations, values = log.train[key]
        rows.append([key, int(iterations[0]), float(values[0]), int(iterations[-1]), float(values[-1]),
                     float(values.min())])
    page.table(["series", "first iteration", "first", "last iteration", "last", "min"], rows)
    if log.evaluations:
        page.heading("Evaluations")
        page.table(["iteration", "split", "metric", "mAP"],
                   [[e["iteration"], e["split"], e["metric"], e["mAP"]] for e in log.evaluations])
    if log.bad_lines:
        page.text(f"{log.bad_lines} unreadable line(s) of {path} skipped", note=True)
    return {"path": str(path), "final": {k: log.last(k) for k in keys}, "evaluations": log.evaluations,
            "bad_lines": log.bad_lines}


def thresholds_section(page: HtmlReport, ranked: list[RankedClass], score_thresh: float) -> dict:
    page.heading(f"Precision, recall and F1 at score >= {score_thresh:g}, and the best-F1 threshold")
    rows = confusion.suggest_thresholds(ranked, score_thresh)
    page.table(["class", "objects", "TP", "FP", "precision", "recall", "F1", "suggested threshold",
                "precision there", "recall there", "F1 there"],
               [[r.name, r.npos, r.tp, r.fp, r.precision, r.recall, r.f1, r.best_thresh, r.best_precision,
                 r.best_recall, r.best_f1] for r in rows])
    page.text("Matching as for AP (IoU >= 0.5 with an object of the class, each object once, difficult ones "
              "ignored). The suggested threshold maximises the class's F1; the \"all\" row pools the classes "
              "under one threshold. n/a: no detection, or no object.", note=True)
    return {"score_thresh": score_thresh, "per_class": {r.name: {k: v for k, v in vars(r).items() if k != "name"}
                                                        for r in rows}}


def confusion_section(page: HtmlReport, records: list[ImageRecord], detections: dict, class_names: list[str],
                      score_thresh: float) -> dict:
    page.section("Class confusion")
    result = confusion.class_confusion(records, detections, class_names, score_thresh=score_thresh)
    page.matrix("true \\ predicted", result.rows, result.columns, result.matrix)
    found = int(result.matrix[:-1, :-1].trace())
    objects = int(result.matrix[:-1].sum())
    share = f"{found / objects:.1%}" if objects else "n/a"
    page.text(f"Detections with score >= {score_thresh:g} matched one-to-one to objects of any class at IoU >= "
              f"{result.iou_thresh:g}. Rows: the object's class, or background for a detection that matches no "
              f"object; columns: the detection's class, or missed for an object no detection matches. Difficult "
              f"objects and their detections are left out. {found} of {objects} objects ({share}) found with "
              "the right class.", note=True)
    return result.to_json()

