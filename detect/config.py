"""Typed configuration: one dataclass per stage, loaded from YAML.

A config file is a nested mapping whose keys must match the dataclass fields
below exactly. Unknown keys and values of the wrong type are errors that name
the key path and the file. ``--set a.b=value`` overrides are parsed as YAML
scalars/lists and checked the same way. Numbers out of their range (a negative
``train.max_iter``, a zero learning rate, an IoU above 1) are errors too
(:mod:`detect.config_checks`).

YAML 1.1 reads ``1e-3`` (no dot) as a string; a float key accepts such a string
when it is an ordinary decimal number, so ``lr: 1e-3`` and ``--set train.lr=1e4``
work. Files are parsed with ``yaml.safe_load``: a ``!!python/...`` tag is refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from detect.config_checks import check_ranges, parse_number, yaml_problem
from detect.errors import ConfigError
from detect.utils.io import atomic_write_text

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@dataclass
class DataConfig:
    """Where the images and annotations are.

    ``classes`` is a list of names, ``"voc"`` for the 20 PASCAL VOC classes,
    or ``"auto"`` to discover them from the annotations of ``train_split``.
    """

    format: Literal["voc", "coco", "synthetic"] = "voc"
    root: str = ""
    annotations: str = ""          # COCO: instances JSON per split, "{split}" is substituted
    train_split: str = "trainval"
    val_split: str = "val"
    test_split: str = "test"
    classes: Union[list[str], str] = "voc"
    use_difficult: bool = False    # train on VOC "difficult" objects (py-faster-rcnn: no)
    synthetic_images: int = 200    # synthetic: images generated when root is empty/missing
    synthetic_seed: int = 0
    synthetic_style: Literal["cluttered", "plain"] = "cluttered"   # detect.data.synthetic.STYLES
    synthetic_max_objects: int = 6
    max_image_pixels: int = 89_478_485   # larger images are skipped unread (Pillow's default; detect.data.image)


@dataclass
class InputConfig:
    """Image resizing and normalisation (Faster R-CNN Sec. 3.3: shorter side 600, longer <= 1000)."""

    min_size: list[int] = field(default_factory=lambda: [600])   # several values: multi-scale training
    max_size: int = 1000
    test_min_size: int = 600
    flip: bool = True
    size_divisibility: int = 32
    auto: bool = False             # choose min_size/max_size/test_min_size from the data (detect.input_size)
    auto_min_object: float = 16.0  # auto: px that 95% of each class's objects reach at the network input
    auto_max_size: int = 1333      # auto: the largest side it may choose
    auto_scales: list[float] = field(default_factory=lambda: [1.0])   # auto: training sides, x the chosen one
    color_jitter: float = 0.0      # training: brightness/contrast/saturation x [1-s, 1+s] (transforms.TrainAugment)
    crop: float = 0.0              # training: probability of a random crop keeping >= 1 object (Faster R-CNN only)
    crop_min_scale: float = 0.3    # crop: the smallest fraction of each side it keeps


@dataclass
class BackboneConfig:
    name: str = "vgg16"
    weights: str = "imagenet"      # "none" | "imagenet" | path to a local state dict
    freeze_at: int = 2             # number of early stages whose parameters are frozen
    freeze_bn: bool = True
    allow_download: bool = False   # "imagenet" may download missing torchvision weights (off: a clear error instead)


@dataclass
class AnchorConfig:
    """Anchors (Faster R-CNN Sec. 3.1.1): 3 scales x 3 ratios at stride 16."""

    sizes: list[float] = field(default_factory=lambda: [128.0, 256.0, 512.0])
    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    offset: float = 0.5            # anchor centre inside its feature cell, in cells (0.5: cell centre; torchvision: 0)
    auto: bool = False             # choose sizes/ratios from the data, as many as listed (detect.input_size)


@dataclass
class RPNConfig:
    """Region Proposal Network (Faster R-CNN Sec. 3.1)."""

    channels: int = 512
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    allowed_border: float = 0.0    # anchors crossing the border by more than this are ignored; <0 keeps all
    nms_thresh: float = 0.7
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300
    min_size: float = 16.0         # proposals smaller than this (network-input pixels) are dropped (py-faster-rcnn: 16)
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0 / 9.0
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # delta weights (py-faster-rcnn: 1)
    allow_low_quality_matches: bool = True  # each gt's highest-IoU anchors are positive (Sec. 3.1.2)


@dataclass
class RoIHeadConfig:
    """Fast R-CNN RoI head (Fast R-CNN Sec. 2)."""

    pooler: Literal["roi_pool", "roi_align"] = "roi_pool"
    pooled_size: int = 0           # 0: the backbone's own size (VGG16 7, AlexNet/ZF 6, ResNet/GoogLeNet 14 before res5)
    aligned: bool = True           # RoIAlign half-pixel alignment (Detectron2's ROIAlignV2)
    add_gt_as_proposals: bool = True  # training RoIs include the ground truth (py-faster-rcnn)
    sampling_ratio: int = 2
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh_hi: float = 0.5
    bg_iou_thresh_lo: float = 0.1
    box_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    detections_per_img: int = 100
    smooth_l1_beta: float = 1.0
    dropout: float = 0.5


@dataclass
class ModelConfig:
    pipeline: Literal["faster_rcnn", "fast_rcnn", "rcnn"] = "faster_rcnn"
    num_classes: int = 0           # 0: take it from the data's class list
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    input: InputConfig = field(default_factory=InputConfig)


@dataclass
class TrainConfig:
    """Optimisation (SGD with momentum; paper defaults for VGG16 on VOC07)."""

    training_mode: Literal["joint", "alternating"] = "joint"
    images_per_batch: int = 1
    optimizer: Literal["sgd", "adamw"] = "sgd"   # the papers: SGD; AdamW trains small nets from scratch faster
    lr: float = 0.001
    momentum: float = 0.9          # SGD momentum (AdamW: beta1 = momentum, beta2 = 0.999)
    weight_decay: float = 0.0005
    schedule: Literal["step", "cosine"] = "step"
    schedule_unit: Literal["iter", "epoch"] = "iter"   # unit of max_iter, steps, checkpoint_period, eval_period
    max_iter: int = 70000
    steps: list[int] = field(default_factory=lambda: [50000])
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    bias_lr_factor: float = 2.0    # py-faster-rcnn: biases learn at twice the LR ...
    bias_weight_decay: bool = False  # ... and are not decayed
    clip_grad_norm: float = 0.0    # 0: no clipping
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3
    eval_period: int = 0           # 0: evaluate only at the end
    max_nonfinite: int = 5         # non-finite losses in a row that stop the run
    log_period: int = 20           # iterations per line of metrics.jsonl
    seed: int = 0
    workers: int = 2
    amp: Union[bool, Literal["auto"]] = False   # auto: bf16 where the CPU computes it natively (utils.runtime)
    deterministic: bool = False
    threads: int = 0               # CPU threads (0: physical cores, shared among torchrun's processes; tool: --threads)
    flush_denormal: bool = True    # flush denormal floats to zero on the CPU (some CPUs are ~15x slower on them)
    early_stop_patience: int = 0   # stop after this many evaluations without a better val mAP (0: never)


@dataclass
class PretrainConfig:
    """Supervised pre-training of the trunk as a classifier of ground-truth crops (detect/pretrain.py).

    Off by default: the paper recipes start from ImageNet weights instead.
    """

    steps: int = 0                 # 0: no pre-training
    crop_size: int = 64            # crops are warped to this square size (R-CNN Sec. 2.1 warps to 227)
    scales: list[int] = field(default_factory=list)   # each step resizes its batch to one of these (scale jitter)
    context: float = 0.15          # context kept around each box, as a fraction of its size per side
    batch_size: int = 64
    lr: float = 0.002              # AdamW, one-cycle schedule
    weight_decay: float = 0.0001
    background: float = 0.0        # fraction of crops that show no object (an extra class; needed for one class)
    seed: int = 0


@dataclass
class TestConfig:
    metric: Literal["voc07", "voc10", "coco", "all"] = "voc07"
    split: str = ""                # empty: data.test_split
    images_per_batch: int = 1


@dataclass
class ProposalConfig:
    """Selective search (Uijlings et al. 2013) and the proposal store."""

    backend: Literal["ours", "opencv"] = "ours"
    mode: Literal["single", "fast", "quality"] = "fast"
    store: str = ""                # directory of the proposal store
    max_side: int = 1000           # large images are processed at this size, boxes scaled back
    min_box_size: int = 10
    top_k: int = 2000
    seed: int = 0
    # Diversification (Sec. 3.1-3.2); empty lists: the mode's own strategies.
    colour_spaces: list[str] = field(default_factory=list)   # e.g. [hsv, lab, rgi, h, i, rgb]
    ks: list[float] = field(default_factory=list)            # Felzenszwalb-Huttenlocher k thresholds
    similarities: list[str] = field(default_factory=list)    # e.g. [CTSF, TSF, F, S]
    sigma: float = 0.8                                       # Gaussian smoothing before segmentation
    min_size: int = 0                                        # minimum initial region size (0: k)
    segmenter: Literal["opencv", "skimage"] = "opencv"


@dataclass
class FastRCNNConfig:
    """Fast R-CNN (Girshick, ICCV 2015): which proposals feed the RoI head, scales, truncated SVD.

    The RoI head itself is ``model.roi_heads``; the paper's hierarchical sampling is
    ``train.images_per_batch: 2`` with ``model.roi_heads.batch_size_per_image: 64``.
    """

    proposal_source: Literal["stored", "selective_search", "ground_truth"] = "stored"
    train_proposals: int = 2000    # best-ranked stored boxes used per training image (Sec. 4: ~2k)
    test_proposals: int = 2000     # ... per test image (Sec. 5.5: 2k selective-search boxes)
    compute_missing: bool = False  # an image missing from the store: compute its boxes instead of an error
    test_scales: list[int] = field(default_factory=list)   # several: multi-scale testing (Sec. 5.2); empty: single
    multiscale_area: float = 224.0 * 224.0   # each RoI is read at the scale where its area is closest to this (SPPnet)
    svd_rank_fc6: int = 0          # truncated SVD of fc6 (Sec. 3.1); 0 keeps the dense layer
    svd_rank_fc7: int = 0          # truncated SVD of fc7 (Sec. 3.1: 1024 / 256 for VGG16 fc6 / fc7)


@dataclass
class SVMConfig:
    """R-CNN's per-class linear SVMs with hard negative mining (Sec. 2.3; values of the authors' rcnn code)."""

    C: float = 0.001
    pos_weight: float = 2.0        # liblinear -w1
    bias_multiplier: float = 10.0  # liblinear -B (sklearn intercept_scaling)
    hard_thresh: float = -1.0001   # a negative scoring above this is hard: added to the cache
    easy_thresh: float = -1.2      # a cached negative scoring below this is easy: evicted before retraining
    neg_iou: float = 0.3           # negatives: proposals with IoU < 0.3 with every box of the class (Sec. 2.3)
    retrain_limit: int = 2000      # retrain after more than this many new hard negatives (rcnn_train.m) ...
    retrain_growth: float = 0.5    # ... and more than this fraction of the class's last training set (positives +
    #                                cache): keeps the total retraining cost linear in the images (0: the fixed limit)
    batch_images: int = 8          # images mined with the same SVMs between two retraining checks
    epochs: int = 1                # passes of hard negative mining over the images (Sec. 2.3: one suffices)
    tol: float = 1e-4              # liblinear's -e (rcnn_train.m keeps its default 0.1: on bccd 0.01 mAP lower)
    max_iter: int = 5000           # liblinear's iteration cap
    feature_norm: float = 20.0     # features are scaled so their mean L2 norm is this (rcnn_scale_features)


@dataclass
class BoxRegressionConfig:
    """R-CNN class-specific bounding-box regression on pool5 (Appendix C)."""

    enabled: bool = True
    alpha: float = 1000.0          # ridge lambda
    min_overlap: float = 0.6       # train on proposals with IoU > 0.6 with a ground-truth box
    max_rows_per_class: int = 256  # a seeded sample of at most this many rows per class, lambda scaled by
    #                                the fraction kept (0: every row, the paper's); what bounds streaming's memory


@dataclass
class RCNNConfig:
    """R-CNN (Girshick et al., CVPR 2014): warped regions, fine-tuning, SVMs, box regression."""

    proposal_source: Literal["stored", "selective_search", "ground_truth"] = "stored"
    crop_size: int = 227           # warped region size (AlexNet 227, Sec. 2.1)
    context_padding: int = 16      # pixels of context around the box in the warped frame (Appendix A)
    train_proposals: int = 2000
    test_proposals: int = 2000
    compute_missing: bool = False
    window_batch: int = 128        # warped regions per forward pass (features and test)
    finetune_batch: int = 128      # windows per fine-tuning mini-batch (Sec. 2.3) ...
    finetune_fg_fraction: float = 0.25   # ... 32 positives and 96 backgrounds
    finetune_fg_iou: float = 0.5   # fine-tuning positives: IoU >= 0.5 with a ground-truth box
    feature_layer: Literal["fc7", "pool5"] = "fc7"     # SVM features (Table 2: fine-tuned fc7 is best)
    feature_cache: str = ""        # directory of the stage-2 feature cache (empty: <run>/features)
    feature_cache_mode: Literal["full", "streaming"] = "full"   # full: stage 2 caches every row on disk;
    #                                streaming: stages 2-3 image by image, nothing on disk (positives, hard
    #                                negatives and stage 4's sampled rows held in memory)
    score_thresh: float = -1.0     # test: detections with an SVM score below this are dropped
    finetune_score_thresh: float = 0.05   # test before stage 3: minimum fine-tuned softmax score
    nms_thresh: float = 0.3        # test: per-class greedy NMS (Sec. 2.2)
    detections_per_img: int = 100
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    fast_rcnn: FastRCNNConfig = field(default_factory=FastRCNNConfig)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)
    source: str = ""               # file this config was loaded from (informational)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _union_name(tp: Any) -> str:
    """A union's options as a reader writes them: ``true or false or 'auto'``, ``list[str] or str``."""
    names = []
    for option in typing.get_args(tp):
        if option is bool:
            names.append("true or false")
        elif typing.get_origin(option) is Literal:
            names.extend(repr(v) for v in typing.get_args(option))
        else:
            names.append(_type_name(option))
    return " or ".join(names)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: key '{key}' has the wrong type: expected {_union_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = parse_number(value, default=value)     # YAML 1.1 leaves 1e-3 a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {_type_name(tp)}")


def _build(cls: type, mapping: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{path}' (allowed: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], path, where)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({yaml_problem(exc)})") from None
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def config_from_dict(mapping: dict, where: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a nested mapping plus ``key=value`` overrides."""
    merged = dict(mapping)
    for text in overrides or []:
        merged = _merge(merged, _parse_override(text))
    if overrides:
        where = f"{where} with --set {' '.join(overrides)}"
    cfg = _build(Config, merged, "", where)
    check_ranges(cfg, where)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    mapping: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        mapping = _read_yaml(path)
        where = str(path)
        mapping.setdefault("source", str(path))
    return config_from_dict(mapping, where, overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
