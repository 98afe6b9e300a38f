"""One detector, three papers: an input transform, a feature stage, a proposal stage and a head.

The R-CNN family differs only in its parts (see :func:`detect.build.build_model`):

* Faster R-CNN (Ren et al. 2015) = RPN proposals on the shared feature map + the RoI head;
* Fast R-CNN (Girshick 2015) = external (selective-search) proposals + the same RoI head;
* R-CNN (Girshick et al. 2014) = external proposals + the warp head, which runs the CNN on every
  warped region (so its feature stage is the identity: no whole-image trunk pass).

:class:`Detector` owns what the three have in common and writes it once: input checks, the
transform and its inverse, training losses (:meth:`Detector.loss`), scoring of boxes
(:meth:`Detector.score_boxes`, the hook of the analysis tools and export), per-class post-processing
(:func:`detect.postprocess.select_detections`) and one set of timing keys: ``features``,
``proposals``, ``head``, ``postprocess``.

A proposal stage implements ``run(inp, *, training, with_loss) -> (boxes, scores or None,
losses)`` with boxes in network-input pixels and ``loss_names``; a head implements ``loss(inp,
boxes)``, ``score(inp, boxes) -> [(scores (R, C), boxes (R, C, 4))]``, ``loss_names``,
``uses_feature_map`` and the post-processing settings ``score_thresh``, ``nms_thresh``,
``detections_per_img``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detect.backbones import Backbone, fold_frozen_batchnorm, is_pointwise
from detect.data.loader import as_image_tensors
from detect.postprocess import select_detections
from detect.transforms import DetectionTransform, ImageBatch, check_images, check_targets
from detect.utils.modes import eval_mode
from detect.utils.timing import StageClock

Stage = Literal["joint", "rpn", "head"]
TIMING_KEYS = ("features", "proposals", "head", "postprocess")


@dataclass
class Inputs:
    """What the proposal stage and the head may use for one batch.

    Attributes:
        images: the N input images, float (3, H, W) in [0, 1], in their own pixels.
        batch: the transformed batch (resized, normalised, padded).
        features: the backbone's (N, C, h, w) map, or None for a per-region head.
        backbone: the trunk (a per-region head runs it on its warps).
        transform: the transform that made ``batch`` (a test scale's in multi-scale testing).
        image_ids: ids to look stored proposals up by, or None.
        flipped: per image, whether it was mirrored (stored boxes are of the unflipped image).
        targets: training targets in network-input pixels; input_targets: the same in the images' pixels.
        clock: the stage clock, for heads that time their own parts.
    """

    images: list[Tensor]
    batch: ImageBatch
    features: Tensor | None
    backbone: nn.Module
    transform: DetectionTransform
    image_ids: list[str] | None = None
    flipped: list[bool] | None = None
    targets: list[dict] | None = None
    input_targets: list[dict] | None = None
    clock: StageClock | None = None

    def image(self, i: int) -> Tensor:
        """Image ``i`` normalised, without the batch's padding."""
        h, w = self.batch.image_sizes[i]
        return self.batch.tensor[i, :, :h, :w]


def target_ids(targets: Sequence[dict]) -> tuple[list[str] | None, list[bool]]:
    """Image ids (None unless every target has one) and flip flags carried by the targets."""
    ids = [t.get("image_id") for t in targets]
    return (None if any(i is None for i in ids) else [str(i) for i in ids]), \
        [bool(t.get("flipped", False)) for t in targets]


class Detector(nn.Module):
    """Transform + backbone + proposal stage + head, behind ``loss`` / ``predict`` / ``score_boxes``.

    Args:
        transform: resizing, normalisation, padding (and its inverse for the boxes).
        backbone: the convolutional trunk (on the whole image, or on each warp for R-CNN's head).
        proposals: the proposal stage (the RPN, or external boxes: stored or computed selective search,
            ground truth).
        head: the RoI head or R-CNN's warp head.
        class_names: C names; label i is ``class_names[i]``.
        test_transforms: one transform per test scale for multi-scale testing (Fast R-CNN Sec. 5.2);
            empty: single scale with ``transform``.
        multiscale_area: with several scales, each RoI is pooled at the scale where its area is closest to this.
    """

    def __init__(self, *, transform: DetectionTransform, backbone: Backbone, proposals: nn.Module, head: nn.Module,
                 class_names: Sequence[str], test_transforms: Sequence[DetectionTransform] = (),
                 multiscale_area: float = 224.0 ** 2) -> None:
        super().__init__()
        if len(class_names) != head.num_classes:
            raise ValueError(f"{len(class_names)} class names for a head with {head.num_classes} classes")
        if len(test_transforms) > 1 and not (head.uses_feature_map and hasattr(proposals, "input_boxes")):
            raise ValueError("multi-scale testing needs external proposals and a head on the feature map")
        self.transform = transform
        self.backbone = backbone
        self.proposals = proposals
        self.head = head
        self.class_names = list(class_names)
        self.test_transforms = nn.ModuleList(test_transforms)
        self.multiscale_area = multiscale_area
        self.channels_last = False      # set by prepare_for_inference

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _inputs(self, images: list[Tensor], transform: DetectionTransform, *, training: bool,
                targets: list[dict] | None = None, image_ids=None, clock: StageClock | None = None) -> Inputs:
        batch, net_targets = transform(images, targets, training=training)
        features = None
        if self.head.uses_feature_map:
            x = batch.tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.tensor
            features = self.backbone(x)
        flipped = None
        if targets is not None:
            image_ids, flipped = target_ids(targets)
        ids = None if image_ids is None else [str(i) for i in image_ids]
        return Inputs(images, batch, features, self.backbone, transform, ids, flipped, net_targets, targets, clock)

    def loss(self, images: list[Tensor], targets: list[dict], *, stage: Stage = "joint",
             proposals: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Training losses for a batch.

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1], any sizes.
            targets: N dicts: "boxes" (G_i, 4) xyxy in the image's pixels, "labels" (G_i,) int64 0-based;
                "image_id" (and "flipped") where stored proposals are looked up.
            stage: "joint" (proposal stage + head), "rpn" (the proposal stage's losses only) or "head"
                (the head only; the proposals are computed without gradient) -- alternating training.
            proposals: N tensors (P_i, 4) in the images' pixels from another model (alternating step 2).

        Returns:
            The proposal stage's loss terms then the head's ({"loss_rpn_cls", "loss_rpn_box", "loss_cls",
            "loss_box"} for Faster R-CNN); a stage's unused terms are zero.
        """
        if stage not in ("joint", "rpn", "head"):
            raise ValueError(f"stage must be 'joint', 'rpn' or 'head', got {stage!r}")
        images = check_images(images)
        check_targets(targets, len(images), self.num_classes)
        inp = self._inputs(images, self.transform, training=True, targets=targets)
        zero = inp.batch.tensor.new_zeros(()) if inp.features is None else inp.features.new_zeros(())
        losses = {name: zero for name in (*self.proposals.loss_names, *self.head.loss_names)}
        if stage != "head":
            boxes, _, stage_losses = self.proposals.run(inp, training=True, with_loss=True)
            losses.update(stage_losses)
        if stage == "rpn":
            return losses
        dtype = inp.batch.tensor.dtype if inp.features is None else inp.features.dtype
        if proposals is not None:
            boxes = [self.transform.boxes_to_network(p.to(dtype), size, orig)
                     for p, size, orig in zip(proposals, inp.batch.image_sizes, inp.batch.original_sizes)]
        elif stage == "head":
            with torch.no_grad():
                boxes, _, _ = self.proposals.run(inp, training=True, with_loss=False)
        losses.update(self.head.loss(inp, boxes))
        return losses

    @torch.inference_mode()
    def predict(self, images, *, image_ids: Sequence[str] | None = None,
                timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Detect objects (in eval mode, whatever the module's mode).

        Args:
            images: N images: float (3, H, W) RGB tensors in [0, 1], uint8 tensors, image file paths (EXIF
                orientation applied), PIL images or (H, W, 3) uint8 RGB arrays.
            image_ids: ids to look stored proposals up by; without them external proposals are computed.
            timings: if given, seconds per stage are added to its "features", "proposals", "head" and
                "postprocess" keys.

        Returns:
            N dicts: "boxes" (D, 4) xyxy in the image's pixels, "scores" (D,), "labels" (D,) int64 0-based.
        """
        device = next(self.parameters()).device
        images = check_images(as_image_tensors(images, device))
        with eval_mode(self):
            clock = StageClock(timings, images[0].device if images else None)
            if len(self.test_transforms) > 1:
                return self._predict_multiscale(images, image_ids, clock)
            transform = self.test_transforms[0] if len(self.test_transforms) else self.transform
            inp = self._inputs(images, transform, training=False, image_ids=image_ids, clock=clock)
            clock.lap("features")
            boxes, _, _ = self.proposals.run(inp, training=False)
            clock.lap("proposals")
            scored = self.head.score(inp, boxes)
            clock.lap("head")
            results = [self._select(s, b, inp, i) for i, (s, b) in enumerate(scored)]
            clock.lap("postprocess")
            return results

    def _select(self, scores: Tensor, boxes: Tensor, inp: Inputs, i: int) -> dict[str, Tensor]:
        det = select_detections(boxes, scores, inp.batch.image_sizes[i], score_thresh=self.head.score_thresh,
                                nms_thresh=self.head.nms_thresh, detections_per_img=self.head.detections_per_img)
        det["boxes"] = inp.transform.boxes_to_input(det["boxes"], inp.batch.image_sizes[i], inp.batch.original_sizes[i])
        return det

    @torch.inference_mode()
    def score_boxes(self, images, boxes: Sequence[Tensor], *, transformed: bool = False) -> list[tuple[Tensor, Tensor]]:
        """The head's class scores and regressed boxes for given boxes (occlusion maps, error analysis, export).

        Args:
            images: N images (as :meth:`predict` takes them); with ``transformed``, an (N, 3, H, W) batch
                already resized and normalised by this detector's transform (e.g. occluded copies of one
                image), whose boxes are then in its pixels.
            boxes: N tensors (R_i, 4) in the images' pixels.

        Returns:
            N pairs: scores (R_i, C) (softmax probabilities, or SVM scores for a trained R-CNN) and
            boxes (R_i, C, 4) regressed per class, in the images' pixels (not clipped).
        """
        with eval_mode(self):
            if transformed:
                size = tuple(images.shape[-2:])
                batch = ImageBatch(images, [size] * len(images), [size] * len(images))
                features = self.backbone(images) if self.head.uses_feature_map else None
                inp = Inputs([], batch, features, self.backbone, self.transform_for_test)
            else:
                images = check_images(as_image_tensors(images, next(self.parameters()).device))
                inp = self._inputs(images, self.transform_for_test, training=False)
            rois = [inp.transform.boxes_to_network(b.to(inp.batch.tensor), size, orig)
                    for b, size, orig in zip(boxes, inp.batch.image_sizes, inp.batch.original_sizes)]
            out = []
            for (scores, regressed), size, orig in zip(self.head.score(inp, rois), inp.batch.image_sizes,
                                                       inp.batch.original_sizes):
                flat = inp.transform.boxes_to_input(regressed.reshape(-1, 4), size, orig)
                out.append((scores, flat.reshape(regressed.shape)))
            return out

    @property
    def transform_for_test(self) -> DetectionTransform:
        """The single-scale test transform."""
        return self.test_transforms[0] if len(self.test_transforms) == 1 else self.transform

    @torch.inference_mode()
    def propose(self, images: list[Tensor], *, training: bool = False,
                image_ids: Sequence[str] | None = None) -> tuple[list[Tensor], list[Tensor | None]]:
        """Proposals in the images' pixels with their scores (None for external boxes without scores).

        Args:
            training: the training top-k counts and a training scale draw (alternating step 2).
        """
        images = check_images(images)
        with eval_mode(self):
            transform = self.transform if training else self.transform_for_test
            inp = self._inputs(images, transform, training=training, image_ids=image_ids)
            boxes, scores, _ = self.proposals.run(inp, training=training)
            boxes = [transform.boxes_to_input(b, size, orig)
                     for b, size, orig in zip(boxes, inp.batch.image_sizes, inp.batch.original_sizes)]
            return boxes, scores if scores is not None else [None] * len(boxes)

    def _predict_multiscale(self, images: list[Tensor], image_ids, clock: StageClock) -> list[dict]:
        """Image pyramid (Sec. 5.2): each RoI is pooled at the scale that brings its area closest to 224^2.

        The head scores each scale's RoIs; the per-scale detections are merged with a final per-class
        NMS (a greedy NMS over the union, equal to one NMS except in rare suppression chains).
        """
        results = []
        for k, image in enumerate(images):
            ids = None if image_ids is None else [image_ids[k]]
            per_scale = [self._inputs([image], t, training=False, image_ids=ids) for t in self.test_transforms]
            clock.lap("features")
            props = self.proposals.input_boxes(per_scale[0], training=False)[0]
            clock.lap("proposals")
            area = (props[:, 2] - props[:, 0]) * (props[:, 3] - props[:, 1])
            ratios = torch.tensor([inp.batch.image_sizes[0][0] / image.shape[-2] for inp in per_scale],
                                  device=props.device)
            choice = (area[:, None] * ratios[None] ** 2 - self.multiscale_area).abs().argmin(dim=1)
            parts = []
            for scale, inp in enumerate(per_scale):
                mine = props[choice == scale]
                if len(mine):
                    rois = inp.transform.boxes_to_network(mine.to(inp.features.dtype), inp.batch.image_sizes[0],
                                                          inp.batch.original_sizes[0])
                    scores, boxes = self.head.score(inp, [rois])[0]
                    parts.append(self._select(scores, boxes, inp, 0))
            clock.lap("head")
            results.append(self._merge(parts, props))
            clock.lap("postprocess")
        return results

    def _merge(self, parts: list[dict], props: Tensor) -> dict[str, Tensor]:
        if not parts:
            return {"boxes": props.new_zeros(0, 4), "scores": props.new_zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64, device=props.device)}
        merged = {k: torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "labels")}
        keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], self.head.nms_thresh)
        return {k: v[keep[: self.head.detections_per_img]] for k, v in merged.items()}

    @torch.no_grad()
    def prepare_for_inference(self) -> "Detector":
        """Make :meth:`predict` faster on the CPU; returns ``self``.

        Folds every BatchNorm into the convolution before it (one pass less over each feature map)
        and stores conv weights channels-last, the layout oneDNN's CPU convolutions prefer (ResNet-50
        C4 trunk: ~1.4x together). A per-RoI head with no spatial convolution (fc layers, 1x1 channel
        reductions) stays as it is: converting its (R, C, 7, 7) RoI features to channels-last costs
        more than it saves. Detections are unchanged up to float rounding. Call it once on a model
        used only for inference: the checkpoint layout changes (the BN tensors disappear).
        """
        fold_frozen_batchnorm(self.backbone)
        fold_frozen_batchnorm(self.head)
        if next(self.parameters()).device.type == "cpu":
            convs = [m for m in self.head.modules() if isinstance(m, nn.Conv2d)]
            if all(is_pointwise(m) for m in convs):
                self.backbone.to(memory_format=torch.channels_last)
                self.proposals.to(memory_format=torch.channels_last)
            else:
                self.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def forward(self, images) -> list[dict[str, Tensor]]:
        """Same as :meth:`predict` (so the module can be called; training uses :meth:`loss`)."""
        return self.predict(images)

    # Set by detect.build (which builds detectors, so this module cannot import it): the checkpoint loader.
    loader: Callable | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        overrides: Sequence[str] = ()) -> "Detector":
        """The detector saved in a checkpoint (``model_final.pt``, ``model_best.pt``, a periodic one), in eval mode.

        Its pipeline, class names and config come from the checkpoint; ``overrides`` (``key=value``)
        change the stored config, e.g. ``model.roi_heads.score_thresh=0.3``. An exported ``.onnx`` /
        ``.pt2`` file gives a :class:`detect.runtime.ExportedDetector` instead (same ``predict`` and
        ``class_names``; CPU only; no weights to train, and ``model.*`` overrides are refused).
        """
        from detect.runtime import is_exported, load_exported   # here: runtime imports the proposal sources

        if is_exported(path):
            return load_exported(path, overrides=overrides, device=device)
        if cls.loader is None:
            raise RuntimeError("Detector.from_checkpoint: import it as 'from detect import Detector' "
                               "(detect.build registers the loader)")
        model, _, _ = cls.loader(path, overrides=list(overrides), device=device)
        return model
