"""Deconvnet: each inverse layer is exact where it should be, and a planted pattern is found and projected back."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detect.analysis.deconvnet import DeconvNet, _transposed_filter, plot_projections, to_display
from detect.analysis.trunk import UnsupportedTrunkError, flatten_trunk, geometry, resolve_layer
from detect.backbones import build_backbone
from detect.errors import DetectError


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 13), (2, 2, 15), (4, 2, 67), (2, 3, 16)])
def test_transposed_filter_is_the_gradient_of_the_convolution(stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 7 if padding == 3 else 5, stride=stride, padding=padding, bias=False)
    x = torch.randn(1, 3, size, size + 1, requires_grad=True)
    out = conv(x)
    signal = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, signal)
    assert torch.allclose(_transposed_filter(signal, conv, x.shape), grad, atol=1e-5)


def test_unpooling_with_switches_sums_overlapping_windows():
    torch.manual_seed(0)
    net = DeconvNet(trunk=nn.Sequential(nn.MaxPool2d(3, stride=2)), pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1))
    x = torch.randn(1, 3, 15, 17, requires_grad=True)
    pooled, switches = net.forward(x.detach(), 0)
    signal = torch.rand_like(pooled)
    (grad,) = torch.autograd.grad(F.max_pool2d(x, 3, stride=2), x, signal)
    assert torch.allclose(net.backward(signal, switches, 0), grad)      # the gradient of max pooling sums too


@pytest.mark.parametrize("name,rf", [("alexnet", 163), ("vgg16", 196), ("tiny", 63)])
def test_layer_names_and_receptive_fields(name, rf):
    backbone, _ = build_backbone(name)
    layers = flatten_trunk(backbone.trunk)
    geo = geometry(layers)
    assert geo.size == rf and geo.jump == 16
    assert layers[resolve_layer(layers, "conv1")].name == "relu1"
    if name == "vgg16":
        assert resolve_layer(layers, "conv5_3") == resolve_layer(layers, "conv13") == len(layers) - 1
    with pytest.raises(DetectError, match="unknown layer 'conv99'.*conv1"):
        resolve_layer(layers, "conv99")


def test_branched_trunks_are_refused():
    backbone, _ = build_backbone("resnet18")
    with pytest.raises(UnsupportedTrunkError, match="plain chain"):
        DeconvNet.from_backbone(backbone)


def _plant(backbone: nn.Module, layer: str) -> tuple[torch.Tensor, int]:
    """conv1 filter 0 := a pattern; every conv up to ``layer``: channel 0 copies channel 0 (centre tap).

    Returns the pattern and its side.
    """
    layers = flatten_trunk(backbone.trunk)
    end = resolve_layer(layers, layer)
    convs = [l.module for l in layers[: end + 1] if isinstance(l.module, nn.Conv2d)]
    k = convs[0].kernel_size[0]
    pattern = torch.zeros(3, k, k)
    pattern[0, :, k // 2] = 1.0                    # a red vertical bar over a green horizontal one
    pattern[1, k // 2, :] = 1.0
    pattern -= pattern.mean()
    with torch.no_grad():
        convs[0].weight[0] = pattern
        convs[0].bias[0] = 0.0
        for conv in convs[1:]:
            c = conv.kernel_size[0] // 2
            conv.weight[0].zero_()
            conv.weight[0, 0, c, c] = 1.0
            conv.bias[0] = 0.0
    return pattern, k


@pytest.mark.parametrize("name,layer", [("alexnet", "conv2"), ("zf", "conv2"), ("vgg16", "conv2_1"), ("tiny", "conv3")])
def test_projection_of_a_planted_pattern_lands_on_it(name, layer):
    torch.manual_seed(0)
    backbone, _ = build_backbone(name)
    net = DeconvNet.from_backbone(backbone)
    pattern, k = _plant(backbone, layer)
    mean = torch.tensor(backbone.pixel_mean).view(3, 1, 1)
    std = torch.tensor(backbone.pixel_std).view(3, 1, 1)
    images = [(mean + 0.02 * torch.randn(3, 112, 120)).clamp(0, 1) for _ in range(3)]
    # on the target layer's grid: strided centre taps (tiny has no pools to pick the best place) skip the rest
    layers = flatten_trunk(backbone.trunk)
    step, pad = geometry(layers, resolve_layer(layers, layer)).jump, layers[0].module.padding[0]
    top, left = [next(v for v in range(start, start + step) if (v + pad) % step == 0) for start in (61, 37)]
    images[1][:, top:top + k, left:left + k] = (mean + 0.4 * std * pattern).clamp(0, 1)
    projections = net.top_units(images, layer, channel=0, k=3)
    assert [p.image_index for p in projections][0] == 1 and len(projections) == 3
    best = projections[0]
    energy = best.reconstruction.abs().sum(dim=0)
    y, x = np.unravel_index(int(energy.argmax()), energy.shape)
    assert top <= y < top + k and left <= x < left + k
    inside = energy[top - 2:top + k + 2, left - 2:left + k + 2].sum()
    assert inside > 0.95 * energy.sum()
    y1, x1, y2, x2 = best.field
    assert y1 <= top and x1 <= left and y2 >= top + k and x2 >= left + k      # the field holds the pattern
    # one unit through the chain of centre taps reaches one conv1 unit: its projection is the filter itself
    patch = best.reconstruction[:, top:top + k, left:left + k]
    assert F.cosine_similarity(patch.flatten(), pattern.flatten(), dim=0) > 0.999

def test_peaks_in_one_image_and_the_figure(tmp_path, monkeypatch):
    """Catches (figure) tiles from the wrong field or in the wrong order, panels swapped, a wrong display scale."""
    torch.manual_seed(0)
    backbone, _ = build_backbone("tiny")
    net = DeconvNet.from_backbone(backbone)
    pattern, k = _plant(backbone, "conv1")
    mean = torch.tensor(backbone.pixel_mean).view(3, 1, 1)
    image = (mean + 0.02 * torch.randn(3, 96, 128)).clamp(0, 1)
    spots = [(11, 21), (51, 91), (71, 31)]          # on conv1's stride-2 grid (padding 1)
    for y, x in spots:
        image[:, y:y + k, x:x + k] = (mean + 0.5 * pattern).clamp(0, 1)
    projections = net.top_units_in_image(image, "conv1", 0, k=9)
    assert 3 <= len(projections) <= 9
    found = {p.cell for p in projections[:3]}
    assert len(found) == 3                                          # three separate peaks, not neighbours
    for p in projections[:3]:
        y1, x1, y2, x2 = p.field
        assert any(y1 <= y + 1 < y2 and x1 <= x + 1 < x2 for y, x in spots)
    shown = to_display(projections[0].reconstruction, projections[0].field)
    assert shown.dtype == np.uint8 and shown.shape[2] == 3 and shown.min() < 128 < shown.max()
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)      # keep the figure to read back what it shows
    path = plot_projections(projections, tmp_path / "grid.png", title="tiny conv1 channel 0")
    assert Image.open(path).size[0] > 300
    (fig,) = figures
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("deconvnet projections", "image patches")
    shown, patches = left.images[0].get_array(), right.images[0].get_array()
    close(fig)
    # 9 tiles of 80 px, 3 per row, 2 px white gaps between them
    assert shown.shape == patches.shape == (244, 244, 3)
    for mosaic in (shown, patches):
        assert (mosaic[80:82] == 255).all() and (mosaic[:, 162:164] == 255).all()
    centres = [int((i + 0.5) * 80 / k) for i in range(k)]      # the middle of each of the k x k source pixels
    for n, p in enumerate(projections):
        r, c = divmod(n, 3)
        y1, x1, y2, x2 = p.field
        assert (y2 - y1, x2 - x1) == (k, k)
        tile = patches[r * 82: r * 82 + 80, c * 82: c * 82 + 80]
        assert np.array_equal(tile[np.ix_(centres, centres)], p.image[y1:y2, x1:x2]), n    # own field, rank order
    # the strongest projection is the planted filter itself, shown grey at zero and scaled by its largest magnitude
    expected = np.round(255 * (0.5 + pattern.permute(1, 2, 0).numpy() / (2 * float(pattern.abs().max()))))
    assert np.abs(shown[np.ix_(centres, centres)].astype(float) - expected).max() <= 3
