"""Classification networks cut into a detection trunk and a per-RoI head.

The trunk is the shared convolutional part (Faster R-CNN Sec. 3.2: the layers
RPN and Fast R-CNN share); the RoI head maps each pooled RoI to a vector
(Fast R-CNN Sec. 2.1: the fully connected layers after RoI pooling).

* AlexNet, VGG16: conv layers up to conv5 (last max pool dropped, stride 16);
  fc6 and fc7 form the RoI head on 6x6 / 7x7 pooled features.
* ZF Net (Zeiler & Fergus 2013; py-faster-rcnn's 5 conv + 2 fc variant) is
  defined here because torchvision has none; it has no ImageNet weights.
* GoogLeNet: up to inception4e (stride 16); maxpool4 + inception5 + average pool
  form the RoI head on 14x14 pooled features.
* ResNet-18/50/101: the "C4" setup of the ResNet paper (Appendix A): conv1 to
  conv4_x are the trunk; conv5_x + average pool run per RoI on 14x14 pooled features.
* tiny: five small conv layers at stride 16 and a small fc head, for CPU tests.
* tiny8: the same at stride 8 with BatchNorm (16-32-64-96-128 channels), for the
  CPU demo: small objects span a few cells instead of one, and BN lets it train
  from scratch at a high learning rate.

Weights come from torchvision (``imagenet``) or a local file; nothing is ever
downloaded unless ``allow_download`` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.models as tvm
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detect.errors import CheckpointError, ConfigError

BACKBONES = ("tiny", "tiny8", "alexnet", "zf", "vgg16", "googlenet", "resnet18", "resnet50", "resnet101")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """The shared trunk (image -> feature map) and what it declares to the stages after it.

    The per-RoI layers are built alongside (see :func:`build_backbone`) and handed
    to the RoI head, so each parameter has exactly one owner.

    Args:
        name: network name.
        stages: the trunk as consecutive stages; ``freeze_at`` counts these.
        stride: input pixels per feature cell.
        out_channels: channels of the feature map.
        head_channels: length of the vector the per-RoI layers output.
        roi_size: pooled RoI size the per-RoI layers were designed for.
        pixel_mean, pixel_std: input normalisation the weights expect ([0, 1] RGB).
        freeze_at: number of leading stages whose parameters never train.
    """

    def __init__(self, *, name: str, stages: list[nn.Module], stride: int, out_channels: int,
                 head_channels: int, roi_size: int, pixel_mean: tuple = IMAGENET_MEAN,
                 pixel_std: tuple = IMAGENET_STD, freeze_at: int = 0) -> None:
        super().__init__()
        if not 0 <= freeze_at <= len(stages):
            raise ConfigError(f"model.backbone.freeze_at={freeze_at}: {name} has {len(stages)} trunk stages")
        self.name = name
        self.trunk = nn.Sequential(*stages)
        self.stride = stride
        self.out_channels = out_channels
        self.head_channels = head_channels
        self.roi_size = roi_size
        self.pixel_mean = tuple(pixel_mean)
        self.pixel_std = tuple(pixel_std)
        self.min_input_size = 2 * stride   # AlexNet's pools need >= 31 pixels; the others fewer
        self.freeze_at = freeze_at
        for p in self.frozen_parameters():
            p.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, out_channels, ~H / stride, ~W / stride) features."""
        return self.trunk(images)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters ``freeze_at`` fixes for the whole training."""
        return [p for stage in list(self.trunk)[: self.freeze_at] for p in stage.parameters()]


# --------------------------------------------------------------------------- networks


class ZFNet(nn.Module):
    """ZF Net as used by Faster R-CNN (py-faster-rcnn ``ZF``): 5 conv + 2 fc, stride 16 at conv5.

    Zeiler & Fergus (2013) Fig. 3: 7x7/2 conv1 (96), 5x5/2 conv2 (256), then three
    3x3 convs (384, 384, 256). py-faster-rcnn normalises within each channel; torch
    only has cross-channel LRN, which is used here.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        lrn = dict(size=3, alpha=5e-5, beta=0.75)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2, padding=3), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(96, 256, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.LocalResponseNorm(**lrn),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, num_classes),
        )


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution (same parameters and state dict) computed as a matrix product.

    On the CPU, oneDNN's backward pass of a 1x1 convolution over a batch of (C, 7, 7)
    RoI features took ~10x its FLOP count (a third of a tiny detector's training step);
    ``baddbmm`` and its autograd do the same arithmetic without the layout conversions.
    A channels-last input (RoI features from :func:`detect.roi_pool.roi_max_pool`) is one
    (N*H*W, C) matrix: it is multiplied as such, with no copy, and the output stays channels-last.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weight = self.weight.view(self.out_channels, c)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        out = torch.baddbmm(self.bias.view(1, -1, 1), weight.expand(n, -1, -1), x.reshape(n, c, h * w))
        return out.view(n, self.out_channels, h, w)


class TinyNet(nn.Module):
    """Five 3x3 conv + ReLU layers (stride 16 or 8) and a small per-RoI head.

    The per-RoI head reduces the pooled channels to 32 with a 1x1 conv before
    a 256-d fc layer: with 128 RoIs per image the fc layer otherwise costs more
    than the whole trunk. ``tiny`` has no BatchNorm (four-five layers with He
    initialisation train without it); ``tiny8`` has it after every trunk conv,
    which trains from scratch several times faster at stride 8.
    """

    def __init__(self, roi_size: int = 7, *, stride: int = 16, batch_norm: bool = False,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 128)) -> None:
        super().__init__()

        def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, norm: bool = False) -> nn.Sequential:
            layer = (Conv1x1(cin, cout) if kernel == 1 else
                     nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm))
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
            return nn.Sequential(layer, *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU(inplace=True))

        halvings = {16: 4, 8: 3}[stride]
        channels = (3, *widths)
        self.features = nn.Sequential(*(conv(channels[i], channels[i + 1], stride=2 if i < halvings else 1,
                                             norm=batch_norm) for i in range(len(widths))))
        self.classifier = nn.Sequential(conv(widths[-1], 32, kernel=1), nn.Flatten(),
                                        nn.Linear(32 * roi_size * roi_size, 256), nn.ReLU(inplace=True))
        self.stride, self.out_channels = stride, widths[-1]


def _split_at_convs(features: nn.Sequential, group_by_pool: bool) -> list[nn.Module]:
    """Cut a VGG/AlexNet-style ``features`` into stages: per conv block (at max pools) or per conv layer."""
    stages, current = [], []
    for layer in features:
        starts_new = isinstance(layer, nn.Conv2d) and not group_by_pool and current
        if starts_new:
            stages.append(nn.Sequential(*current))
            current = []
        current.append(layer)
        if group_by_pool and isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return stages


def _torchvision_network(name: str) -> tuple[nn.Module, object | None]:
    """An untrained network with its torchvision ImageNet weights enum (None: no such weights)."""
    if name == "alexnet":
        return tvm.alexnet(weights=None), tvm.AlexNet_Weights.IMAGENET1K_V1
    if name == "vgg16":
        return tvm.vgg16(weights=None), tvm.VGG16_Weights.IMAGENET1K_V1
    if name == "googlenet":
        # PyTorch's default init: torchvision's truncated-normal init is slow (ImageNet weights replace it anyway)
        return (tvm.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=False),
                tvm.GoogLeNet_Weights.IMAGENET1K_V1)
    if name in ("resnet18", "resnet50", "resnet101"):
        # V1 weights: the original ResNet training recipe, as in the paper.
        enum = {"resnet18": tvm.ResNet18_Weights, "resnet50": tvm.ResNet50_Weights,
                "resnet101": tvm.ResNet101_Weights}[name]
        return getattr(tvm, name)(weights=None), enum.IMAGENET1K_V1
    if name == "zf":
        return ZFNet(), None
    if name == "tiny":
        return TinyNet(), None
    if name == "tiny8":
        return TinyNet(stride=8, batch_norm=True, widths=(16, 32, 64, 96, 128)), None
    raise ConfigError(f"model.backbone.name: unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")


def _cut(name: str, net: nn.Module, dropout: float) -> dict:
    """Trunk stages, RoI head and geometry of a network (see the module docstring)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    if name in ("alexnet", "vgg16", "zf"):
        layers = list(net.features)
        if isinstance(layers[-1], nn.MaxPool2d):
            layers = layers[:-1]      # keep conv5 at stride 16
        head = list(net.classifier)[:-1]
        if name in ("alexnet", "vgg16"):
            head = [nn.Flatten()] + head
        channels = 512 if name == "vgg16" else 256
        return dict(stages=_split_at_convs(nn.Sequential(*layers), group_by_pool=name == "vgg16"),
                    box_head=nn.Sequential(*head), stride=16, out_channels=channels, head_channels=4096,
                    roi_size=7 if name == "vgg16" else 6)
    if name == "googlenet":
        stages = [nn.Sequential(net.conv1, net.maxpool1), nn.Sequential(net.conv2, net.conv3, net.maxpool2),
                  nn.Sequential(net.inception3a, net.inception3b, net.maxpool3),
                  nn.Sequential(net.inception4a, net.inception4b, net.inception4c, net.inception4d, net.inception4e)]
        head = nn.Sequential(net.maxpool4, net.inception5a, net.inception5b, net.avgpool, nn.Flatten())
        # torchvision's GoogLeNet weights were trained on (x - 0.5) / 0.5 inputs.
        return dict(stages=stages, box_head=head, stride=16, out_channels=832, head_channels=1024, roi_size=14,
                    pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))
    if name.startswith("resnet"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        wide = name != "resnet18"
        return dict(stages=[stem, net.layer1, net.layer2, net.layer3],
                    box_head=nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                    stride=16, out_channels=1024 if wide else 256, head_channels=2048 if wide else 512, roi_size=14)
    if name in ("tiny", "tiny8"):
        return dict(stages=list(net.features), box_head=net.classifier, stride=net.stride,
                    out_channels=net.out_channels, head_channels=256, roi_size=7)
    raise ConfigError(f"model.backbone.name: unknown backbone '{name}'")


# --------------------------------------------------------------------------- weights


def _cached_imagenet_state(name: str, weights_enum, allow_download: bool) -> dict:
    if weights_enum is None:
        raise ConfigError(f"model.backbone.weights=imagenet: torchvision has no ImageNet weights for '{name}'; "
                          "use weights=none or a path to a local state dict")
    url = weights_enum.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if allow_download:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
    raise CheckpointError(
        f"ImageNet weights for {name} are not in the torch cache: {path} is missing. Get them on a machine with "
        f"network access (download {url} to that path, or run python -c \"import torchvision; "
        f"torchvision.models.get_model('{name}', weights='{weights_enum.name}')\"), or set "
        f"model.backbone.allow_download=true, or use model.backbone.weights=none to train from scratch")


def _read_local_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"model.backbone.weights: file not found: {path} (use 'none', 'imagenet' or a path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is one clear message
        raise CheckpointError(f"model.backbone.weights: cannot read {path} as a torch state dict: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"model.backbone.weights: {path} does not hold a state dict")
    return state


def _load_into(net: nn.Module, used: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``net``; every tensor the backbone ``used`` keeps must be present."""
    used_ids = {id(t) for t in used.state_dict(keep_vars=True).values()}
    needed = [k for k, t in net.state_dict(keep_vars=True).items() if id(t) in used_ids]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} backbone tensors are missing, e.g. {missing[:3]}")
    try:
        net.load_state_dict({k: state[k] for k in needed}, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: tensors do not fit the network: {str(exc).splitlines()[-1]}") from None


def _load_parts(used: nn.ModuleDict, state: dict, source: str) -> None:
    """Load ``trunk.*`` / ``box_head.*`` tensors; a part the file names must be complete, a part it omits keeps its init.

    A trunk pretrained on its own (e.g. as a classifier, R-CNN Sec. 2.3) comes without per-RoI tensors.
    Files written before the per-RoI layers were called ``box_head`` name them ``roi_head.*``: read alike.
    """
    state = {("box_head." + k[len("roi_head."):] if k.startswith("roi_head.") else k): v for k, v in state.items()}
    parts = {k.split(".", 1)[0] for k in state}
    unknown = sorted(parts - set(used.keys()))
    if unknown:
        raise CheckpointError(f"{source}: unexpected top-level keys {unknown} (expected trunk.*, box_head.*)")
    for part in sorted(parts):
        prefix = f"{part}."
        given = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        expected = used[part].state_dict()
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source}: {part}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        try:
            used[part].load_state_dict(given)
        except RuntimeError as exc:    # shapes
            raise CheckpointError(f"{source}: {part}: {str(exc).splitlines()[-1].strip()}") from None


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics.

    Detection batches hold one or two images, too few for batch statistics
    (the ResNet paper's detection setup fixes BN, Appendix A).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold each FrozenBatchNorm2d (or BatchNorm2d, with its running statistics) into the Conv2d before it.

    Returns how many were folded.

    Frozen BN is an affine map, so ``bn(conv(x))`` equals one convolution with
    scaled weights and a bias: this saves a pass over every feature map at
    inference. It relies on the torchvision blocks registering each ``bn`` right
    after the ``conv`` it follows (true for ResNet, GoogLeNet and the stems here).
    Do it for inference only: training would then update the folded weights.
    """
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
                beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
                scale = gamma * torch.rsqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + beta, requires_grad=False)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def build_backbone(name: str, *, weights: str = "none", freeze_at: int = 0, freeze_bn: bool = True,
                   allow_download: bool = False, dropout: float = 0.5) -> tuple[Backbone, nn.Module]:
    """Build a backbone and its per-RoI layers by name.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``"none"``, ``"imagenet"`` (torchvision's, from the local torch cache) or a state-dict path
            (the whole torchvision network's keys, or ``trunk.*`` / ``box_head.*`` keys of this module).
        freeze_at: leading trunk stages kept fixed (VGG16: conv1-conv2 as in the paper; ResNet: stem + res2).
        freeze_bn: turn BatchNorm layers into FrozenBatchNorm2d.
        allow_download: let ``imagenet`` download missing weights.
        dropout: drop probability of the fc head's dropout layers.

    Returns:
        The trunk and the per-RoI layers ((R, out_channels, roi_size, roi_size) -> (R, head_channels)).
    """
    net, weights_enum = _torchvision_network(name)
    parts = _cut(name, net, dropout)
    box_head = parts.pop("box_head")
    used = nn.ModuleDict({"trunk": nn.Sequential(*parts["stages"]), "box_head": box_head})
    if weights == "imagenet":
        _load_into(net, used, _cached_imagenet_state(name, weights_enum, allow_download), f"{name} ImageNet weights")
    elif weights not in ("none", ""):
        state = _read_local_state(Path(weights))
        if any(k.startswith(("trunk.", "box_head.", "roi_head.")) for k in state):
            _load_parts(used, state, f"model.backbone.weights={weights}")
        else:
            _load_into(net, used, state, f"model.backbone.weights={weights}")
    backbone = Backbone(name=name, freeze_at=freeze_at, **parts)
    if freeze_bn:
        freeze_batchnorm(backbone)
        freeze_batchnorm(box_head)
    return backbone, box_head


def is_pointwise(conv: nn.Module) -> bool:
    """A plain 1x1 convolution: stride 1, no padding, dilation or groups."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1)
