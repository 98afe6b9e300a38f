"""R-CNN's training stages 2-4 (Sec. 2.3, Appendix C): cache features, fit SVMs, fit box regressors.

Stage 1 (fine-tuning) is ordinary training of the R-CNN detector's loss (:meth:`detect.rcnn.WarpHead.loss`) by
:func:`detect.engine.fit`. The later stages are not gradient descent, so they live
here, each a function a test can call: :func:`extract_features` fills a
:class:`~detect.feature_cache.FeatureCache` (resumable), :func:`fit_svm_stage` and
:func:`fit_regression_stage` read it and load the results into the model.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torchvision.ops import box_iou

from detect.bbox_regression import fit_box_regressors
from detect.data.image import DEFAULT_MAX_PIXELS, read_image
from detect.data.loader import image_to_tensor
from detect.errors import ImageReadError
from detect.feature_cache import CachedImages, FeatureCache, weights_digest
from detect.detector import Detector
from detect.rcnn import region_features
from detect.svm_heads import MiningSettings, feature_scale, train_svms


def cache_fingerprint(model: Detector, cfg) -> dict:
    """What the cached features depend on: the CNN's weights, the proposal set, the warp, the layer, the classes."""
    from detect.proposal_sources import search_params_from_config
    from proposals.store import params_version

    r = cfg.rcnn
    return {"model_weights": weights_digest(model.backbone, model.head.box_head),
            "proposal_set": f"{r.proposal_source}:{params_version(search_params_from_config(cfg))}:top{r.train_proposals}",
            "feature_layer": r.feature_layer, "warp": [r.crop_size, r.context_padding],
            "classes": list(model.class_names), "pool5_min_overlap": r.bbox_reg.min_overlap}


def class_overlaps(boxes: torch.Tensor, gt: torch.Tensor, gt_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(P, C): each box's IoU with the closest ground-truth box of each class (0 without one)."""
    out = boxes.new_zeros(len(boxes), num_classes)
    if len(gt):
        iou = box_iou(boxes, gt)
        for c in gt_labels.unique().tolist():
            out[:, c] = iou[:, gt_labels == c].max(dim=1).values
    return out


@torch.no_grad()
def extract_features(model: Detector, records, cache: FeatureCache, *, device: torch.device | str = "cpu",
                     use_difficult: bool = False, min_overlap: float = 0.6, max_pixels: int = DEFAULT_MAX_PIXELS,
                     log: Callable[[str], None] = print) -> dict:
    """Stage 2: features of the ground-truth boxes and proposals of every image into the cache.

    Images already cached (and passing their checksums) are skipped, so a killed run resumes; a cached
    image whose files are corrupt is recomputed; unreadable images (or above ``max_pixels``) are skipped
    and reported.

    Returns:
        {"computed", "skipped", "failed": {image_id: reason}, "seconds"}.
    """
    model.eval().to(device)
    done = {"computed": 0, "skipped": 0, "failed": {}, "seconds": 0.0}
    start = time.perf_counter()
    for record in records:
        if cache.valid(record.image_id):
            done["skipped"] += 1
            continue
        if record.image_id in cache:
            log(f"features: the cached files of image {record.image_id} are corrupt; recomputing them")
        if not use_difficult:
            record = record.without_difficult()
        try:
            image = image_to_tensor(read_image(record.path, max_pixels=max_pixels)).to(device)
        except ImageReadError as exc:
            done["failed"][record.image_id] = str(exc)
            log(f"features: skipped image {record.image_id}: {exc}")
            continue
        props = model.proposals.source([image], [record.image_id])[0][: model.proposals.train_top or None]
        gt = torch.as_tensor(record.boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        gt_labels = torch.as_tensor(record.labels, dtype=torch.int64, device=device)
        boxes = torch.cat([gt, props.to(device)])
        gt_classes = torch.cat([gt_labels, gt_labels.new_full((len(props),), -1)])
        overlaps = class_overlaps(boxes, gt, gt_labels, model.num_classes)
        pool5, fc7 = region_features(model, image, boxes)
        rows = torch.nonzero(overlaps.max(dim=1).values > min_overlap).squeeze(1) if len(boxes) else \
            torch.zeros(0, dtype=torch.int64)
        cache.put(record.image_id, boxes=boxes.cpu().numpy(), gt_classes=gt_classes.cpu().numpy(),
                  overlaps=overlaps.cpu().numpy(), features=model.head.svm_features(pool5, fc7).cpu().numpy(),
                  pool5_rows=rows.cpu().numpy(), pool5=pool5[rows].cpu().numpy())
        done["computed"] += 1
    done["seconds"] = time.perf_counter() - start
    return done


def fit_svm_stage(model: Detector, cache: FeatureCache, image_ids: list[str], cfg, *, progress: bool = False,
                  log: Callable[[str], None] = print):
    """Stage 3: one-vs-rest linear SVMs with hard negative mining; loaded into ``model.head.svm``.

    Time linear in the images (see :func:`detect.svm_heads.train_svms`); ``progress``: a bar per pass.
    Deterministic: liblinear's coordinate order is seeded with ``train.seed``, so the same features give
    bitwise the same SVMs.
    """
    s = cfg.rcnn.svm
    images = CachedImages(cache, image_ids)
    scale = feature_scale(images, s.feature_norm)
    mining = MiningSettings(hard_thresh=s.hard_thresh, easy_thresh=s.easy_thresh, neg_iou=s.neg_iou,
                            retrain_limit=s.retrain_limit, retrain_growth=s.retrain_growth,
                            batch_images=s.batch_images, epochs=s.epochs, tol=s.tol, max_iter=s.max_iter)
    result = train_svms(images, model.num_classes, C=s.C, pos_weight=s.pos_weight, bias_multiplier=s.bias_multiplier,
                        mining=mining, scale=scale, class_names=model.class_names, seed=cfg.train.seed,
                        progress=progress, log=log)
    model.head.svm.load_result(result, scale)
    return result


def fit_regression_stage(model: Detector, cache: FeatureCache, image_ids: list[str], cfg, *,
                         log: Callable[[str], None] = print):
    """Stage 4: class-specific ridge regression on pool5 of proposals with IoU > min_overlap; into ``model.head.box_regressor``."""
    b = cfg.rcnn.bbox_reg
    feats, props, gts, classes = [], [], [], []
    for image_id in image_ids:
        item = cache.get(image_id)
        gt_rows = np.flatnonzero(item.gt_classes >= 0)
        if not len(item.pool5_rows) or not len(gt_rows):
            continue
        boxes = torch.from_numpy(item.boxes[item.pool5_rows])
        gt = torch.from_numpy(item.boxes[gt_rows])
        best = box_iou(boxes, gt).max(dim=1)
        keep = (best.values > b.min_overlap).numpy()
        feats.append(np.asarray(item.pool5, dtype=np.float32)[keep])
        props.append(boxes.numpy()[keep])
        gts.append(gt.numpy()[best.indices.numpy()[keep]])
        classes.append(item.gt_classes[gt_rows][best.indices.numpy()[keep]])
    dim = model.head.box_regressor.weight.shape[-1]
    feats = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    norms = np.linalg.norm(feats, axis=1)
    scale = cfg.rcnn.svm.feature_norm / float(norms.mean()) if len(norms) and norms.mean() > 0 else 1.0
    result = fit_box_regressors(feats, np.concatenate(props) if props else np.zeros((0, 4)),
                                np.concatenate(gts) if gts else np.zeros((0, 4)),
                                np.concatenate(classes) if classes else np.zeros(0, np.int64), model.num_classes,
                                alpha=b.alpha, scale=scale, class_names=model.class_names, log=log)
    model.head.box_regressor.load_result(result, scale)
    return result
