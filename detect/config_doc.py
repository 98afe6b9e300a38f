"""Every config key with its type, value and one-line meaning: ``detect-train --print-config``.

The meanings live here, in one table keyed by the dotted path, rather than as field
metadata in :mod:`detect.config`, so that the dataclasses stay readable as the list of
stages they are. ``tests/test_config_doc.py`` fails when a field has no line here (or a
line names a field that no longer exists). The README's key table is
``format_markdown(load_config("configs/faster_rcnn/tiny_custom.yaml"))``, i.e.
``detect-train --config configs/faster_rcnn/tiny_custom.yaml --print-config markdown``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from detect.config import Config

HELP: dict[str, str] = {
    # data
    "data.format": "dataset format: voc (Annotations/ImageSets/JPEGImages), coco (instances JSON) or the built-in synthetic shapes",
    "data.root": "VOC: the folder with Annotations/, ImageSets/Main/, JPEGImages/; COCO: the image folder file_name is relative to ('{split}' substituted); synthetic: where it is generated (empty: a cache folder)",
    "data.annotations": "COCO: path of the instances JSON, not joined with data.root ('{split}' substituted)",
    "data.train_split": "split trained on (VOC: ImageSets/Main/<split>.txt; COCO: the '{split}' value); also the split data.classes=auto reads",
    "data.val_split": "split evaluated every train.eval_period (unused when that is 0)",
    "data.test_split": "split evaluated after training and by detect-test (unless test.split)",
    "data.classes": "class names in label order, 'voc' (the 20 PASCAL classes) or 'auto' (every class the training split's annotations name, sorted)",
    "data.use_difficult": "train on objects marked difficult (VOC) / iscrowd (COCO); evaluation always ignores them",
    "data.synthetic_images": "synthetic: number of images generated (80% trainval, 20% test)",
    "data.synthetic_seed": "synthetic: seed of the generator",
    "data.synthetic_style": "synthetic: 'cluttered' (textures, distractors) or 'plain' (flat or noisy fills)",
    "data.synthetic_max_objects": "synthetic: most objects drawn per image",
    "data.max_image_pixels": "images declaring more pixels than this are skipped unread (decompression-bomb guard)",
    # model
    "model.pipeline": "detector: faster_rcnn (RPN proposals), fast_rcnn (stored selective-search boxes) or rcnn (warped regions + SVMs)",
    "model.num_classes": "number of object classes, background excluded; 0: the length of the data's class list",
    "model.backbone.name": "trunk: tiny, tiny8 (CPU, from scratch), alexnet, zf, vgg16, googlenet, resnet18, resnet50, resnet101",
    "model.backbone.weights": "initial trunk weights: none (random), imagenet (torchvision's) or the path of a local state dict",
    "model.backbone.freeze_at": "number of early trunk stages whose weights are not trained",
    "model.backbone.freeze_bn": "keep BatchNorm statistics and affine parameters fixed (pre-trained trunks); false when training from scratch",
    "model.backbone.allow_download": "let weights=imagenet download missing torchvision weights (off: a clear error instead)",
    "model.anchors.sizes": "anchor sizes, sqrt(area) in network-input pixels (paper: 128, 256, 512)",
    "model.anchors.ratios": "anchor aspect ratios height/width (paper: 0.5, 1, 2)",
    "model.anchors.offset": "anchor centre inside its feature cell, in cells (0.5: the cell centre; torchvision: 0)",
    "model.anchors.auto": "choose sizes and ratios by k-means of the training boxes at the input size (as many as listed); Faster R-CNN only",
    "model.rpn.channels": "width of the RPN's 3x3 convolution (paper: 512 for VGG16, 256 for ZF)",
    "model.rpn.batch_size_per_image": "anchors sampled per image for the RPN loss (paper: 256)",
    "model.rpn.positive_fraction": "largest fraction of positive anchors in that sample (paper: 0.5)",
    "model.rpn.fg_iou_thresh": "an anchor with IoU >= this with a box is positive (paper: 0.7)",
    "model.rpn.bg_iou_thresh": "an anchor with IoU < this with every box is negative (paper: 0.3)",
    "model.rpn.allowed_border": "training ignores anchors crossing the image border by more than this many px; negative keeps all",
    "model.rpn.nms_thresh": "IoU of the NMS over proposals (paper: 0.7)",
    "model.rpn.pre_nms_top_n_train": "training: best-scored anchors kept before NMS",
    "model.rpn.post_nms_top_n_train": "training: proposals kept after NMS (handed to the RoI head)",
    "model.rpn.pre_nms_top_n_test": "testing: best-scored anchors kept before NMS",
    "model.rpn.post_nms_top_n_test": "testing: proposals kept after NMS (paper: 300)",
    "model.rpn.min_size": "proposals smaller than this (network-input px) are dropped",
    "model.rpn.box_loss_weight": "weight of the RPN box loss against its classification loss (paper's lambda)",
    "model.rpn.smooth_l1_beta": "smooth-L1 transition point of the RPN box loss (py-faster-rcnn: 1/9)",
    "model.rpn.box_weights": "scales of the RPN's (dx, dy, dw, dh) regression targets",
    "model.rpn.allow_low_quality_matches": "each box's highest-IoU anchors are positive even below fg_iou_thresh",
    "model.roi_heads.pooler": "RoI feature extraction: roi_pool (max pooling, Fast R-CNN) or roi_align",
    "model.roi_heads.pooled_size": "RoI output size; 0: the backbone's own (VGG16 7, AlexNet/ZF 6, ResNet 14)",
    "model.roi_heads.aligned": "roi_align: half-pixel alignment (Detectron2's ROIAlignV2)",
    "model.roi_heads.add_gt_as_proposals": "training RoIs include the ground-truth boxes",
    "model.roi_heads.sampling_ratio": "roi_align: sampling points per bin side",
    "model.roi_heads.batch_size_per_image": "RoIs sampled per training image (paper: 128)",
    "model.roi_heads.positive_fraction": "largest fraction of foreground RoIs in that sample (paper: 0.25)",
    "model.roi_heads.fg_iou_thresh": "a RoI with IoU >= this with a box is foreground (paper: 0.5)",
    "model.roi_heads.bg_iou_thresh_hi": "background RoIs have IoU below this ...",
    "model.roi_heads.bg_iou_thresh_lo": "... and at least this (paper: [0.1, 0.5))",
    "model.roi_heads.box_weights": "scales of the head's (dx, dy, dw, dh) regression targets (py-faster-rcnn: 10, 10, 5, 5)",
    "model.roi_heads.score_thresh": "testing: detections scoring below this are dropped",
    "model.roi_heads.nms_thresh": "testing: IoU of the per-class NMS (paper: 0.3)",
    "model.roi_heads.detections_per_img": "testing: most detections kept per image",
    "model.roi_heads.smooth_l1_beta": "smooth-L1 transition point of the head's box loss (Fast R-CNN: 1)",
    "model.roi_heads.dropout": "dropout of the fc head layers (VGG16/AlexNet: 0.5; tiny heads have none)",
    "model.input.min_size": "training: shorter image side at the network input; several values: one drawn per image (multi-scale)",
    "model.input.max_size": "longer image side at most this (the shorter one is then smaller)",
    "model.input.test_min_size": "testing: shorter image side at the network input",
    "model.input.flip": "training: mirror half of the images horizontally",
    "model.input.size_divisibility": "the padded batch's height and width are multiples of this",
    "model.input.auto": "choose min_size, max_size and test_min_size from the training boxes (detect-suggest-anchors's rule)",
    "model.input.auto_min_object": "auto: the smallest size (sqrt(w*h), px at the network input) that 95% of each class's objects must reach",
    "model.input.auto_max_size": "auto: the largest image side the rule may choose",
    "model.input.auto_scales": "auto: multi-scale training at these multiples of the chosen shorter side (testing stays at 1)",
    "model.input.color_jitter": "training: scale brightness, contrast and saturation by factors in [1-s, 1+s] (0: off)",
    "model.input.crop": "training: probability of a random crop that keeps at least one object (Faster R-CNN only; 0: off)",
    "model.input.crop_min_scale": "crop: the smallest fraction of each image side a crop keeps",
    # train
    "train.training_mode": "joint (approximate joint training) or alternating (the 4-step scheme); Faster R-CNN",
    "train.images_per_batch": "images per step, over all processes",
    "train.optimizer": "sgd (the papers) or adamw (trains small nets from scratch faster)",
    "train.lr": "base learning rate",
    "train.momentum": "SGD momentum (AdamW: beta1)",
    "train.weight_decay": "L2 weight decay",
    "train.schedule": "learning-rate schedule: step (x gamma at each of steps) or cosine (to 0 at max_iter)",
    "train.schedule_unit": "unit of max_iter, steps, checkpoint_period and eval_period: iter or epoch",
    "train.max_iter": "length of training (in schedule_unit)",
    "train.steps": "step schedule: where the learning rate is multiplied by gamma",
    "train.gamma": "step schedule: learning-rate factor at each step",
    "train.warmup_iters": "iterations of linear warm-up from warmup_factor x lr",
    "train.warmup_factor": "learning-rate factor at the start of the warm-up",
    "train.bias_lr_factor": "biases learn at this times the learning rate (py-faster-rcnn: 2)",
    "train.bias_weight_decay": "apply weight decay to biases too",
    "train.clip_grad_norm": "clip the gradient norm at this; 0: no clipping",
    "train.checkpoint_period": "write a checkpoint every this many (schedule_unit); 0: only the final model",
    "train.keep_checkpoints": "newest checkpoints kept; older ones are deleted",
    "train.eval_period": "evaluate on data.val_split every this many (schedule_unit); 0: only at the end",
    "train.max_nonfinite": "this many skipped (NaN/inf or exploding) steps in a row stop the run",
    "train.log_period": "iterations per line of metrics.jsonl",
    "train.seed": "seed of weights, batch order and sampling",
    "train.workers": "DataLoader worker processes (0: decode in the training process)",
    "train.amp": "mixed precision: CUDA float16, CPU bfloat16; auto: only where it is native (CPU float32 otherwise)",
    "train.deterministic": "deterministic kernels (slower; bitwise-repeatable runs)",
    "train.threads": "CPU threads of torch and OpenCV (0: the physical cores, shared among torchrun's local processes; tools: --threads)",
    "train.flush_denormal": "flush denormal floats to zero on the CPU (some CPUs run ~15x slower on them; tools: --no-flush-denormal)",
    "train.early_stop_patience": "stop after this many validation evaluations without a better mAP (0: never); model_best.pt keeps the best",
    # pretrain
    "pretrain.steps": "steps of trunk pre-training as a classifier of ground-truth crops; 0: none",
    "pretrain.crop_size": "crops are warped to this square size",
    "pretrain.scales": "each step resizes its batch to one of these sizes (scale jitter); empty: crop_size only",
    "pretrain.context": "context kept around each box, as a fraction of its size per side",
    "pretrain.batch_size": "crops per step",
    "pretrain.lr": "peak learning rate (AdamW, one-cycle schedule)",
    "pretrain.background": "fraction of the crops that show no object (IoU < 0.3 with every box), an extra class; "
                           "a one-class dataset needs it",
    "pretrain.weight_decay": "AdamW weight decay",
    "pretrain.seed": "seed of the crop order and the classifier's weights",
    # test
    "test.metric": "voc07 (11-point AP), voc10 (area AP), coco (AP@[.5:.95] via pycocotools) or all",
    "test.split": "split evaluated after training; empty: data.test_split",
    "test.images_per_batch": "images per forward pass when testing",
    # proposals
    "proposals.backend": "selective search implementation: ours or opencv (opencv-contrib)",
    "proposals.mode": "selective search strategies: single, fast (R-CNN, Fast R-CNN) or quality",
    "proposals.store": "folder of the proposal store (Fast R-CNN, R-CNN)",
    "proposals.max_side": "images are searched at most this large; boxes are scaled back",
    "proposals.min_box_size": "proposals with a side below this (px) are dropped",
    "proposals.top_k": "best-ranked proposals stored per image; 0: all",
    "proposals.seed": "seed of the ranking's random factor (selective search Sec. 3.3)",
    "proposals.colour_spaces": "override the mode's colour spaces, e.g. [hsv, lab, rgi, h, i, rgb]",
    "proposals.ks": "override the mode's Felzenszwalb-Huttenlocher k thresholds",
    "proposals.similarities": "override the mode's similarity combinations, e.g. [CTSF, TSF, F, S]",
    "proposals.sigma": "Gaussian smoothing before segmentation",
    "proposals.min_size": "smallest initial region (px); 0: k",
    "proposals.segmenter": "graph segmentation implementation: opencv or skimage",
    # fast_rcnn
    "fast_rcnn.proposal_source": "stored (the proposal store), selective_search (computed per image) or ground_truth",
    "fast_rcnn.train_proposals": "best-ranked proposals used per training image",
    "fast_rcnn.test_proposals": "best-ranked proposals used per test image",
    "fast_rcnn.compute_missing": "an image missing from the store has its proposals computed instead of an error",
    "fast_rcnn.test_scales": "several shorter sides: multi-scale testing; empty: model.input.test_min_size only",
    "fast_rcnn.multiscale_area": "multi-scale: each RoI is read at the scale where its area is closest to this (px^2)",
    "fast_rcnn.svd_rank_fc6": "truncated SVD rank of fc6 at test time; 0: keep the dense layer",
    "fast_rcnn.svd_rank_fc7": "truncated SVD rank of fc7 at test time; 0: keep the dense layer",
    # rcnn
    "rcnn.proposal_source": "stored (the proposal store), selective_search (computed per image) or ground_truth",
    "rcnn.crop_size": "each region is warped to this square size (AlexNet: 227)",
    "rcnn.context_padding": "px of context around the box in the warped region (paper: 16)",
    "rcnn.train_proposals": "best-ranked proposals used per training image",
    "rcnn.test_proposals": "best-ranked proposals used per test image",
    "rcnn.compute_missing": "an image missing from the store has its proposals computed instead of an error",
    "rcnn.window_batch": "warped regions per forward pass (features and testing)",
    "rcnn.finetune_batch": "regions per fine-tuning step (paper: 128)",
    "rcnn.finetune_fg_fraction": "fraction of foreground regions in a fine-tuning step (paper: 0.25)",
    "rcnn.finetune_fg_iou": "fine-tuning: a region with IoU >= this with a box is foreground",
    "rcnn.feature_layer": "SVM features: fc7 or pool5",
    "rcnn.feature_cache": "folder of the stage-2 feature cache; empty: <run>/features",
    "rcnn.score_thresh": "testing: detections with an SVM score below this are dropped",
    "rcnn.feature_cache_mode": "stages 2-3: 'full' writes every proposal's features to the cache (the paper's way), 'streaming' mines image by image and keeps only positives, hard negatives and stage 4's rows (bounded disk)",
    "rcnn.finetune_score_thresh": "testing before the SVMs are trained (stage 3): minimum fine-tuned softmax score",
    "rcnn.nms_thresh": "testing: IoU of the per-class NMS",
    "rcnn.detections_per_img": "testing: most detections kept per image",
    "rcnn.svm.C": "SVM regularisation C (liblinear)",
    "rcnn.svm.pos_weight": "weight of the positive class (liblinear -w1)",
    "rcnn.svm.bias_multiplier": "bias feature value (liblinear -B)",
    "rcnn.svm.hard_thresh": "a negative scoring above this is hard: added to the cache",
    "rcnn.svm.easy_thresh": "a cached negative scoring below this is easy: evicted before retraining",
    "rcnn.svm.neg_iou": "negatives: proposals with IoU below this with every box of the class",
    "rcnn.svm.retrain_limit": "retrain after more than this many new hard negatives ...",
    "rcnn.svm.retrain_growth": "... and more than this fraction of the class's last training set (0: the limit alone)",
    "rcnn.svm.batch_images": "images mined with the same SVMs between two retraining checks",
    "rcnn.svm.epochs": "passes of hard-negative mining over the images",
    "rcnn.svm.tol": "liblinear stopping tolerance (-e)",
    "rcnn.svm.max_iter": "liblinear iteration cap",
    "rcnn.svm.feature_norm": "features are scaled so that their mean L2 norm is this",
    "rcnn.bbox_reg.enabled": "train and apply the class-specific box regression",
    "rcnn.bbox_reg.alpha": "ridge regularisation lambda",
    "rcnn.bbox_reg.min_overlap": "regression trains on proposals with IoU above this with a box",
    "rcnn.bbox_reg.max_rows_per_class": "regression trains on a seeded sample of at most this many rows per class, "
                                        "lambda scaled by the fraction kept (0: all rows)",
    # top level
    "source": "the file this config was loaded from (set by the loader; informational)",
}


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted path, type as written in YAML terms, its value in the config, meaning."""

    key: str
    type: str
    value: str
    meaning: str


def type_name(tp: Any) -> str:
    """A field's annotation as a reader of a YAML file thinks of it: ``list[int]``, ``voc|coco``, ``list[str] | str``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(t) for t in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A value as it would be written in a config file (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def field_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of a config dataclass."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += field_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def missing_help() -> list[str]:
    """Fields without a meaning in :data:`HELP`, and :data:`HELP` entries that name no field."""
    keys = field_keys()
    return [f"no meaning for '{k}'" for k in keys if not HELP.get(k, "").strip()] + \
        [f"meaning for unknown key '{k}'" for k in HELP if k not in set(keys)]


def config_keys(cfg: Config) -> list[KeyDoc]:
    """Every leaf key of ``cfg`` in file order, with its type, value in ``cfg`` and meaning."""
    docs = []

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            else:
                docs.append(KeyDoc(key, type_name(hints[f.name]), format_value(value), HELP.get(key, "")))

    walk(cfg, "")
    return docs


def format_text(cfg: Config) -> str:
    """Aligned columns: key, type, value, meaning; one line per key."""
    docs = config_keys(cfg)
    widths = [max(len(getattr(d, col)) for d in docs) for col in ("key", "type")]
    value_width = min(max(len(d.value) for d in docs), 24)
    head = f"{'key':<{widths[0]}}  {'type':<{widths[1]}}  {'value':<{value_width}}  meaning"
    lines = [head, "-" * len(head)]
    for d in docs:
        lines.append(f"{d.key:<{widths[0]}}  {d.type:<{widths[1]}}  {d.value:<{value_width}}  {d.meaning}")
    return "\n".join(lines)


def format_markdown(cfg: Config) -> str:
    """A GitHub-flavoured markdown table: | key | type | default | meaning |."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for d in config_keys(cfg):
        lines.append(f"| `{d.key}` | {cell(d.type)} | `{cell(d.value)}` | {cell(d.meaning)} |")
    return "\n".join(lines)


def print_config(cfg: Config, fmt: str = "text") -> None:
    """Print every key of ``cfg`` (``fmt``: "text" or "markdown")."""
    print(format_markdown(cfg) if fmt == "markdown" else format_text(cfg))
