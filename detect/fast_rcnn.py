"""Fast R-CNN (Girshick, ICCV 2015): one trunk pass per image, an RoI head fed by external proposals.

The detector is the same RoI head as Faster R-CNN's (:mod:`detect.roi_heads`,
Sec. 2: RoI pooling, fc layers, softmax and box regression siblings, the
multi-task loss of Eq. 1), fed by a :mod:`detect.proposal_sources` source --
stored selective-search boxes as in the paper, or ground truth, or an RPN.

Training follows Sec. 2.3: hierarchical sampling of N = 2 images and R / N = 64
RoIs each (``train.images_per_batch`` and ``model.roi_heads.batch_size_per_image``),
25% foreground at IoU >= 0.5, background in [0.1, 0.5), flipped images, one scale
or several (``model.input.min_size``). Testing is single- or multi-scale (Sec. 5.2,
``fast_rcnn.test_scales``); the fc layers can be compressed by truncated SVD (Sec. 3.1).

Targets and :meth:`FastRCNN.predict` carry image ids so stored boxes can be found;
without them the boxes are computed by selective search (and remembered by content).
"""

from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detect.backbones import Backbone
from detect.roi_heads import RoIHead
from detect.transforms import DetectionTransform, check_images, check_targets
from detect.utils.modes import eval_mode
from detect.utils.timing import StageClock


def target_ids(targets: Sequence[dict]) -> tuple[list[str] | None, list[bool]]:
    """Image ids (None unless every target has one) and flip flags carried by the targets."""
    ids = [t.get("image_id") for t in targets]
    return (None if any(i is None for i in ids) else [str(i) for i in ids]), \
        [bool(t.get("flipped", False)) for t in targets]


class FastRCNN(nn.Module):
    """Trunk + RoI head over proposals from a :class:`~detect.proposal_sources.ProposalSource`.

    Args:
        transform: resizing / normalisation / padding (the training scale is drawn from its ``min_size``).
        backbone: the convolutional trunk, run once per image (Sec. 2).
        roi_head: RoI pooling, fc layers, class scores and box deltas.
        proposals: gives each image's boxes in its pixels.
        class_names: C names; label i is ``class_names[i]``.
        train_proposals, test_proposals: the best-ranked boxes used per image (0: all).
        test_transforms: one transform per test scale for multi-scale testing (Sec. 5.2); empty: single scale.
        multiscale_area: with several scales, each RoI is pooled at the scale where its area is closest to this.
    """

    def __init__(self, *, transform: DetectionTransform, backbone: Backbone, roi_head: RoIHead, proposals,
                 class_names: list[str], train_proposals: int = 2000, test_proposals: int = 2000,
                 test_transforms: Sequence[DetectionTransform] = (), multiscale_area: float = 224.0 ** 2) -> None:
        super().__init__()
        if len(class_names) != roi_head.num_classes:
            raise ValueError(f"{len(class_names)} class names for a head with {roi_head.num_classes} classes")
        self.transform = transform
        self.backbone = backbone
        self.roi_head = roi_head
        self.proposals = proposals
        self.class_names = list(class_names)
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals
        self.test_transforms = nn.ModuleList(test_transforms)
        self.multiscale_area = multiscale_area

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def loss(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """Multi-task loss (Eq. 1) on RoIs sampled from each image's proposals (Sec. 2.3).

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1].
            targets: N dicts: "boxes" (G_i, 4), "labels" (G_i,) 0-based, and "image_id" (+ "flipped") to look
                up stored proposals.

        Returns:
            {"loss_cls", "loss_box"}.
        """
        images = check_images(images)
        check_targets(targets, len(images), self.num_classes)
        ids, flipped = target_ids(targets)
        boxes = self.proposals(images, ids, flipped=flipped, targets=targets)
        batch, targets = self.transform(images, targets, training=True)
        features = self.backbone(batch.tensor)
        rois = [self.transform.boxes_to_network(b[: self.train_proposals or None].to(features.dtype), size, orig)
                for b, size, orig in zip(boxes, batch.image_sizes, batch.original_sizes)]
        return self.roi_head.loss(features, rois, targets, batch.image_sizes)

    @torch.inference_mode()
    def predict(self, images: list[Tensor], *, image_ids: Sequence[str] | None = None,
                timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Detect objects (in eval mode, whatever the module's mode).

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1].
            image_ids: ids to look stored proposals up by; None computes them with selective search.
            timings: if given, seconds are added to its "proposals", "features" and "heads" keys.

        Returns:
            N dicts: "boxes" (D, 4) in the images' pixels, "scores" (D,), "labels" (D,) int64 0-based.
        """
        images = check_images(images)
        with eval_mode(self):
            clock = StageClock(timings, images[0].device if images else None)
            boxes = [b[: self.test_proposals or None] for b in self.proposals(images, image_ids)]
            clock.lap("proposals")
            if len(self.test_transforms) > 1:
                return self._predict_multiscale(images, boxes, clock)
            transform = self.test_transforms[0] if len(self.test_transforms) else self.transform
            batch, _ = transform(images)
            features = self.backbone(batch.tensor)
            clock.lap("features")
            rois = [transform.boxes_to_network(b.to(features.dtype), size, orig)
                    for b, size, orig in zip(boxes, batch.image_sizes, batch.original_sizes)]
            detections = self.roi_head.predict(features, rois, batch.image_sizes)
            for det, size, orig in zip(detections, batch.image_sizes, batch.original_sizes):
                det["boxes"] = transform.boxes_to_input(det["boxes"], size, orig)
            clock.lap("heads")
            return detections

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Same as :meth:`predict` (training uses :meth:`loss`)."""
        return self.predict(images)

    def _predict_multiscale(self, images: list[Tensor], boxes: list[Tensor], clock: StageClock) -> list[dict]:
        """Image pyramid (Sec. 5.2): each RoI is pooled at the scale that brings its area closest to 224^2.

        The head runs once per scale on that scale's RoIs; the per-scale detections are merged with a
        final per-class NMS (a greedy NMS over the union, equal to one NMS except in rare suppression chains).
        """
        head = self.roi_head
        results = []
        for image, props in zip(images, boxes):
            h, w = image.shape[-2:]
            per_scale = []
            for transform in self.test_transforms:
                batch, _ = transform([image])
                features = self.backbone(batch.tensor)
                per_scale.append((transform, batch, features))
            clock.lap("features")
            area = (props[:, 2] - props[:, 0]) * (props[:, 3] - props[:, 1])
            ratios = torch.tensor([b.image_sizes[0][0] / h for _, b, _ in per_scale], device=props.device)
            choice = (area[:, None] * ratios[None] ** 2 - self.multiscale_area).abs().argmin(dim=1)
            parts = []
            for k, (transform, batch, features) in enumerate(per_scale):
                mine = props[choice == k]
                if not len(mine):
                    continue
                rois = transform.boxes_to_network(mine.to(features.dtype), batch.image_sizes[0], batch.original_sizes[0])
                det = head.predict(features, [rois], batch.image_sizes)[0]
                det["boxes"] = transform.boxes_to_input(det["boxes"], batch.image_sizes[0], batch.original_sizes[0])
                parts.append(det)
            merged = {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0) for k in ("boxes", "scores", "labels")}
            if parts:
                keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], head.nms_thresh)
                merged = {k: v[keep[: head.detections_per_img]] for k, v in merged.items()}
            else:
                merged = {"boxes": props.new_zeros(0, 4), "scores": props.new_zeros(0),
                          "labels": torch.zeros(0, dtype=torch.int64, device=props.device)}
            results.append(merged)
            clock.lap("heads")
        return results


def predict_split(model: nn.Module, dataset, *, device: torch.device | str = "cpu", timings: dict | None = None,
                  limit: int = 0, log=print) -> dict:
    """Detections for a dataset's images, passing image ids so stored proposals are found.

    Returns:
        ``{image_id: {"boxes", "scores", "labels"}}`` (numpy), as :func:`detect.engine.evaluate`; ``timings``
        (if given) gets seconds per stage plus "total" and "images".
    """
    import inspect

    from detect.evaluation.results import detection_to_numpy

    params = inspect.signature(model.predict).parameters
    model.eval()
    detections = {}
    count = min(len(dataset), limit) if limit > 0 else len(dataset)
    for index in range(count):
        item = dataset[index]
        if not isinstance(item, tuple):                  # an unreadable image (a Skipped marker)
            log(f"skipped image {item.image_id}: {item.reason}")
            continue
        image, target = item
        kwargs = {"image_ids": [target["image_id"]]} if "image_ids" in params else {}
        if "timings" in params:
            kwargs["timings"] = timings
        image = image.to(device)
        start = time.perf_counter()
        det = model.predict([image], **kwargs)[0]
        if timings is not None:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            timings["total"] = timings.get("total", 0.0) + time.perf_counter() - start
            timings["images"] = timings.get("images", 0) + 1
        detections[target["image_id"]] = detection_to_numpy(det)
    return detections


def build_fast_rcnn(cfg, class_names: list[str] | None = None) -> FastRCNN:
    """Build the Fast R-CNN ``cfg`` describes (``model.*`` for trunk and head, ``fast_rcnn.*``, ``proposals.*``).

    The transform, trunk and RoI head are built exactly as for Faster R-CNN (one definition of them,
    in :func:`detect.build.build_model`); the RPN that comes with them is dropped.
    """
    from detect.build import build_model
    from detect.proposal_sources import build_proposal_source
    from detect.svd import compress_fc

    f = cfg.fast_rcnn
    base = copy.deepcopy(cfg)
    base.model.pipeline = "faster_rcnn"
    parts = build_model(base, class_names=class_names)
    source = build_proposal_source(cfg, f.proposal_source, top_k=max(f.train_proposals, f.test_proposals),
                                   compute_missing=f.compute_missing)
    t = parts.transform
    test_transforms = [DetectionTransform(min_size=t.min_size, max_size=round(s * t.max_size / t.test_min_size), test_min_size=s,
                                          pixel_mean=t.pixel_mean.flatten().tolist(),
                                          pixel_std=t.pixel_std.flatten().tolist(),
                                          size_divisibility=t.size_divisibility, min_input_size=t.min_input_size)
                       for s in f.test_scales]
    if f.svd_rank_fc6 or f.svd_rank_fc7:   # a compressed model's shape; its weights come from its checkpoint
        compress_fc(parts.roi_head.box_head, [f.svd_rank_fc6, f.svd_rank_fc7], structure_only=True)
    return FastRCNN(transform=t, backbone=parts.backbone, roi_head=parts.roi_head, proposals=source,
                    class_names=parts.class_names, train_proposals=f.train_proposals,
                    test_proposals=f.test_proposals, test_transforms=test_transforms,
                    multiscale_area=f.multiscale_area)
