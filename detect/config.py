"""Typed configuration: one dataclass per stage, loaded from YAML.

A config file is a nested mapping whose keys must match the dataclass fields
below exactly. Unknown keys and values of the wrong type are errors that name
the key path and the file. ``--set a.b=value`` overrides are parsed as YAML
scalars/lists and checked the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from detect.errors import ConfigError

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


@dataclass
class InputConfig:
    """Image resizing and normalisation (Faster R-CNN Sec. 3.3: shorter side 600, longer <= 1000)."""

    min_size: list[int] = field(default_factory=lambda: [600])   # several values: multi-scale training
    max_size: int = 1000
    test_min_size: int = 600
    flip: bool = True
    size_divisibility: int = 32


@dataclass
class BackboneConfig:
    name: str = "vgg16"
    weights: str = "imagenet"      # "none" | "imagenet" | path to a local state dict
    freeze_at: int = 2             # number of early stages whose parameters are frozen
    freeze_bn: bool = True


@dataclass
class AnchorConfig:
    """Anchors (Faster R-CNN Sec. 3.1.1): 3 scales x 3 ratios at stride 16."""

    sizes: list[float] = field(default_factory=lambda: [128.0, 256.0, 512.0])
    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


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
    min_size: float = 16.0
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0 / 9.0


@dataclass
class RoIHeadConfig:
    """Fast R-CNN RoI head (Fast R-CNN Sec. 2)."""

    pooler: Literal["roi_pool", "roi_align"] = "roi_pool"
    pooled_size: int = 7
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
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    schedule: Literal["step", "cosine"] = "step"
    max_iter: int = 70000
    steps: list[int] = field(default_factory=lambda: [50000])
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0    # 0: no clipping
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3
    eval_period: int = 0           # 0: evaluate only at the end
    max_nonfinite: int = 5
    seed: int = 0
    workers: int = 2
    amp: bool = False
    deterministic: bool = False


@dataclass
class TestConfig:
    metric: Literal["voc07", "voc10", "coco", "all"] = "voc07"
    split: str = ""                # empty: data.test_split


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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    source: str = ""               # file this config was loaded from (informational)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        raise ConfigError(f"{where}: key '{key}' has the wrong type: expected {_type_name(tp)}, got {value!r}")
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
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
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
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
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
    return _build(Config, merged, "", where)


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
    from detect.utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
