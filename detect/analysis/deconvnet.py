"""Deconvnet visualisation of trunk units (Zeiler & Fergus 2013, Sec. 2.1).

To see what a unit of layer L responds to, its activation is projected back to
pixel space: every other activation of layer L is set to zero and the signal
runs backwards through the layers below, each inverted approximately:

* max pooling -> unpooling: each value goes back to the input position that won
  the max in the forward pass (the recorded *switches*, max-pool indices);
* ReLU -> rectification: the reconstruction is passed through a ReLU again;
* convolution -> filtering with the transposed filters (``conv_transpose2d`` with the
  same weights, no bias).

Local response normalisation is left out of the backward pass, as in the paper.
Written by hand because no maintained library implements a Zeiler-Fergus deconvnet.
Unpooling sums values that land on the same switch (AlexNet and ZF Net pool over
overlapping 3x3 windows, so one input position can win two windows);
``torch.nn.functional.max_unpool2d`` would keep only one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detect.analysis.trunk import Layer, flatten_trunk, geometry, resolve_layer
from detect.utils.io import save_figure


@dataclass
class Switches:
    """Max-pool indices of one forward pass: layer index -> (indices, input shape)."""

    pools: dict[int, tuple[Tensor, torch.Size]]
    input_shapes: dict[int, torch.Size]


@dataclass
class Projection:
    """One unit's activation projected to pixel space.

    Attributes:
        image_index: which image (of those searched) holds the unit.
        layer: the layer name asked for.
        channel: the unit's channel.
        cell: ``(y, x)`` of the unit in the layer's feature map.
        activation: the unit's (rectified) activation.
        reconstruction: (3, H, W) projection in the normalised input space of the image.
        field: ``(y1, x1, y2, x2)`` receptive field of the unit in the image's pixels, clipped to it.
        image: (H, W, 3) uint8 RGB input the unit saw (resized as the model resizes).
    """

    image_index: int
    layer: str
    channel: int
    cell: tuple[int, int]
    activation: float
    reconstruction: Tensor
    field: tuple[int, int, int, int]
    image: np.ndarray


class DeconvNet:
    """Forward pass with switches and the approximate inverse of a plain conv trunk.

    Args:
        trunk: a chain of Conv2d / ReLU / MaxPool2d / normalisation layers (e.g. ``backbone.trunk``).
        pixel_mean, pixel_std: input normalisation of the trunk ([0, 1] RGB).
    """

    def __init__(self, *, trunk: nn.Module, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]) -> None:
        self.layers: list[Layer] = flatten_trunk(trunk)
        param = next(trunk.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_backbone(cls, backbone) -> "DeconvNet":
        """From a :class:`detect.backbones.Backbone` (uses its trunk and its normalisation)."""
        return cls(trunk=backbone.trunk, pixel_mean=backbone.pixel_mean, pixel_std=backbone.pixel_std)

    def normalise(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> the trunk's input space."""
        return (images.to(self.device, torch.float32) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: Tensor, upto: int) -> tuple[Tensor, Switches]:
        """Run layers ``0..upto`` on normalised input (N, 3, H, W), recording pool switches."""
        switches = Switches({}, {})
        for i, layer in enumerate(self.layers[: upto + 1]):
            m = layer.module
            switches.input_shapes[i] = x.shape
            if isinstance(m, nn.MaxPool2d):
                x, indices = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                          return_indices=True)
                switches.pools[i] = (indices, switches.input_shapes[i])
            elif isinstance(m, nn.ReLU):
                x = F.relu(x)           # never in place: the caller keeps intermediate maps
            else:
                x = m(x)
        return x, switches

    @torch.no_grad()
    def backward(self, signal: Tensor, switches: Switches, upto: int) -> Tensor:
        """Project a layer-``upto`` map (N, C, h, w) down to input space (N, 3, H, W)."""
        x = signal
        for i in range(upto, -1, -1):
            m = self.layers[i].module
            if isinstance(m, nn.ReLU):
                x = F.relu(x)
            elif isinstance(m, nn.MaxPool2d):
                indices, shape = switches.pools[i]
                out = x.new_zeros(shape[0], shape[1], shape[2] * shape[3])
                out.scatter_add_(2, indices.flatten(2), x.flatten(2))
                x = out.view(shape)
            elif isinstance(m, nn.Conv2d):
                x = _transposed_filter(x, m, switches.input_shapes[i])
            # normalisation, dropout, identity: not inverted (Sec. 2.1)
        return x

    def layer_index(self, layer: str | int) -> int:
        return resolve_layer(self.layers, layer)

    @torch.no_grad()
    def channel_maxima(self, images: list[Tensor], layer: str | int) -> tuple[Tensor, Tensor, Tensor]:
        """Strongest activation of every channel in each image.

        Args:
            images: N (3, H, W) RGB tensors in [0, 1] (run one at a time: sizes may differ).

        Returns:
            values (N, C), rows (N, C), cols (N, C): the maximum of each channel and its cell.
        """
        upto = self.layer_index(layer)
        values, rows, cols = [], [], []
        for image in images:
            fmap, _ = self.forward(self.normalise(image[None]), upto)
            flat = fmap[0].flatten(1)
            best, where = flat.max(dim=1)
            values.append(best.cpu())
            rows.append((where // fmap.shape[-1]).cpu())
            cols.append((where % fmap.shape[-1]).cpu())
        return torch.stack(values), torch.stack(rows), torch.stack(cols)

    @torch.no_grad()
    def project(self, image: Tensor, layer: str | int, channel: int, cell: tuple[int, int],
                image_index: int = 0) -> Projection:
        """Project one unit ``(channel, y, x)`` of ``layer`` for a (3, H, W) [0, 1] image."""
        upto = self.layer_index(layer)
        fmap, switches = self.forward(self.normalise(image[None]), upto)
        y, x = cell
        signal = torch.zeros_like(fmap)
        signal[0, channel, y, x] = fmap[0, channel, y, x]
        recon = self.backward(signal, switches, upto)[0].cpu()
        geo = geometry(self.layers, upto)
        h, w = image.shape[-2:]
        y1, y2 = geo.field(y)
        x1, x2 = geo.field(x)
        field = (max(y1, 0), max(x1, 0), min(y2, h), min(x2, w))
        rgb = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Projection(image_index, str(layer), int(channel), (int(y), int(x)), float(fmap[0, channel, y, x]),
                          recon, field, rgb)

    @torch.no_grad()
    def top_units(self, images: list[Tensor], layer: str | int, channel: int, k: int = 9) -> list[Projection]:
        """The ``k`` strongest activations of a channel over a set of images, each projected (Fig. 2 of the paper).

        One unit per image (its strongest), so the grid shows ``k`` different images.
        """
        values, rows, cols = self.channel_maxima(images, layer)
        return self.project_top(images, layer, channel, values[:, channel], rows[:, channel], cols[:, channel], k)

    def project_top(self, images: list[Tensor], layer: str | int, channel: int, values: Tensor, rows: Tensor,
                    cols: Tensor, k: int = 9) -> list[Projection]:
        """Project the ``k`` best of precomputed per-image maxima (N,) of one channel."""
        order = torch.argsort(values, descending=True, stable=True)[:k]
        return [self.project(images[i], layer, channel, (int(rows[i]), int(cols[i])), image_index=int(i))
                for i in order.tolist()]

    @torch.no_grad()
    def top_units_in_image(self, image: Tensor, layer: str | int, channel: int, k: int = 9) -> list[Projection]:
        """The ``k`` strongest separate peaks of a channel inside one image, each projected.

        A cell counts as a peak when it is the maximum of its 3x3 neighbourhood, so the
        projections show different places rather than neighbours of one peak.
        """
        upto = self.layer_index(layer)
        fmap, _ = self.forward(self.normalise(image[None]), upto)
        plane = fmap[0, channel][None, None]
        peaks = (plane == F.max_pool2d(plane, 3, stride=1, padding=1)) & (plane > 0)
        scores = torch.where(peaks, plane, torch.full_like(plane, -1.0)).flatten()
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        width = plane.shape[-1]
        return [self.project(image, layer, channel, (int(i) // width, int(i) % width))
                for i in order.tolist() if scores[i] >= 0]


def resize_like_model(model, image: Tensor) -> Tensor:
    """A (3, H, W) [0, 1] image resized as the detector's input transform resizes it at test time.

    The deconvnet then sees the trunk's input at the scale the detector uses.
    """
    transform = model.transform_for_test
    if not transform.resize:      # R-CNN: the trunk sees regions of the image as given
        return image
    height, width = image.shape[-2:]
    scale = min(transform.test_min_size / min(height, width), transform.max_size / max(height, width))
    if scale == 1.0:
        return image
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0].clamp(0, 1)


def _transposed_filter(x: Tensor, conv: nn.Conv2d, input_shape: torch.Size) -> Tensor:
    """Filter with the transposed weights of ``conv``; output sized like the conv's input."""
    stride, padding, dilation = conv.stride, conv.padding, conv.dilation
    if isinstance(padding, str):
        raise ValueError(f"convolution with padding='{padding}' is not supported by the deconvnet")
    kernel = conv.weight.shape[-2:]
    extra = []
    for axis in range(2):
        size = (x.shape[2 + axis] - 1) * stride[axis] - 2 * padding[axis] + dilation[axis] * (kernel[axis] - 1) + 1
        extra.append(int(input_shape[2 + axis]) - size)
    # A strided conv's windows may stop short of the input's last rows (fewer than the stride); output padding
    # restores them so the projection has the input's size, exactly as the gradient of the conv would.
    return F.conv_transpose2d(x, conv.weight, None, stride, padding, output_padding=tuple(extra), groups=conv.groups,
                              dilation=dilation)


def to_display(reconstruction: Tensor, field: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(3, H, W) projection -> (h, w, 3) uint8, grey at zero, scaled by its own largest magnitude (Fig. 2)."""
    recon = reconstruction
    if field is not None:
        y1, x1, y2, x2 = field
        recon = recon[:, y1:y2, x1:x2]
    scale = float(recon.abs().max())
    out = recon / (2 * scale) + 0.5 if scale > 0 else torch.full_like(recon, 0.5)
    return (out.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _mosaic(tiles: list[np.ndarray], *, tile: int = 80, cols: int = 3, gap: int = 2) -> np.ndarray:
    """Square tiles (resized to ``tile`` px) on a white grid of ``cols`` columns."""
    from PIL import Image

    rows = max(1, -(-len(tiles) // cols))
    out = np.full((rows * tile + (rows - 1) * gap, cols * tile + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(t)).resize((tile, tile), Image.NEAREST
                                                                              if min(t.shape[:2]) < tile // 4
                                                                              else Image.BILINEAR))
        out[r * (tile + gap): r * (tile + gap) + tile, c * (tile + gap): c * (tile + gap) + tile] = resized
    return out


def plot_projections(projections: list[Projection], path: str | Path, *, title: str = "") -> Path:
    """Projections (left) next to the image patches they come from (right), 3 per row, as Fig. 2; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recon = [to_display(p.reconstruction, p.field) for p in projections]
    patches = [p.image[p.field[0]:p.field[2], p.field[1]:p.field[3]] for p in projections]
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.6))
    for ax, tiles, name in ((left, recon, "deconvnet projections"), (right, patches, "image patches")):
        ax.imshow(_mosaic(tiles) if tiles else np.full((8, 8, 3), 255, np.uint8))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
