"""A convolutional trunk seen as a flat list of layers: names, and receptive-field geometry.

The deconvnet (Zeiler & Fergus 2013, Sec. 2.1) must run a trunk layer by layer
to record the max-pool switches and to invert each layer in turn, and occlusion
sensitivity needs to know how far a pixel's influence reaches so it can score a
crop instead of the whole image. Both only make sense for a plain chain of
convolutions, pools and pointwise layers (AlexNet, ZF Net, VGG16, tiny);
GoogLeNet's inception modules and ResNet's blocks have branches, so
:func:`flatten_trunk` refuses them with one clear error.

Written here because torchvision has no layer-by-layer view of a Sequential's
receptive field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detect.errors import DetectError

# Layers that act on each position separately: they do not widen the receptive field.
POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.BatchNorm2d, FrozenBatchNorm2d, nn.Identity, nn.Dropout)


class UnsupportedTrunkError(DetectError):
    """The trunk is not a plain chain of conv / pool / pointwise layers."""


@dataclass(frozen=True)
class Layer:
    """One leaf layer of a trunk.

    Attributes:
        name: readable name: ``conv3`` (the 3rd convolution), ``relu3`` (its ReLU), ``pool2``, ``norm1``.
        path: dotted module path inside the trunk (``"4.0"``).
        module: the layer itself.
    """

    name: str
    path: str
    module: nn.Module


def _leaves(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            _leaves(child, f"{prefix}.{name}" if prefix else name, out)
        return
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, *POINTWISE)):
        out.append((prefix, module))
        return
    raise UnsupportedTrunkError(
        f"layer '{prefix}' ({type(module).__name__}) is not a convolution, max pool or pointwise layer; the "
        "deconvnet and the receptive-field crop need a plain chain of layers (alexnet, zf, vgg16, tiny)")


def flatten_trunk(trunk: nn.Module) -> list[Layer]:
    """The trunk's leaf layers in order, named ``convK`` / ``reluK`` / ``poolK`` / ``normK``.

    ``reluK`` follows ``convK``; pools and normalisation layers are numbered on their own.

    Raises:
        UnsupportedTrunkError: a layer has branches (inception, residual blocks) or an unknown type.
    """
    leaves: list[tuple[str, nn.Module]] = []
    _leaves(trunk, "", leaves)
    layers, counts = [], {"conv": 0, "pool": 0, "norm": 0, "other": 0}
    for path, module in leaves:
        if isinstance(module, nn.Conv2d):
            counts["conv"] += 1
            name = f"conv{counts['conv']}"
        elif isinstance(module, nn.ReLU):
            name = f"relu{counts['conv']}"
        elif isinstance(module, nn.MaxPool2d):
            counts["pool"] += 1
            name = f"pool{counts['pool']}"
        elif isinstance(module, (nn.LocalResponseNorm, nn.BatchNorm2d, FrozenBatchNorm2d)):
            counts["norm"] += 1
            name = f"norm{counts['norm']}"
        else:
            counts["other"] += 1
            name = f"{type(module).__name__.lower()}{counts['other']}"
        layers.append(Layer(name, path, module))
    return layers


def conv_names(layers: list[Layer]) -> dict[str, int]:
    """Names that select a convolution's rectified output -> index of the last layer to run.

    ``conv3`` and the block form ``conv2_1`` (block = pools seen so far + 1, as VGG's names) both
    select the ReLU after that convolution (or the convolution itself when no ReLU follows);
    the dotted module path of any layer selects that layer.
    """
    names: dict[str, int] = {}
    block, within = 1, 0
    for i, layer in enumerate(layers):
        names.setdefault(layer.path, i)
        if isinstance(layer.module, nn.MaxPool2d):
            block, within = block + 1, 0
        if not isinstance(layer.module, nn.Conv2d):
            continue
        within += 1
        end = i + 1 if i + 1 < len(layers) and isinstance(layers[i + 1].module, nn.ReLU) else i
        names[layer.name] = end
        names[f"conv{block}_{within}"] = end
    return names


def resolve_layer(layers: list[Layer], layer: str | int) -> int:
    """Index of the last layer to run for a layer name, module path or (negative) index.

    Raises:
        DetectError: naming the unknown layer and listing the valid names.
    """
    if isinstance(layer, int) or re.fullmatch(r"-?\d+", str(layer)):
        index = int(layer)
        if -len(layers) <= index < len(layers):
            return index % len(layers)
        raise DetectError(f"layer index {index} is out of range: the trunk has {len(layers)} layers")
    names = conv_names(layers)
    if layer not in names:
        convs = [name for name in names if re.fullmatch(r"conv\d+", name)]
        raise DetectError(f"unknown layer '{layer}': choose one of {', '.join(convs)} (or a module path / index)")
    return names[layer]


@dataclass(frozen=True)
class Geometry:
    """Where a feature cell looks in the input: cell ``i`` sees pixels ``[i*jump - pad, i*jump - pad + size)``.

    Attributes:
        jump: input pixels between neighbouring cells (the product of the strides).
        size: receptive field side in input pixels.
        pad: input pixels of padding the first cell's field starts before the image.
    """

    jump: int
    size: int
    pad: int

    def field(self, index: int) -> tuple[int, int]:
        """``[start, stop)`` of cell ``index``'s receptive field along one axis (may leave the image)."""
        start = index * self.jump - self.pad
        return start, start + self.size


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def geometry(layers: list[Layer], upto: int | None = None) -> Geometry:
    """Receptive field of the output of ``layers[: upto + 1]`` (all layers when None), along the height.

    The trunks here use square kernels and strides, so one axis describes both.
    """
    jump, size, pad = 1, 1, 0
    for layer in layers[: (len(layers) if upto is None else upto + 1)]:
        m = layer.module
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride = _pair(m.kernel_size)[0], _pair(m.stride)[0]
            padding, dilation = _pair(m.padding)[0], _pair(m.dilation)[0]
            pad += padding * jump
            size += (kernel - 1) * dilation * jump
            jump *= stride
    return Geometry(jump=jump, size=size, pad=pad)
