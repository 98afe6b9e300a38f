"""R-CNN's training stages 2-4 (Sec. 2.3, Appendix C): features, SVMs, box regressors; cached or streamed.

Stage 1 (fine-tuning) is ordinary training of the detector's loss (:meth:`detect.rcnn.WarpHead.loss`) by
:func:`detect.engine.fit`. The
later stages are not gradient descent, so they live here, each a function a test can call. Two
modes (``rcnn.feature_cache_mode``):

* ``full``: :func:`extract_features` fills a :class:`~detect.feature_cache.FeatureCache` (resumable;
  VOC07 trainval at VGG16 fc7 is ~82 GB), then :func:`fit_svm_stage` and :func:`fit_regression_stage`
  read it -- the paper's way.
* ``streaming``: :func:`detect.rcnn_streaming.fit_svms_streaming` runs stages 2 and 3 together,
  image batch by image batch: nothing is written to disk, only the positives, the current hard
  negatives and a bounded sample of stage 4's pool5 rows (IoU > 0.6; :mod:`detect.regression_sample`)
  are held, then :func:`fit_regression_rows` fits stage 4 from that sample.

Both modes mine with the same loop (:func:`detect.hard_negatives.mine_svms`) over the same image
batches, features rounded to float16 as the cache stores them, and stage 4 draws the same seeded
sample of rows, so the same CNN outputs give bitwise the same SVMs and regressors. The stages reach into the model only through :func:`rcnn_parts`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detect.bbox_regression import fit_box_regressors
from detect.data.image import DEFAULT_MAX_PIXELS, read_image
from detect.data.loader import image_to_tensor
from detect.errors import ImageReadError
from detect.feature_cache import CachedImages, FeatureCache, weights_digest
from detect.hard_negatives import MiningSettings, train_svms
from detect.proposal_sources import search_params_from_config
from detect.regression_sample import RegressionSample
from detect.rcnn import region_features
from detect.runlog import ProgressBar
from detect.svm_heads import feature_scale
from proposals.store import params_version


@dataclass
class RCNNParts:
    """What stages 2-4 use of an R-CNN model (see :func:`rcnn_parts`).

    Attributes:
        region_features: ``(image (3, H, W), boxes (R, 4)) -> (pool5 (R, D5), fc7 (R, D))``.
        svm_features: ``(pool5, fc7) -> (R, D)`` the SVMs' input (the configured layer).
        proposals: the proposal source, ``([image], [image_id]) -> [boxes (P, 4)]`` best first.
        svm, box_regressor: the heads stages 3 and 4 load their results into.
        class_names: C names; train_proposals: the best-ranked proposals used per image (0: all).
        weights: the modules whose weights produce the features (the cache's fingerprint).
        module: the model itself (eval mode, device).
    """

    region_features: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    svm_features: Callable[[Tensor, Tensor], Tensor]
    proposals: Callable
    svm: nn.Module
    box_regressor: nn.Module
    class_names: list[str]
    train_proposals: int
    weights: tuple[nn.Module, ...]
    module: nn.Module

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def features(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """pool5 (R, D5) and SVM features (R, D) of an image's regions, the CNN never given fewer than 8 rows.

        The CPU kernels take other paths for a batch of 1-3 rows, where fc7 differs in the last bits from
        the same row in a larger batch. Each call is padded to a multiple of ``PAD_ROWS`` rows (the last box
        repeated; then every batch the CNN sees holds 8 rows or more for any ``window_batch`` divisible by
        4), so a row's features do not depend on the call that computed it: what lets the streaming mode
        match the cache bit for bit.
        """
        pad = (-len(boxes)) % PAD_ROWS
        padded = torch.cat([boxes, boxes[-1:].expand(pad, 4)]) if len(boxes) and pad else boxes
        pool5, fc7 = self.region_features(image, padded)
        return pool5[: len(boxes)], self.svm_features(pool5, fc7)[: len(boxes)]


PAD_ROWS = 8


def rcnn_parts(model: nn.Module) -> RCNNParts:
    """The one place that knows an R-CNN detector's parts (:class:`detect.detector.Detector` with a WarpHead)."""
    head = model.head
    return RCNNParts(region_features=lambda image, boxes: region_features(model, image, boxes),
                     svm_features=head.svm_features, proposals=model.proposals.source, svm=head.svm,
                     box_regressor=head.box_regressor, class_names=list(model.class_names),
                     train_proposals=model.proposals.train_top, weights=(model.backbone, head.box_head), module=model)


def cache_fingerprint(model: nn.Module, cfg) -> dict:
    """What the cached features depend on: the CNN's weights, the proposal set, the warp, the layer, the classes."""
    r, parts = cfg.rcnn, rcnn_parts(model)
    return {"model_weights": weights_digest(*parts.weights),
            "proposal_set": f"{r.proposal_source}:{params_version(search_params_from_config(cfg))}:top{r.train_proposals}",
            "feature_layer": r.feature_layer, "warp": [r.crop_size, r.context_padding],
            "classes": list(parts.class_names), "pool5_min_overlap": r.bbox_reg.min_overlap}


def class_overlaps(boxes: torch.Tensor, gt: torch.Tensor, gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(P, C): each box's IoU with the closest ground-truth box of each class (0 without one)."""
    out = boxes.new_zeros(len(boxes), num_classes)
    if len(gt):
        iou = box_iou(boxes, gt)
        for c in gt_labels.unique().tolist():
            out[:, c] = iou[:, gt_labels == c].max(dim=1).values
    return out


@dataclass
class ImageRows:
    """One training image and its rows: the ground-truth boxes first, then the proposals.

    Attributes:
        image: (3, H, W) in [0, 1] on the model's device.
        boxes: (P, 4); gt_classes: (P,) int64, -1 for a proposal; overlaps: (P, C) (:func:`class_overlaps`).
        num_gt: G, the ground-truth rows.
    """

    image: Tensor
    boxes: Tensor
    gt_classes: Tensor
    overlaps: Tensor
    num_gt: int


def image_rows(parts: RCNNParts, record, *, device, use_difficult: bool = False,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRows:
    """Read one image and lay out its rows as the feature cache stores them.

    Raises:
        ImageReadError: the image is unreadable or above ``max_pixels``.
    """
    if not use_difficult:
        record = record.without_difficult()
    image = image_to_tensor(read_image(record.path, max_pixels=max_pixels)).to(device)
    props = parts.proposals([image], [record.image_id])[0][: parts.train_proposals or None]
    gt = torch.as_tensor(record.boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    gt_labels = torch.as_tensor(record.labels, dtype=torch.int64, device=device)
    boxes = torch.cat([gt, props.to(device)])
    gt_classes = torch.cat([gt_labels, gt_labels.new_full((len(props),), -1)])
    return ImageRows(image, boxes, gt_classes, class_overlaps(boxes, gt, gt_labels, parts.num_classes), len(gt))


def regression_row_indices(overlaps: Tensor, min_overlap: float) -> Tensor:
    """(K,) rows whose pool5 stage 4 trains on: IoU > ``min_overlap`` with some ground-truth box."""
    if not len(overlaps):
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero(overlaps.max(dim=1).values > min_overlap).squeeze(1).cpu()


@torch.no_grad()
def extract_features(model: nn.Module, records, cache: FeatureCache, *, device: torch.device | str = "cpu",
                     use_difficult: bool = False, min_overlap: float = 0.6, max_pixels: int = DEFAULT_MAX_PIXELS,
                     progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Stage 2 (``full`` mode): features of the ground-truth boxes and proposals of every image into the cache.

    Images already cached (and passing their checksums) are skipped, so a killed run resumes; a cached
    image whose files are corrupt is recomputed; unreadable images (or above ``max_pixels``) are skipped
    and reported. ``progress``: a bar with images/s and the ETA.

    Returns:
        {"computed", "skipped", "failed": {image_id: reason}, "seconds"}.
    """
    parts = rcnn_parts(model)
    parts.module.eval().to(device)
    done = {"computed": 0, "skipped": 0, "failed": {}, "seconds": 0.0}
    start = time.perf_counter()
    bar = ProgressBar(total=len(records), desc="features", unit="img", enabled=progress)
    for record in records:
        bar.update(1)
        if cache.valid(record.image_id):
            done["skipped"] += 1
            continue
        if record.image_id in cache:
            log(f"features: the cached files of image {record.image_id} are corrupt; recomputing them")
        try:
            rows = image_rows(parts, record, device=device, use_difficult=use_difficult, max_pixels=max_pixels)
        except ImageReadError as exc:
            done["failed"][record.image_id] = str(exc)
            log(f"features: skipped image {record.image_id}: {exc}")
            continue
        pool5, features = parts.features(rows.image, rows.boxes)
        keep = regression_row_indices(rows.overlaps, min_overlap)
        cache.put(record.image_id, boxes=rows.boxes.cpu().numpy(), gt_classes=rows.gt_classes.cpu().numpy(),
                  overlaps=rows.overlaps.cpu().numpy(), features=features.cpu().numpy(),
                  pool5_rows=keep.numpy(), pool5=pool5[keep.to(pool5.device)].cpu().numpy())
        done["computed"] += 1
        bar.describe(f"{done['computed']} computed, {done['skipped']} cached, {len(done['failed'])} failed")
    bar.close()
    done["seconds"] = time.perf_counter() - start
    return done


def mining_settings(cfg) -> MiningSettings:
    """``rcnn.svm``'s mining keys."""
    s = cfg.rcnn.svm
    return MiningSettings(hard_thresh=s.hard_thresh, easy_thresh=s.easy_thresh, neg_iou=s.neg_iou,
                          retrain_limit=s.retrain_limit, retrain_growth=s.retrain_growth,
                          batch_images=s.batch_images, epochs=s.epochs, tol=s.tol, max_iter=s.max_iter)


def svm_arguments(cfg) -> dict:
    """``rcnn.svm``'s liblinear keys and the seed, as :func:`detect.hard_negatives.mine_svms` takes them."""
    s = cfg.rcnn.svm
    return dict(C=s.C, pos_weight=s.pos_weight, bias_multiplier=s.bias_multiplier, seed=cfg.train.seed)


def fit_svm_stage(model: nn.Module, cache: FeatureCache, image_ids: list[str], cfg, *, progress: bool = False,
                  log: Callable[[str], None] = print):
    """Stage 3 (``full`` mode): one-vs-rest linear SVMs with hard negative mining; loaded into the model's SVMs.

    Time linear in the images (see :func:`detect.hard_negatives.mine_svms`); ``progress``: a bar per
    pass. Deterministic: liblinear's coordinate order is seeded with ``train.seed``, so the same features
    give bitwise the same SVMs.
    """
    parts = rcnn_parts(model)
    images = CachedImages(cache, image_ids)
    scale = feature_scale(images, cfg.rcnn.svm.feature_norm)
    result = train_svms(images, parts.num_classes, scale=scale, mining=mining_settings(cfg),
                        class_names=parts.class_names, progress=progress, log=log, **svm_arguments(cfg))
    parts.svm.load_result(result, scale)
    return result


def regression_sample(cfg, num_classes: int, dim: int) -> RegressionSample:
    """An empty :class:`~detect.regression_sample.RegressionSample` as ``rcnn.bbox_reg`` and ``train.seed`` set it."""
    b = cfg.rcnn.bbox_reg
    return RegressionSample(num_classes=num_classes, dim=dim, max_rows=b.max_rows_per_class,
                            min_overlap=b.min_overlap, seed=cfg.train.seed)


def fit_regression_stage(model: nn.Module, cache: FeatureCache, image_ids: list[str], cfg, *,
                         log: Callable[[str], None] = print):
    """Stage 4 (``full`` mode) from the feature cache: :func:`fit_regression_rows` on its sampled pool5 rows."""
    parts = rcnn_parts(model)
    sample = regression_sample(cfg, parts.num_classes, parts.box_regressor.weight.shape[-1])
    for index, image_id in enumerate(image_ids):
        item = cache.get(image_id)
        gt_rows = np.flatnonzero(item.gt_classes >= 0)
        sample.add(image_index=index, image_id=image_id, num_rows=len(item.boxes), rows=item.pool5_rows,
                   boxes=item.boxes[item.pool5_rows], gt_boxes=item.boxes[gt_rows], gt_classes=item.gt_classes[gt_rows],
                   pool5=lambda at, item=item: item.pool5[at])
    return fit_regression_rows(model, sample, cfg, log=log)


def fit_regression_rows(model: nn.Module, sample: RegressionSample | None, cfg, *,
                        log: Callable[[str], None] = print):
    """Stage 4: class-specific ridge regression on the sample's pool5 rows (IoU > min_overlap); into the model.

    ``sample`` None (streaming with ``rcnn.bbox_reg.enabled`` false): no rows, every class left unfitted.
    """
    parts = rcnn_parts(model)
    if sample is None:
        sample = regression_sample(cfg, parts.num_classes, parts.box_regressor.weight.shape[-1])
    feats, props, gts, classes = sample.rows()
    norms = np.linalg.norm(feats, axis=1)
    scale = cfg.rcnn.svm.feature_norm / float(norms.mean()) if len(norms) and norms.mean() > 0 else 1.0
    capped = [f"'{n}' {k} of {s}" for n, k, s in zip(parts.class_names, sample.counts(), sample.seen) if k < s]
    if capped:
        log(f"bbox regression: at most {sample.max_rows} rows per class (rcnn.bbox_reg.max_rows_per_class): "
            + ", ".join(capped))
    # a uniform sample of a class's rows estimates its squared error times kept / seen: lambda scaled the same way
    # keeps the balance of the full fit (on bccd, 256 of 11443 rows: held-out error 0.65 vs 0.61, unscaled 0.83)
    alpha = cfg.rcnn.bbox_reg.alpha * np.asarray(sample.counts()) / np.maximum(sample.seen, 1)
    result = fit_box_regressors(feats, props, gts, classes, parts.num_classes, alpha=alpha,
                                scale=scale, class_names=parts.class_names, log=log)
    parts.box_regressor.load_result(result, scale)
    return result
