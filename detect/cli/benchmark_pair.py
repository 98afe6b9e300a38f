"""What the torchvision benchmarks share: the settings, the twin pair, the images, peak memory."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"

# Shared settings: the config file and the overrides that make both detectors comparable.
# torchvision keeps every anchor (no border rule), drops proposals under 1e-3 px, centres
# anchors on x * stride, and samples background RoIs from IoU [0, 0.5): ours is set alike.
_COMMON = ["model.rpn.allowed_border=-1", "model.rpn.min_size=0.001", "model.anchors.offset=0.0",
           "model.roi_heads.bg_iou_thresh_lo=0.0", "model.backbone.weights=none"]
SETTINGS = {
    "tiny": dict(config=REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml", overrides=[], size=256),
    # ResNet-50 C4 (conv1-conv4 trunk, conv5 per RoI on 14x14 RoIAlign), at CPU-friendly sizes and counts.
    "resnet50_c4": dict(config=REPO / "configs" / "faster_rcnn" / "resnet50_voc0712.yaml", size=400, overrides=[
        "model.num_classes=5", "model.roi_heads.pooler=roi_align", "model.roi_heads.aligned=false",
        "model.rpn.pre_nms_top_n_train=2000", "model.rpn.post_nms_top_n_train=256",
        "model.rpn.pre_nms_top_n_test=1000", "model.rpn.post_nms_top_n_test=50",
        "model.roi_heads.batch_size_per_image=32"]),
}


def build_pair(setting: str, num_classes: int, extra: list[str] = (), size: int = 0, seed: int = 0):
    """Our detector, torchvision's twin with copied weights, and the config."""
    import torch

    from detect import build_model, load_config
    from detect.cli.torchvision_twin import torchvision_twin

    spec = SETTINGS[setting]
    side = size or spec["size"]
    overrides = [*_COMMON, *spec["overrides"], f"model.input.min_size=[{side}]",
                 f"model.input.test_min_size={side}", f"model.input.max_size={int(side * 5 / 3)}",
                 f"model.num_classes={num_classes}", *extra]
    cfg = load_config(spec["config"], overrides)
    torch.manual_seed(seed)
    ours = build_model(cfg, class_names=[f"class_{i}" for i in range(num_classes)])
    return ours, torchvision_twin(ours, cfg), cfg


def load_images(root: Path, count: int):
    from detect.data.loader import image_to_tensor
    from detect.data.image import read_image
    from detect.data.synthetic import SYNTHETIC_CLASSES
    from detect.data.voc import VOCDataset

    import torch

    records = VOCDataset(root, "trainval", classes=list(SYNTHETIC_CLASSES)).records
    records = [r for r in records if len(r.boxes)][:count]
    images = [image_to_tensor(read_image(r.path)) for r in records]
    targets = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels)} for r in records]
    return images, targets


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # Linux: resets VmHWM (peak RSS)
    except OSError:
        pass


def peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
