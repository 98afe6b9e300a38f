"""Value checks of the typed config: numbers in their ranges, numbers as people write them, one-line YAML errors.

:mod:`detect.config` checks the *types*; this module checks that a number makes sense
for its key, so that ``train.max_iter: -5`` or ``train.lr: 0`` is a one-line error
naming the key instead of a run that trains nothing and writes an untrained model.
NaN is refused everywhere; an infinite value only where it means something
(``model.rpn.allowed_border: .inf`` keeps every anchor, ``rcnn.score_thresh: -.inf``
keeps every detection, ``train.clip_grad_norm: .inf`` never clips).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from detect.errors import ConfigError

# A decimal number as people write one: 1e-3, 1E4, 1.5e+2, .5, 10, -2., and inf / -inf / .inf.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?\.?inf(?:inity)?", re.IGNORECASE)


def parse_number(text: str, default=None):
    """``float(text)`` when ``text`` is an ordinary decimal number (YAML 1.1 leaves ``1e-3`` a string), else ``default``."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return default
    return float(text.lower().replace(".inf", "inf"))


def yaml_problem(exc) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["invalid YAML"])[0]
    if "python/" in problem:
        problem += " (Python tags are never executed: only plain YAML is accepted)"
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


@dataclass(frozen=True)
class Range:
    """``lo <(=) value <(=) hi``; None: unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, hi_open=True)

# Keys without an entry take any finite value. A list key's range applies to each item.
RANGES: dict[str, Range] = {
    "data.synthetic_images": POSITIVE, "data.synthetic_seed": NON_NEGATIVE,
    "data.synthetic_max_objects": NON_NEGATIVE, "data.max_image_pixels": POSITIVE,
    "model.num_classes": NON_NEGATIVE, "model.backbone.freeze_at": NON_NEGATIVE,
    "model.anchors.sizes": POSITIVE, "model.anchors.ratios": POSITIVE,
    "model.input.min_size": POSITIVE, "model.input.max_size": POSITIVE, "model.input.test_min_size": POSITIVE,
    "model.input.size_divisibility": NON_NEGATIVE,
    "model.input.auto_min_object": POSITIVE, "model.input.auto_max_size": POSITIVE,
    "model.input.auto_scales": POSITIVE, "model.input.color_jitter": BELOW_ONE, "model.input.crop": FRACTION,
    "model.input.crop_min_scale": Range(0, 1, lo_open=True),
    "model.rpn.channels": POSITIVE, "model.rpn.batch_size_per_image": POSITIVE,
    "model.rpn.positive_fraction": FRACTION, "model.rpn.fg_iou_thresh": FRACTION,
    "model.rpn.bg_iou_thresh": FRACTION, "model.rpn.nms_thresh": FRACTION,
    "model.rpn.pre_nms_top_n_train": POSITIVE, "model.rpn.post_nms_top_n_train": POSITIVE,
    "model.rpn.pre_nms_top_n_test": POSITIVE, "model.rpn.post_nms_top_n_test": POSITIVE,
    "model.rpn.min_size": NON_NEGATIVE, "model.rpn.box_loss_weight": NON_NEGATIVE,
    "model.rpn.smooth_l1_beta": NON_NEGATIVE, "model.rpn.box_weights": POSITIVE,
    "model.roi_heads.pooled_size": NON_NEGATIVE, "model.roi_heads.batch_size_per_image": POSITIVE,
    "model.roi_heads.positive_fraction": FRACTION, "model.roi_heads.fg_iou_thresh": FRACTION,
    "model.roi_heads.bg_iou_thresh_hi": FRACTION, "model.roi_heads.bg_iou_thresh_lo": FRACTION,
    "model.roi_heads.box_weights": POSITIVE, "model.roi_heads.score_thresh": FRACTION,
    "model.roi_heads.nms_thresh": FRACTION, "model.roi_heads.detections_per_img": POSITIVE,
    "model.roi_heads.smooth_l1_beta": NON_NEGATIVE, "model.roi_heads.dropout": BELOW_ONE,
    "train.images_per_batch": POSITIVE, "train.lr": POSITIVE, "train.momentum": BELOW_ONE,
    "train.weight_decay": NON_NEGATIVE, "train.max_iter": POSITIVE, "train.steps": NON_NEGATIVE,
    "train.gamma": POSITIVE, "train.warmup_iters": NON_NEGATIVE, "train.warmup_factor": FRACTION,
    "train.bias_lr_factor": NON_NEGATIVE, "train.clip_grad_norm": NON_NEGATIVE,
    "train.checkpoint_period": NON_NEGATIVE, "train.keep_checkpoints": NON_NEGATIVE,
    "train.eval_period": NON_NEGATIVE, "train.max_nonfinite": NON_NEGATIVE, "train.log_period": POSITIVE,
    "train.seed": NON_NEGATIVE, "train.workers": NON_NEGATIVE, "train.threads": NON_NEGATIVE,
    "train.early_stop_patience": NON_NEGATIVE,
    "pretrain.steps": NON_NEGATIVE, "pretrain.crop_size": POSITIVE, "pretrain.scales": POSITIVE,
    "pretrain.context": NON_NEGATIVE, "pretrain.batch_size": POSITIVE, "pretrain.lr": POSITIVE,
    "pretrain.weight_decay": NON_NEGATIVE, "pretrain.seed": NON_NEGATIVE, "pretrain.background": BELOW_ONE,
    "test.images_per_batch": POSITIVE,
    "proposals.max_side": POSITIVE, "proposals.min_box_size": NON_NEGATIVE, "proposals.top_k": NON_NEGATIVE,
    "proposals.seed": NON_NEGATIVE, "proposals.ks": POSITIVE, "proposals.sigma": NON_NEGATIVE,
    "proposals.min_size": NON_NEGATIVE,
    "fast_rcnn.train_proposals": NON_NEGATIVE, "fast_rcnn.test_proposals": NON_NEGATIVE,
    "fast_rcnn.test_scales": POSITIVE, "fast_rcnn.multiscale_area": POSITIVE,
    "fast_rcnn.svd_rank_fc6": NON_NEGATIVE, "fast_rcnn.svd_rank_fc7": NON_NEGATIVE,
    "rcnn.crop_size": POSITIVE, "rcnn.context_padding": NON_NEGATIVE, "rcnn.train_proposals": NON_NEGATIVE,
    "rcnn.test_proposals": NON_NEGATIVE, "rcnn.window_batch": POSITIVE, "rcnn.finetune_batch": POSITIVE,
    "rcnn.finetune_fg_fraction": FRACTION, "rcnn.finetune_fg_iou": FRACTION, "rcnn.nms_thresh": FRACTION,
    "rcnn.detections_per_img": POSITIVE, "rcnn.finetune_score_thresh": FRACTION,
    "rcnn.svm.C": POSITIVE, "rcnn.svm.pos_weight": POSITIVE, "rcnn.svm.bias_multiplier": NON_NEGATIVE,
    "rcnn.svm.neg_iou": FRACTION, "rcnn.svm.retrain_limit": NON_NEGATIVE, "rcnn.svm.epochs": POSITIVE,
    "rcnn.svm.feature_norm": NON_NEGATIVE, "rcnn.svm.retrain_growth": NON_NEGATIVE, "rcnn.svm.batch_images": POSITIVE,
    "rcnn.svm.tol": POSITIVE, "rcnn.svm.max_iter": POSITIVE,
    "rcnn.bbox_reg.alpha": NON_NEGATIVE, "rcnn.bbox_reg.min_overlap": FRACTION,
    "rcnn.bbox_reg.max_rows_per_class": NON_NEGATIVE,
}

# Where an infinite value has a meaning (see the module docstring); everywhere else it is an error.
INFINITE_OK = {"model.rpn.allowed_border", "train.clip_grad_norm", "rcnn.score_thresh",
               "rcnn.svm.hard_thresh", "rcnn.svm.easy_thresh"}


def _numbers(node, prefix: str):
    """Every (key path, number) under a config dataclass; list items share their list's key."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{key}.")
        elif isinstance(value, list):
            yield from ((key, v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def check_ranges(cfg, where: str) -> None:
    """Raise a :class:`ConfigError` naming the first key whose number is out of its range, NaN or wrongly infinite."""
    for key, value in _numbers(cfg, ""):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{where}: key '{key}' is NaN; give a number")
        if isinstance(value, float) and math.isinf(value) and key not in INFINITE_OK:
            raise ConfigError(f"{where}: key '{key}' must be finite, got {value}")
        allowed = RANGES.get(key)
        if allowed is not None and not allowed.holds(value):
            raise ConfigError(f"{where}: key '{key}' must be {allowed.describe()}, got {value!r}")
