"""Export-only forwards: ONE image through a trained detector as one graph that any image size shares.

The eager ``predict`` batches images in Python loops, caches anchors by grid size and takes
shortcuts that branch on the data (the RPN's NMS on the best boxes first, torchvision's
``batched_nms`` picking its algorithm by box count). A tracer bakes such branches into the
graph for the traced size, or cannot decide them at all (torchvision's Faster R-CNN fails
there, vision#8937). The modules below run the model's own parts (trunk, RPN head, anchors,
box coders, RoI head layers, R-CNN's region CNN and SVMs) with no branch on size or content:

* resize: the scale comes from the image's shape through float64 tensor ops (the same IEEE
  arithmetic as the transform's Python floats) and the resized size flows on as data;
* proposals: top-k, decode, clip, drop small boxes, NMS, top-k (the eager ``top_nms`` returns
  the same first boxes: greedy NMS decides a box from the better boxes only);
* per-class NMS: one ``torchvision.ops.nms`` over boxes shifted apart per class by the image
  size (``batched_nms``'s coordinate trick without its data-dependent maximum);
* RoI pooling by torchvision's operators (``roi_pool`` -> ONNX MaxRoiPool, ``roi_align`` ->
  RoiAlign); the toolkit's faster CPU RoIPool is bitwise equal to torchvision's.

:func:`detect.export.check_export` proves each export equal to the eager model on several sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import ops

from detect.detector import Detector
from detect.errors import ExportError
from detect.rcnn import WarpHead
from detect.rpn import RegionProposalNetwork


# --------------------------------------------------------------------------- the one place that reads a model


@dataclass
class Parts:
    """What the export reads from a detector.

    Attributes:
        kind: "faster_rcnn" (image in), "fast_rcnn" (image + proposals in) or "rcnn" (region scorer).
        class_names: C names.
        transform: the test-time DetectionTransform (None for R-CNN).
        backbone: the trunk (R-CNN: the whole region CNN stays on ``regions``).
        rpn: the RegionProposalNetwork (Faster R-CNN only).
        head: the RoIHead (Faster and Fast R-CNN).
        test_proposals: Fast R-CNN's proposals used per image (0: all).
        regions: R-CNN's region scorer (``forward_regions``, ``svm``, ``classifier``, ``box_regressor``).
    """

    kind: str
    class_names: list[str]
    transform: nn.Module | None = None
    backbone: nn.Module | None = None
    rpn: nn.Module | None = None
    head: nn.Module | None = None
    test_proposals: int = 0
    regions: nn.Module | None = None


class WarpRegions(nn.Module):
    """R-CNN's region scorer of a Detector: its trunk and warp head, seen as one module over warped crops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        self.svm, self.classifier, self.box_regressor = model.head.svm, model.head.classifier, model.head.box_regressor
        self.crop_size = model.head.crop_size

    def forward_regions(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        return self.head.forward_regions(self.backbone, crops)

    def svm_features(self, pool5: Tensor, fc7: Tensor) -> Tensor:
        return self.head.svm_features(pool5, fc7)


def model_parts(model: nn.Module) -> Parts:
    """Read a :class:`~detect.detector.Detector`'s parts: the one place that knows its attribute names.

    Raises:
        ExportError: a model this export does not know, or a pipeline step it cannot express.
    """
    if not isinstance(model, Detector):
        raise ExportError(f"cannot export a {type(model).__name__}: expected a detect.Detector")
    names = list(model.class_names)
    if isinstance(model.head, WarpHead):
        return Parts(kind="rcnn", class_names=names, regions=WarpRegions(model))
    if isinstance(model.proposals, RegionProposalNetwork):
        return Parts(kind="faster_rcnn", class_names=names, transform=model.transform, backbone=model.backbone,
                     rpn=model.proposals, head=model.head)
    if len(model.test_transforms) > 1:
        raise ExportError(f"fast_rcnn.test_scales has {len(model.test_transforms)} scales: multi-scale testing "
                          "(a trunk pass per scale, each RoI pooled at its own scale) is not exported; "
                          "export single-scale with --set fast_rcnn.test_scales=[]")
    return Parts(kind="fast_rcnn", class_names=names, transform=model.transform_for_test, backbone=model.backbone,
                 head=model.head, test_proposals=model.proposals.test_top)


# --------------------------------------------------------------------------- shared steps


def resize_image(transform: nn.Module, image: Tensor) -> tuple[Tensor, tuple, Tensor, Tensor]:
    """The transform's test-time resize, normalisation and padding of one image, for any size.

    Args:
        image: (3, H, W) uint8 (0-255) or float ([0, 1]) RGB.

    Returns:
        (1, 3, Hp, Wp) padded batch, the resized (h, w), and the (4,) float32 factors
        ``(W / w, H / h, W / w, H / h)`` that take boxes back to the input's pixels and
        ``(w / W, h / H, ...)`` that take them to the network's (each rounded from float64 once, as
        the transform's ``boxes_to_input`` / ``boxes_to_network`` do).
    """
    x = image.to(torch.float32) / 255 if image.dtype == torch.uint8 else image
    x = (x - transform.pixel_mean) / transform.pixel_std
    h, w = x.shape[-2:]
    size = torch.stack([torch.scalar_tensor(h, dtype=torch.float64), torch.scalar_tensor(w, dtype=torch.float64)])
    # Tensor / tensor: ``number / tensor`` is traced as reciprocal * number, an ulp away from Python's
    # quotient, and floor(size * scale) then drops a pixel where the product should be a whole number.
    target = torch.scalar_tensor(transform.test_min_size, dtype=torch.float64)
    limit = torch.scalar_tensor(transform.max_size, dtype=torch.float64)
    scale = torch.minimum(target / size.min(), limit / size.max())
    resized = torch.floor(size * scale)            # F.interpolate's floor(size * scale), in float64 like Python's
    nh, nw = resized[0].to(torch.int64).item(), resized[1].to(torch.int64).item()
    torch._check(nh >= 1)
    torch._check(nw >= 1)
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)
    div = transform.size_divisibility
    if transform.min_input_size > div:
        nh_, nw_ = torch.sym_max(nh, transform.min_input_size), torch.sym_max(nw, transform.min_input_size)
    else:       # rounding up to the divisor already reaches the minimum: no Max in every later shape
        nh_, nw_ = nh, nw
    ph, pw = (nh_ + div - 1) // div * div, (nw_ + div - 1) // div * div
    x = F.pad(x, (0, pw - nw, 0, ph - nh))
    to_input = torch.stack([size[1] / resized[1], size[0] / resized[0]]).repeat(2).to(torch.float32)
    to_network = torch.stack([resized[1] / size[1], resized[0] / size[0]]).repeat(2).to(torch.float32)
    return x, (nh, nw), to_input, to_network


def rpn_proposals(rpn: nn.Module, features: Tensor, image_size: tuple) -> Tensor:
    """The RPN's test-time proposal layer for one image (:meth:`RegionProposalNetwork.propose`): (P, 4)."""
    logits, deltas = rpn.head(features)
    anchors = rpn.anchor_generator.tile(features.shape[-2], features.shape[-1])
    top, index = logits[0].topk(torch.sym_min(rpn.pre_nms_top_n[1], logits.shape[1]))
    boxes = ops.clip_boxes_to_image(rpn.box_coder.decode(deltas[0][index], anchors[index]), image_size)
    scores = torch.sigmoid(top)
    big = (boxes[:, 2] - boxes[:, 0] >= rpn.min_size) & (boxes[:, 3] - boxes[:, 1] >= rpn.min_size)
    keep = torch.nonzero(big).squeeze(1)
    boxes, scores = boxes[keep], scores[keep]
    return boxes[ops.nms(boxes, scores, rpn.nms_thresh)[: rpn.post_nms_top_n[1]]]


def pool_rois(pooler: nn.Module, features: Tensor, boxes: Tensor) -> Tensor:
    """The head's pooler on one image's (R, 4) boxes through torchvision's exportable operators."""
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
    if isinstance(pooler, ops.RoIAlign):
        return ops.roi_align(features, rois, pooler.output_size, pooler.spatial_scale, pooler.sampling_ratio,
                             pooler.aligned)
    return ops.roi_pool(features, rois, pooler.output_size, pooler.spatial_scale)


def per_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thresh: float, extent) -> Tensor:
    """``batched_nms`` for boxes inside ``[0, extent]``: classes shifted apart so one NMS never mixes them."""
    shifted = boxes + (labels.to(boxes.dtype) * (extent + 1))[:, None]
    return ops.nms(shifted, scores, iou_thresh)


def head_detections(head: nn.Module, features: Tensor, proposals: Tensor, image_size: tuple) -> tuple:
    """:meth:`RoIHead.predict` for one image: (D, 4) boxes in network pixels, (D,) scores, (D,) 0-based labels."""
    class_logits, deltas = head.predictor(head.box_head(pool_rois(head.pooler, features, proposals)))
    probs = F.softmax(class_logits, dim=-1)
    boxes = head.box_coder.decode(deltas, proposals).view(deltas.shape[0], class_logits.shape[1], 4)
    # Drop the background column by gathering, not slicing: reshaping a sliced view decides whether a
    # view is possible, which depends on whether there is exactly one RoI, and the trace would keep that.
    objects = torch.arange(1, class_logits.shape[1], device=probs.device)
    boxes = ops.clip_boxes_to_image(boxes.index_select(1, objects), image_size).reshape(-1, 4)
    scores = probs.index_select(1, objects).reshape(-1)
    labels = torch.arange(objects.shape[0], device=probs.device).repeat(class_logits.shape[0])
    keep = ((scores > head.score_thresh) & (boxes[:, 2] - boxes[:, 0] >= 1e-2)
            & (boxes[:, 3] - boxes[:, 1] >= 1e-2))
    keep = torch.nonzero(keep).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = per_class_nms(boxes, scores, labels, head.nms_thresh, torch.sym_max(*image_size))
    keep = keep[: head.detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


# --------------------------------------------------------------------------- the three graphs


class FasterRCNNGraph(nn.Module):
    """image (3, H, W) -> boxes (D, 4) in its pixels, scores (D,), labels (D,) int64 0-based."""

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.transform, self.backbone, self.rpn, self.head = parts.transform, parts.backbone, parts.rpn, parts.head

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, size, to_input, _ = resize_image(self.transform, image)
        features = self.backbone(x)
        proposals = rpn_proposals(self.rpn, features, size)
        boxes, scores, labels = head_detections(self.head, features, proposals, size)
        return boxes * to_input, scores, labels


class FastRCNNGraph(nn.Module):
    """image (3, H, W) + proposals (R, 4) in its pixels -> boxes (D, 4) in its pixels, scores (D,), labels (D,).

    Every given proposal is scored: the caller keeps the best ``test_proposals`` as the eager model
    does (inside the graph a cut at a fixed count specialises it to counts on one side of the cut).
    """

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.transform, self.backbone, self.head = parts.transform, parts.backbone, parts.head

    def forward(self, image: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, size, to_input, to_network = resize_image(self.transform, image)
        features = self.backbone(x)
        boxes, scores, labels = head_detections(self.head, features, proposals.to(torch.float32) * to_network, size)
        return boxes * to_input, scores, labels


class RegionScorerGraph(nn.Module):
    """R-CNN's region scorer: warped crops (R, 3, S, S) + their regions (R, 4) -> scores (R, C), boxes (R, C, 4).

    The scores are the SVMs' (the fine-tuned softmax before SVMs are trained), the boxes the ridge
    regressors' (the input boxes before they are fitted), as :meth:`detect.rcnn.WarpHead.score` gives them before
    clipping, thresholding and NMS. The crops are :meth:`detect.rcnn.WarpHead.warp`'s (normalised, context-padded).
    """

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.regions = parts.regions
        # Decided once here: a graph cannot branch on a buffer's values.
        self.svm_trained = bool(self.regions.svm.trained)
        self.regressor_trained = bool(self.regions.box_regressor.trained)

    def forward(self, crops: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
        r = self.regions
        pool5, fc7 = r.forward_regions(crops)
        if self.svm_trained:
            scores = r.svm(r.svm_features(pool5, fc7))
        else:
            scores = F.softmax(r.classifier(fc7), dim=1)[:, 1:]
        if self.regressor_trained:
            boxes = r.box_regressor(pool5, regions)
        else:
            boxes = regions[:, None, :].expand(-1, scores.shape[1], 4)
        return scores, boxes


GRAPHS = {"faster_rcnn": FasterRCNNGraph, "fast_rcnn": FastRCNNGraph, "rcnn": RegionScorerGraph}
