"""R-CNN's stages 2 and 3 streamed (``rcnn.feature_cache_mode: streaming``): bounded disk, no feature cache.

The paper writes every training proposal's features to disk (hundreds of gigabytes; Fast R-CNN
Sec. 1) and mines hard negatives from there. Here the features of each batch of images are computed,
mined against the current SVMs and dropped; only what the mining and stage 4 need is held:

1. a first pass computes the ground-truth boxes' features (the positives, and the negatives of the
   other classes) -- a few boxes per image -- and notes each image's row count;
2. the feature scale is estimated from the same rows the cached mode reads
   (:func:`detect.svm_heads.scale_rows` of the images :func:`detect.svm_heads.scale_sample` picks),
   computing only those (~200 x 100 warps);
3. the mining pass computes each batch's proposal features and feeds
   :func:`detect.hard_negatives.mine_svms`, the loop the cached mode uses.

Stage 4's pool5 rows (IoU > 0.6) go, as they are computed (ground truth in pass 1, proposals in pass 3),
into a :class:`detect.regression_sample.RegressionSample`: at most ``rcnn.bbox_reg.max_rows_per_class``
per class, the same seeded rows the cached mode fits (:func:`detect.rcnn_training.fit_regression_rows`).

Features are rounded to float16, as the cache stores them, so the same CNN outputs give bitwise the
same SVMs in both modes, provided the CNN gives a row the same output in any batch of 8 rows or more
(:meth:`detect.rcnn_training.RCNNParts.features` keeps every batch that large): the tiny, AlexNet and
VGG16 trunks in eval mode do on the CPU at 1 and 2 threads (batches of 1-3 rows do not); cuDNN may
choose another algorithm per batch size on a GPU. The price is reading each image three times (the
~200 of the scale sample; the others twice) and computing the ground-truth rows in their own call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from detect.errors import DetectError, ImageReadError
from detect.hard_negatives import Batch, ImageFeatures, SVMResult, image_batches, mine_svms, positives_by_class
from detect.rcnn_training import (RCNNParts, image_rows, mining_settings, rcnn_parts, regression_row_indices,
                                  regression_sample, svm_arguments)
from detect.regression_sample import RegressionSample
from detect.runlog import ProgressBar
from detect.svm_heads import scale_from_norms, scale_rows, scale_sample


@dataclass
class StreamingResult:
    """What :func:`fit_svms_streaming` did.

    Attributes:
        svm: the mining's result (already loaded into the model); scale: the feature scale.
        regression: stage 4's sample of rows, for :func:`detect.rcnn_training.fit_regression_rows` (None
            when ``rcnn.bbox_reg.enabled`` is false).
        failed: {image_id: reason} of the images skipped (unreadable).
        peak_bytes: the most bytes of features and rows held at once: ground-truth rows, positives, the
            caches' buffers, stage 4's sample and the batch being mined (not the CNN's own activations).
        regression_bytes: stage 4's sample at that peak (pool5 of sampled rows with IoU > 0.6).
        full_cache_bytes: what a ``full`` feature cache of these images would hold (float16 features,
            pool5 rows, boxes, classes, overlaps; file headers aside).
        seconds: wall time of each pass ("ground_truth", "scale", "mining").
    """

    svm: SVMResult
    scale: float
    regression: RegressionSample | None = None
    failed: dict[str, str] = field(default_factory=dict)
    peak_bytes: int = 0
    regression_bytes: int = 0
    full_cache_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _GroundTruth:
    """What the first pass keeps of an image: its record, index, ground-truth SVM features (float16), row count."""

    record: object
    index: int                 # among the readable images
    features: np.ndarray       # (G, D) SVM features
    gt_classes: np.ndarray     # (G,)
    num_rows: int              # P = G + proposals

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.gt_classes.nbytes


def _half(x: torch.Tensor) -> np.ndarray:
    """float16 as the feature cache stores it (the same rounding: float32 numpy -> float16)."""
    return np.asarray(x.cpu().numpy(), dtype=np.float16)


@torch.no_grad()
def fit_svms_streaming(model: torch.nn.Module, records, cfg, *, device: torch.device | str = "cpu",
                       progress: bool = False, log: Callable[[str], None] = print) -> StreamingResult:
    """Stages 2 and 3 together, image batch by image batch; nothing is written to disk.

    Args:
        model: the fine-tuned R-CNN (reached through :func:`detect.rcnn_training.rcnn_parts`).
        records: the training images' records (``load_records``), in order.
        cfg: the config (``rcnn.svm``, ``rcnn.bbox_reg.min_overlap``, ``data.use_difficult``,
            ``data.max_image_pixels``, ``train.seed``).
        progress: a bar per pass (images/s, ETA; the mining bar shows each class's cache and fits).

    Returns:
        :class:`StreamingResult`; the SVMs are loaded into the model, stage 4 is left to the caller.
    """
    parts = rcnn_parts(model)
    parts.module.eval().to(device)
    read = dict(device=device, use_difficult=cfg.data.use_difficult, max_pixels=cfg.data.max_image_pixels)
    start = time.perf_counter()
    sample = (regression_sample(cfg, parts.num_classes, parts.box_regressor.weight.shape[-1])
              if cfg.rcnn.bbox_reg.enabled else None)
    truth, failed = _ground_truth_pass(parts, records, read, sample, progress, log)
    seconds = {"ground_truth": time.perf_counter() - start}
    start = time.perf_counter()
    scale = _scale_pass(parts, truth, cfg.rcnn.svm.feature_norm, read, progress)
    seconds["scale"] = time.perf_counter() - start
    dim = parts.svm.weight.shape[1]
    positives = positives_by_class((ImageFeatures(t.features, t.gt_classes, None) for t in truth),
                                   parts.num_classes, dim, scale)
    out = StreamingResult(svm=None, scale=scale, regression=sample, failed=failed)
    held_truth = sum(t.nbytes for t in truth)
    start = time.perf_counter()

    def batches(epoch: int):
        for indices in image_batches(len(truth), mining_settings(cfg).batch_images):
            yield [(j, _stream_image(parts, truth[j], read, sample, cfg.rcnn.bbox_reg.min_overlap, out,
                                      first_pass=epoch == 0))
                   for j in indices]

    def measure(batch: Batch, miner_bytes: int) -> None:
        rows = sum(img.features.nbytes + img.overlaps.nbytes + img.gt_classes.nbytes for _, img in batch)
        scaled = max(img.features.size * 4 for _, img in batch)    # the float32 copy the mining scores
        sampled = sample.nbytes if sample is not None else 0
        held = miner_bytes + held_truth + sampled + rows + scaled
        if held > out.peak_bytes:
            out.peak_bytes, out.regression_bytes = held, sampled

    out.svm = mine_svms(positives, batches, num_images=len(truth), scale=scale, mining=mining_settings(cfg),
                        class_names=parts.class_names, progress=progress, log=log, on_batch=measure,
                        **svm_arguments(cfg))
    seconds["mining"] = time.perf_counter() - start
    out.seconds = seconds
    parts.svm.load_result(out.svm, scale)
    log(f"svm (streaming): {len(truth)} images, peak {out.peak_bytes / 2**20:.1f} MiB of features held; "
        f"a full feature cache would hold {out.full_cache_bytes / 2**20:.1f} MiB")
    return out


def _ground_truth_pass(parts: RCNNParts, records, read: dict, sample: RegressionSample | None, progress: bool,
                       log) -> tuple[list, dict]:
    """Pass 1: each readable image's ground-truth features and row count (their pool5 offered to ``sample``,
    stage 4's); unreadable ones are reported."""
    truth, failed, boxes = [], {}, 0
    bar = ProgressBar(total=len(records), desc="svm positives", unit="img", enabled=progress)
    for record in records:
        bar.update(1)
        try:
            rows = image_rows(parts, record, **read)
        except ImageReadError as exc:
            failed[record.image_id] = str(exc)
            log(f"features: skipped image {record.image_id}: {exc}")
            continue
        pool5, features = parts.features(rows.image, rows.boxes[: rows.num_gt])
        t = _GroundTruth(record, len(truth), _half(features), rows.gt_classes[: rows.num_gt].cpu().numpy(),
                         len(rows.boxes))
        truth.append(t)
        if sample is not None:
            keep = regression_row_indices(rows.overlaps[: rows.num_gt], sample.min_overlap).numpy()
            _offer(sample, t, rows, keep, lambda at: _half(pool5[torch.from_numpy(keep[at]).to(pool5.device)]))
        boxes += rows.num_gt
        bar.describe(f"{boxes} ground-truth boxes, {len(failed)} failed")
    bar.close()
    return truth, failed


def _scale_pass(parts: RCNNParts, truth: list, target_norm: float, read: dict, progress: bool) -> float:
    """The feature scale from the rows :func:`detect.svm_heads.feature_scale` reads in the cached mode."""
    if target_norm <= 0:
        return 1.0
    sample = scale_sample(len(truth))
    norms = []
    bar = ProgressBar(total=len(sample), desc="svm feature scale", unit="img", enabled=progress)
    for j in sample:
        bar.update(1)
        t = truth[j]
        rows = scale_rows(t.num_rows)
        gt_rows, prop_rows = rows[rows < len(t.gt_classes)], rows[rows >= len(t.gt_classes)]
        features = [t.features[gt_rows]]
        if len(prop_rows):
            image = _same_rows(parts, t, read)
            features.append(_half(parts.features(image.image, image.boxes[torch.from_numpy(prop_rows)])[1]))
        norms.append(np.linalg.norm(np.concatenate(features).astype(np.float32), axis=1))
    bar.close()
    return scale_from_norms(norms, target_norm)


def _same_rows(parts: RCNNParts, t: _GroundTruth, read: dict):
    """The image's rows again; an error if its proposals changed since the first pass."""
    try:
        rows = image_rows(parts, t.record, **read)
    except ImageReadError as exc:
        raise DetectError(f"{exc} (it was readable in the first pass of the streaming SVM stage)") from None
    if len(rows.boxes) != t.num_rows:
        raise DetectError(f"image '{t.record.image_id}': {len(rows.boxes)} rows now, {t.num_rows} in the first "
                          "pass of the streaming SVM stage (its proposals changed); rerun the stage")
    return rows


def _offer(sample: RegressionSample, t: _GroundTruth, rows, keep: np.ndarray, pool5) -> None:
    """Offer rows ``keep`` (indices among the image's rows) of an image to stage 4's sample."""
    gt = rows.boxes[: rows.num_gt].cpu().numpy()
    sample.add(image_index=t.index, image_id=t.record.image_id, num_rows=t.num_rows, rows=keep,
               boxes=rows.boxes.cpu().numpy()[keep], gt_boxes=gt, gt_classes=t.gt_classes, pool5=pool5)


def _stream_image(parts: RCNNParts, t: _GroundTruth, read: dict, sample: RegressionSample | None,
                  min_overlap: float, out: StreamingResult, *, first_pass: bool) -> ImageFeatures:
    """One image's rows for the mining: ground-truth features from pass 1, proposal features computed now.

    In the first pass the proposals' stage-4 rows are offered to ``sample`` (if any) and the image's share
    of a full cache is counted.
    """
    rows = _same_rows(parts, t, read)
    pool5, proposal_features = parts.features(rows.image, rows.boxes[rows.num_gt:])
    features = np.concatenate([t.features, _half(proposal_features)])
    overlaps = rows.overlaps.cpu().numpy()
    if first_pass:
        keep = regression_row_indices(rows.overlaps, min_overlap).numpy()
        out.full_cache_bytes += (features.nbytes + len(keep) * pool5.shape[1] * 2 + rows.boxes.numel() * 4
                                 + overlaps.nbytes + len(rows.boxes) * 8 + len(keep) * 8)
        prop_keep = keep[keep >= rows.num_gt]
        if sample is not None:
            at_pool5 = torch.from_numpy(prop_keep - rows.num_gt).to(pool5.device)
            _offer(sample, t, rows, prop_keep, lambda at: _half(pool5[at_pool5[torch.from_numpy(at)]]))
    return ImageFeatures(features, rows.gt_classes.cpu().numpy(), overlaps)
