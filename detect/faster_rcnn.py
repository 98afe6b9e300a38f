"""Faster R-CNN (Ren et al., NIPS 2015): a shared trunk, an RPN and a Fast R-CNN RoI head.

Training is approximate joint training (Sec. 3.2, ``stage="joint"``) or the
paper's 4-step alternating training (Sec. 3.2, :data:`ALTERNATING_STEPS`):
the engine runs the steps, calling :func:`apply_alternating_step` to set what
trains and ``loss(..., stage=step.stage)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detect.backbones import Backbone, fold_frozen_batchnorm, is_pointwise
from detect.roi_heads import RoIHead
from detect.rpn import RegionProposalNetwork
from detect.transforms import DetectionTransform, check_images, check_targets
from detect.utils.modes import eval_mode
from detect.utils.timing import StageClock

Stage = Literal["joint", "rpn", "head"]


class FasterRCNN(nn.Module):
    """Backbone + RPN + RoI head behind one input pipeline.

    Args:
        transform: resizing / normalisation / padding of the input images.
        backbone: the shared convolutional trunk.
        rpn: proposal source.
        roi_head: Fast R-CNN head (owns the backbone's per-RoI layers).
        class_names: C names; label i is ``class_names[i]``.
    """

    def __init__(self, *, transform: DetectionTransform, backbone: Backbone, rpn: RegionProposalNetwork,
                 roi_head: RoIHead, class_names: list[str]) -> None:
        super().__init__()
        if len(class_names) != roi_head.num_classes:
            raise ValueError(f"{len(class_names)} class names for a head with {roi_head.num_classes} classes")
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_head = roi_head
        self.class_names = list(class_names)
        self.channels_last = False      # set by prepare_for_inference

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def loss(self, images: list[Tensor], targets: list[dict], *, stage: Stage = "joint",
             proposals: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Training losses for a batch.

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1], any sizes.
            targets: N dicts: "boxes" (G_i, 4) xyxy in the image's pixels, "labels" (G_i,) int64 0-based.
            stage: "joint" (RPN + head), "rpn" (RPN only) or "head" (head only, alternating training).
            proposals: for stage "head": N tensors (P_i, 4) in the images' pixels from another
                model (alternating step 2); None uses this model's RPN without gradient.

        Returns:
            {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}; a stage's unused terms are zero.
        """
        if stage not in ("joint", "rpn", "head"):
            raise ValueError(f"stage must be 'joint', 'rpn' or 'head', got {stage!r}")
        images = check_images(images)
        check_targets(targets, len(images), self.num_classes)
        batch, targets = self.transform(images, targets, training=True)
        features = self.backbone(batch.tensor)
        zero = features.new_zeros(())
        losses = {"loss_rpn_cls": zero, "loss_rpn_box": zero, "loss_cls": zero, "loss_box": zero}
        if stage != "head":
            rpn_losses, rpn_proposals = self.rpn.loss(features, batch.image_sizes, [t["boxes"] for t in targets])
            losses.update(rpn_losses)
        if stage == "rpn":
            return losses
        if proposals is not None:
            rpn_proposals = [self.transform.boxes_to_network(p.to(features.dtype), size, orig)
                             for p, size, orig in zip(proposals, batch.image_sizes, batch.original_sizes)]
        elif stage == "head":
            with torch.no_grad():
                rpn_proposals, _ = self.rpn.predict(features, batch.image_sizes, training=True)
        losses.update(self.roi_head.loss(features, rpn_proposals, targets, batch.image_sizes))
        return losses

    @torch.inference_mode()
    def predict(self, images: list[Tensor], *, timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Detect objects (in eval mode, whatever the module's mode).

        Args:
            images: N float (3, H, W) RGB tensors in [0, 1].
            timings: if given, seconds spent per stage are added to its "backbone", "rpn", "roi_heads" keys.

        Returns:
            N dicts: "boxes" (D, 4) xyxy in the image's pixels, "scores" (D,), "labels" (D,) int64 0-based.
        """
        images = check_images(images)
        with eval_mode(self):
            clock = StageClock(timings, images[0].device if images else None)
            batch, _ = self.transform(images)
            x = batch.tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.tensor
            features = self.backbone(x)
            clock.lap("backbone")
            proposals, _ = self.rpn.predict(features, batch.image_sizes)
            clock.lap("rpn")
            detections = self.roi_head.predict(features, proposals, batch.image_sizes)
            for det, size, orig in zip(detections, batch.image_sizes, batch.original_sizes):
                det["boxes"] = self.transform.boxes_to_input(det["boxes"], size, orig)
            clock.lap("roi_heads")
            return detections

    @torch.no_grad()
    def prepare_for_inference(self) -> "FasterRCNN":
        """Make :meth:`predict` faster on the CPU; returns ``self``.

        Folds every BatchNorm into the convolution before it (one pass less over each
        feature map) and stores conv weights channels-last, the layout oneDNN's CPU
        convolutions prefer (ResNet-50 C4 trunk: ~1.4x together). A per-RoI head with no
        spatial convolution (fc layers, 1x1 channel reductions) stays as it is: converting
        its (R, C, 7, 7) RoI features to channels-last costs more than it saves. Detections are unchanged up to
        float rounding. Call it once on a model used only for inference: the checkpoint
        layout changes (the BN tensors disappear), so save checkpoints before.
        """
        fold_frozen_batchnorm(self.backbone)
        fold_frozen_batchnorm(self.roi_head)
        if next(self.parameters()).device.type == "cpu":
            convs = [m for m in self.roi_head.modules() if isinstance(m, nn.Conv2d)]
            if all(is_pointwise(m) for m in convs):
                self.backbone.to(memory_format=torch.channels_last)
                self.rpn.to(memory_format=torch.channels_last)
            else:
                self.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Same as :meth:`predict` (so the module can be called; training uses :meth:`loss`)."""
        return self.predict(images)

    @torch.inference_mode()
    def propose(self, images: list[Tensor], *, training: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """RPN proposals in the images' pixels, with objectness scores (alternating step 2, recall studies).

        Args:
            training: use the training top-k counts and this image scale draw (12000 / 2000 in the paper).
        """
        images = check_images(images)
        with eval_mode(self):
            batch, _ = self.transform(images, training=training)
            features = self.backbone(batch.tensor)
            boxes, scores = self.rpn.predict(features, batch.image_sizes, training=training)
            boxes = [self.transform.boxes_to_input(b, size, orig)
                     for b, size, orig in zip(boxes, batch.image_sizes, batch.original_sizes)]
            return boxes, scores


# --------------------------------------------------------------------------- 4-step alternating training


@dataclass(frozen=True)
class AlternatingStep:
    """One step of the paper's 4-step alternating training (Sec. 3.2).

    Attributes:
        step: 1-4.
        stage: the ``stage`` argument for :meth:`FasterRCNN.loss`.
        trains: parameter groups (see :func:`parameter_groups`) that learn in this step.
        init: where the model's weights come from at the start of the step.
        proposals: "none", "step1" (a frozen copy of the step-1 model proposes) or "own" (this model's RPN).
    """

    step: int
    stage: Stage
    trains: tuple[str, ...]
    init: str
    proposals: str


ALTERNATING_STEPS = (
    AlternatingStep(1, "rpn", ("trunk", "rpn"), init="backbone weights (ImageNet)", proposals="none"),
    AlternatingStep(2, "head", ("trunk", "roi_head"), init="backbone weights (ImageNet), a separate network",
                    proposals="step1"),
    AlternatingStep(3, "rpn", ("rpn",), init="step 2 model (trunk, head) + step 1 RPN layers", proposals="none"),
    AlternatingStep(4, "head", ("roi_head",), init="step 3 model (trunk and RPN now shared)", proposals="own"),
)


def parameter_groups(model: FasterRCNN) -> dict[str, list[nn.Parameter]]:
    """The model's parameters as "trunk" (shared convs), "rpn" (RPN-only layers) and "roi_head" (fc / res5 + predictor).

    Parameters that ``freeze_at`` fixes are left out: they never train.
    """
    frozen = {id(p) for p in model.backbone.frozen_parameters()}
    return {"trunk": [p for p in model.backbone.parameters() if id(p) not in frozen],
            "rpn": list(model.rpn.parameters()),
            "roi_head": list(model.roi_head.parameters())}


def apply_alternating_step(model: FasterRCNN, step: int) -> AlternatingStep:
    """Set ``requires_grad`` for step 1-4 of alternating training and return the step's description.

    Steps 3 and 4 fix the shared trunk, so at the end RPN and detector share one set of conv layers.
    """
    if step not in (1, 2, 3, 4):
        raise ValueError(f"alternating training has steps 1-4, got {step}")
    spec = ALTERNATING_STEPS[step - 1]
    for group, params in parameter_groups(model).items():
        for p in params:
            p.requires_grad_(group in spec.trains)
    return spec


def apply_joint_training(model: FasterRCNN) -> None:
    """Make every parameter trainable except those ``freeze_at`` fixes (approximate joint training)."""
    for params in parameter_groups(model).values():
        for p in params:
            p.requires_grad_(True)
