"""The run report: every analysis of one split in a single self-contained HTML page.

Sections: summary, the split's class and object-size distributions, training curves
(from the run's ``metrics.jsonl``), AP per class with precision-recall curves,
precision / recall / F1 at the score threshold with a suggested threshold per class,
AP by object size and by truncated / difficult flag, proposal recall (when a proposal
store or ``rpn_recall`` is given), error analysis, the class-confusion matrix, drawn
detections (best, worst, missed objects; thumbnails open the full-size drawing),
occlusion maps of the top detections and deconvnet projections of the trunk's
strongest channels. Numbers also go to ``analysis.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from detect.analysis import curves, error_analysis, report_sections, samples
from detect.analysis.deconvnet import DeconvNet, plot_projections, resize_like_model
from detect.analysis.html import HtmlReport
from detect.analysis.occlusion import DetectorBoxScorer, occlusion_map, plot_occlusion
from detect.analysis.trunk import UnsupportedTrunkError
from detect.data.image import read_image
from detect.data.loader import image_to_tensor
from detect.data.records import ImageRecord
from detect.errors import DetectError, ImageReadError
from detect.runlog import json_safe
from detect.utils.io import atomic_write_text
from detect.visualize import legend_entries
from proposals.recall import evaluate_recall, plot_recall
from proposals.store import ProposalStore

THUMB_WIDTH = 320          # gallery thumbnails: tags drawn at this size stay readable
FULL_SIDE = 1600           # the full-size drawing a thumbnail opens


@dataclass
class ReportOptions:
    """What the report contains.

    Attributes:
        metric: "voc07" (11-point) or "voc10" AP.
        similar_groups: similar-class groups for the error analysis (None: the dataset's default).
        samples: images per gallery (best, worst, missed).
        score_thresh: detections drawn, counted as found, counted in the confusion matrix and in
            precision / recall / F1 from this score.
        occlusion: top detections (one per image) explained by an occlusion map; 0 for none.
        patch, stride: occluder side and step in image pixels.
        deconv_layer: trunk layer to visualise (None: the last convolution; "" for none).
        deconv_channels: channels to show (None: the ``deconv_count`` strongest over the images searched).
        deconv_count: channels shown when ``deconv_channels`` is None.
        deconv_images: images searched for the top-9 activations.
        proposals: a proposal store version folder (holding ``params.json``) for recall curves.
        rpn_recall: also measure the recall of the model's own proposals (``model.propose``).
        training_log: the run's ``metrics.jsonl`` for the training curves (None: the section says none was found).
    """

    metric: str = "voc07"
    similar_groups: dict[str, list[str]] | None = None
    samples: int = 6
    score_thresh: float = 0.5
    occlusion: int = 3
    patch: int = 32
    stride: int = 16
    deconv_layer: str | None = None
    deconv_channels: list[int] | None = None
    deconv_count: int = 4
    deconv_images: int = 50
    proposals: Path | None = None
    rpn_recall: bool = False
    training_log: Path | None = None


def _load(record: ImageRecord) -> np.ndarray | None:
    try:
        return read_image(record.path)
    except ImageReadError:
        return None


def open_proposal_store(path: str | Path):
    """A :class:`proposals.store.ProposalStore` from its version folder ``<root>/<split>/<version>``.

    A split folder holding exactly one version folder is accepted too.
    """
    path = Path(path)
    if not (path / "params.json").is_file():
        versions = [p for p in path.glob("*/params.json")] if path.is_dir() else []
        if len(versions) != 1:
            raise DetectError(f"{path}: not a proposal store folder (expected <store>/<split>/<version>/params.json"
                              + (f"; found {len(versions)} versions, name one" if versions else "") + ")")
        path = versions[0].parent
    try:
        params = json.loads((path / "params.json").read_text(encoding="utf-8"))["params"]
    except (OSError, ValueError, KeyError) as exc:
        raise DetectError(f"{path / 'params.json'}: unreadable proposal store parameters ({exc})") from None
    return ProposalStore(path.parent.parent, path.parent.name, params)


class _Builder:
    def __init__(self, model, records: list[ImageRecord], class_names: list[str], detections: dict,
                 out_dir: Path, options: ReportOptions) -> None:
        self.model, self.records, self.names, self.detections = model, records, class_names, detections
        self.opt = options
        self.page = HtmlReport(out_dir, "Detector analysis")
        self.numbers: dict = {}

    # ------------------------------------------------------------------ sections
    def summary(self, info: dict) -> None:
        ranked = curves.rank_classes(self.records, self.detections, self.names, metric=self.opt.metric)
        self.ranked = ranked
        valid = [rc.ap for rc in ranked if not math.isnan(rc.ap)]
        mean_ap = float(np.mean(valid)) if valid else float("nan")
        count = sum(len(d["scores"]) for d in self.detections.values())
        self.numbers["summary"] = {**info, "images": len(self.records), "detections": count,
                                   "metric": self.opt.metric, "mAP": mean_ap}
        self.page.section("Summary")
        rows = [[k, v] for k, v in info.items()]
        rows += [["images", len(self.records)], ["detections", count], ["classes", len(self.names)],
                 [f"mAP ({self.opt.metric})", mean_ap]]
        self.page.table(["", "value"], rows)

    def dataset(self) -> None:
        self.numbers["dataset"] = report_sections.dataset_section(
            self.page, self.records, self.names, report_sections.model_input_resize(self.model))

    def training(self) -> None:
        self.numbers["training"] = report_sections.training_section(self.page, self.opt.training_log)

    def average_precision(self) -> None:
        self.page.section("Average precision")
        self.page.table(["class", "objects", "detections", "AP"],
                        [[rc.name, rc.npos, len(rc.scores), rc.ap] for rc in self.ranked])
        self.numbers["per_class"] = {rc.name: {"ap": rc.ap, "npos": rc.npos} for rc in self.ranked}
        curves.plot_pr_curves(self.ranked, self.page.path("figures/pr_curves.png"),
                              title=f"precision-recall ({self.opt.metric})")
        self.page.figure("figures/pr_curves.png", "Precision-recall curve of each class; AP in the legend.")
        self.numbers["thresholds"] = report_sections.thresholds_section(self.page, self.ranked, self.opt.score_thresh)

        self.page.heading("AP by object size and flag")
        rows = curves.breakdown(self.records, self.detections, self.names, metric=self.opt.metric)
        self.numbers["breakdown"] = rows
        self.page.table(["objects", "count", "mAP", *self.names],
                        [[name, sum(r["npos"].values()), r["mAP"], *[r["per_class"][n] for n in self.names]]
                         for name, r in rows.items()])
        self.page.text("Sizes as COCO: small < 32², medium < 96², large otherwise (box area in image pixels). "
                       "Objects outside a row's subset are ignored like VOC's difficult objects; false positives "
                       "stay (for sizes, an unmatched detection of another size is ignored).", note=True)

    def proposal_recall(self) -> None:
        if self.opt.proposals is None and not self.opt.rpn_recall:
            return

        self.page.section("Proposal recall")
        reports = {}
        if self.opt.proposals is not None:
            store = open_proposal_store(self.opt.proposals)
            boxes = {r.image_id: store.get(r.image_id) for r in self.records if r.image_id in store}
            store.close()
            reports["stored proposals"] = evaluate_recall(self.records, boxes, self.names)
        if self.opt.rpn_recall and hasattr(self.model, "propose"):
            boxes = {}
            device = next(self.model.parameters()).device
            for record in self.records:
                image = _load(record)
                if image is not None:
                    found, _ = self.model.propose([image_to_tensor(image).to(device)])
                    boxes[record.image_id] = found[0].float().cpu().numpy()
            reports["RPN"] = evaluate_recall(self.records, boxes, self.names)
        self.numbers["proposal_recall"] = reports
        self.page.table(["proposals", "images", "objects", "per image", "recall@0.5", "recall@0.7", "AR", "MABO"],
                        [[name, r["num_images"], r["num_objects"], r["proposals_per_image"], r["recall@0.5"],
                          r["recall@0.7"], r["average_recall"], r["mabo"]] for name, r in reports.items()])
        plot_recall(reports, self.page.path("figures/proposal_recall.png"))
        self.page.figure("figures/proposal_recall.png", "Recall against IoU threshold and number of proposals.")

    def errors(self) -> None:
        self.page.section("Error analysis")
        diag = error_analysis.diagnose(self.records, self.detections, self.names, groups=self.opt.similar_groups,
                                       metric=self.opt.metric)
        self.diagnosis = diag
        self.numbers["error_analysis"] = diag.to_json()
        groups = "; ".join(f"{k}: {', '.join(v)}" for k, v in diag.groups.items()) or "none"
        self.page.text("Each ranked detection is correct, a localisation error (0.1 <= IoU < 0.5 with an object of "
                       "its class, or a duplicate), a confusion with a similar class, with another class, or "
                       f"background (Hoiem et al., ECCV 2012). Similar-class groups: {groups}.", note=True)
        error_analysis.plot_error_shares(diag, self.page.path("figures/error_shares.png"))
        self.page.figure("figures/error_shares.png", "Share of each type among the top-ranked detections; the "
                         "dashed line marks as many detections as there are objects.")
        shares = self.numbers["error_analysis"]["top_npos_shares"]
        self.page.heading("Top-ranked detections (as many as objects) by type")
        self.page.table(["class", *error_analysis.ERROR_TYPES],
                        [[name, *[s[t] for t in error_analysis.ERROR_TYPES]] for name, s in shares.items()])
        self.page.heading("What each false-positive type costs")
        impact = diag.impact()
        self.page.table(["removed", "mAP", "gain"], [[k, v["mAP"], v["gain"]] for k, v in impact.items()])
        self.page.table(["class", "AP", *[f"without {t}" for t in error_analysis.FALSE_POSITIVE_TYPES]],
                        [[d.name, d.ap, *[d.ap_without[t] for t in error_analysis.FALSE_POSITIVE_TYPES]]
                         for d in diag.classes])

    def confusion(self) -> None:
        self.numbers["confusion"] = report_sections.confusion_section(self.page, self.records, self.detections,
                                                                      self.names, self.opt.score_thresh)

    def galleries(self) -> None:
        self.page.section("Detections")
        self.page.legend(legend_entries(np.arange(len(self.names)), self.names))
        self.page.text("Ground truth in thin white; click a picture for the full-size drawing.", note=True)
        picked = samples.pick_samples(self.diagnosis, self.records, self.names, count=self.opt.samples,
                                      score_thresh=self.opt.score_thresh)
        titles = {"best": "Best: highest-scoring correct detections",
                  "worst": "Worst: highest-scoring false positives",
                  "missed": "Missed objects (magenta; ground truth in white)"}
        for kind, items in picked.items():
            self.page.heading(titles[kind])
            if not items:
                self.page.text("none", note=True)
            for i, item in enumerate(items):
                record = self.records[item.image_index]
                image = _load(record)
                if image is None:
                    self.page.text(f"{record.image_id}: image unreadable", note=True)
                    continue
                full = self.page.save_image(f"samples/{kind}_{i:02d}.jpg", samples.draw_sample(
                    image, record, item, self.names, fit=(FULL_SIDE, FULL_SIDE)))
                thumb = self.page.save_image(f"samples/{kind}_{i:02d}_thumb.jpg", samples.draw_sample(
                    image, record, item, self.names, fit=(THUMB_WIDTH, 2 * THUMB_WIDTH), enlarge=True))
                self.page.figure(thumb, f"{record.image_id}: {item.caption}", link=full)

    def occlusion(self) -> None:
        if self.opt.occlusion <= 0:
            return

        self.page.section("Occlusion sensitivity")
        if not hasattr(self.model, "score_boxes"):
            self.page.text("not available: the model has no score_boxes hook to score a fixed box", note=True)
            return
        best = []
        for i, record in enumerate(self.records):
            det = self.detections.get(record.image_id)
            if det is not None and len(det["scores"]):
                j = int(np.argmax(det["scores"]))
                best.append((float(det["scores"][j]), i, det["boxes"][j], int(det["labels"][j])))
        best.sort(key=lambda t: -t[0])
        self.page.text(f"A {self.opt.patch} px grey square slides with step {self.opt.stride} px; the map shows the "
                       "detection's class probability with the square at each place (Zeiler & Fergus 2013, "
                       "Sec. 4.2). The x marks the place that lowers it most.", note=True)
        device = next(self.model.parameters()).device
        shown = []
        for k, (score, i, box, label) in enumerate(best[: self.opt.occlusion]):
            record = self.records[i]
            image = _load(record)
            if image is None:
                continue
            scorer = DetectorBoxScorer(self.model, image_to_tensor(image).to(device), box.tolist(), label)
            omap = occlusion_map(scorer, patch=self.opt.patch, stride=self.opt.stride)
            rel = f"occlusion/occlusion_{k:02d}.png"
            caption = f"{record.image_id}: {self.names[label]} {score:.3f}"
            plot_occlusion(image, omap, box, self.page.path(rel), title=caption)
            self.page.figure(rel, caption)
            shown.append({"image_id": record.image_id, "label": self.names[label], "score": score,
                          "box": [float(v) for v in box], "baseline": omap.baseline,
                          "lowest": float(omap.scores.min()), "peak_yx": list(omap.peak())})
        self.numbers["occlusion"] = shown

    def deconvnet(self) -> None:
        if self.opt.deconv_layer == "":
            return

        self.page.section("Deconvnet")
        if not hasattr(self.model, "transform_for_test"):   # not a Detector: no input pipeline to project through
            self.page.text("not available: the model has no input transform and trunk to project through", note=True)
            return
        try:
            net = DeconvNet.from_backbone(self.model.backbone)
        except (UnsupportedTrunkError, AttributeError) as exc:
            self.page.text(f"not available for this trunk: {exc}", note=True)
            return
        layer = self.opt.deconv_layer or [layer.name for layer in net.layers if layer.name.startswith("conv")][-1]
        device = next(self.model.parameters()).device
        images = []
        for record in self.records[: self.opt.deconv_images]:
            image = _load(record)
            if image is not None:
                images.append(resize_like_model(self.model, image_to_tensor(image).to(device)))
        if not images:
            self.page.text("no readable images", note=True)
            return
        values, rows, cols = net.channel_maxima(images, layer)
        if self.opt.deconv_channels is not None:
            channels = list(self.opt.deconv_channels)
            bad = [c for c in channels if not 0 <= c < values.shape[1]]
            if bad:
                raise DetectError(f"deconvnet channels {bad} out of range: layer {layer} has {values.shape[1]}")
        else:
            channels = torch.argsort(values.max(dim=0).values, descending=True)[: self.opt.deconv_count].tolist()
        self.page.text(f"Layer {layer}: for each channel, its 9 strongest activations over {len(images)} images "
                       "(one per image), projected to pixels by unpooling with the recorded switches, rectification "
                       "and the transposed filters (Zeiler & Fergus 2013, Sec. 2.1), next to the image patches "
                       "they see.", note=True)
        for c in channels:
            projections = net.project_top(images, layer, c, values[:, c], rows[:, c], cols[:, c], k=9)
            rel = f"deconvnet/{layer}_channel{c:04d}.png"
            plot_projections(projections, self.page.path(rel), title=f"{layer} channel {c}")
            self.page.figure(rel, f"{layer}, channel {c}: top activation {float(values[:, c].max()):.3f}")
        self.numbers["deconvnet"] = {"layer": layer, "channels": channels, "images": len(images)}


def build_report(model, records: list[ImageRecord], class_names: list[str], detections: dict,
                 out_dir: str | Path, *, options: ReportOptions | None = None, info: dict | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``out_dir/index.html`` (and the images it shows, and ``analysis.json``).

    Args:
        model: the detector (``predict`` API; occlusion needs :meth:`~detect.detector.Detector.score_boxes`,
            the deconvnet a plain conv trunk at ``model.backbone.trunk``).
        records: ground truth of the split.
        detections: image_id -> {"boxes", "scores", "labels"} of ``model`` on the split.
        info: lines for the summary table (checkpoint, split, ...).

    Returns:
        The path of ``index.html``.
    """
    options = options or ReportOptions()
    b = _Builder(model, records, class_names, detections, Path(out_dir), options)
    steps = [("summary", lambda: b.summary(info or {})), ("dataset", b.dataset), ("training curves", b.training),
             ("average precision", b.average_precision), ("proposal recall", b.proposal_recall),
             ("error analysis", b.errors), ("class confusion", b.confusion), ("detections", b.galleries),
             ("occlusion", b.occlusion), ("deconvnet", b.deconvnet)]
    for name, step in steps:
        log(f"report: {name}")
        step()
    atomic_write_text(b.page.path("analysis.json"), json.dumps(json_safe(_plain(b.numbers)), indent=2) + "\n")
    b.page.parts.append('<p class="note">All numbers: <a href="analysis.json">analysis.json</a>.</p>')
    return b.page.write()


def _plain(value):
    """numpy scalars and arrays -> Python values for JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
