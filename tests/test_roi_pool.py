"""detect.roi_pool: the range-maximum RoI pooling equals torchvision's RoIPool bit for bit."""

import pytest
import torch
from torchvision.ops import roi_pool as tv_roi_pool

from detect import roi_pool as rp


def _random_case(gen: torch.Generator, trial: int):
    n = int(torch.randint(1, 4, (), generator=gen))
    c = int(torch.randint(1, 24, (), generator=gen))
    h, w = (int(v) for v in torch.randint(1, 45, (2,), generator=gen))
    scale = (1.0, 0.5, 0.125, 1 / 16, 0.3)[trial % 5]
    features = torch.randn(n, c, h, w, generator=gen)
    k = int(torch.randint(0, 40, (), generator=gen))
    # corners spread past the map on every side, some on exact half-cells (rounding ties)
    xy = torch.rand(k, 4, generator=gen) * torch.tensor([w, h, w, h]) / scale * 1.4 - 8
    if trial % 3 == 0:
        xy = (xy * 2).round() / 2
    boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])], dim=1)
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=gen).float(), boxes], dim=1)
    size = tuple(int(v) for v in torch.randint(1, 8, (2,), generator=gen))
    return features, rois, size, scale


def test_equals_torchvision_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        features, rois, size, scale = _random_case(gen, trial)
        expected = tv_roi_pool(features, rois, size, scale)
        got = rp.roi_max_pool(features, rois, size, scale)
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"trial {trial}: max diff {(got - expected).abs().max()}"


def test_channel_blocks_channels_last_and_list_input(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 33, 20, 27, generator=gen).contiguous(memory_format=torch.channels_last)
    boxes = [torch.tensor([[0.0, 0.0, 200.0, 150.0], [13.2, 7.9, 40.4, 90.0]]), torch.tensor([[5.0, 5.0, 6.0, 6.0]])]
    expected = tv_roi_pool(features.contiguous(), boxes, 7, 0.125)
    monkeypatch.setattr(rp, "_TABLE_BYTES", 20 * 27 * 4 * 4)   # forces blocks of a few channels
    monkeypatch.setattr(rp, "_CHUNK", 5)                      # and many gather chunks
    assert torch.equal(rp.roi_max_pool(features, boxes, 7, 0.125), expected)


def test_batch_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
        rp.roi_max_pool(torch.randn(2, 3, 8, 8), torch.tensor([[2.0, 0.0, 0.0, 4.0, 4.0]]), 2, 1.0)


def test_no_rois_and_bins_outside_the_map():
    features = torch.randn(1, 4, 6, 6)
    assert rp.roi_max_pool(features, torch.zeros(0, 5), 3, 1.0).shape == (0, 4, 3, 3)
    far = torch.tensor([[0.0, 100.0, 100.0, 120.0, 130.0]])       # wholly outside: every bin empty, 0
    assert torch.equal(rp.roi_max_pool(features, far, 2, 1.0), torch.zeros(1, 4, 2, 2))
    assert torch.equal(tv_roi_pool(features, far, 2, 1.0), torch.zeros(1, 4, 2, 2))


def test_gradients_equal_torchvision():
    gen = torch.Generator().manual_seed(5)
    pool = rp.RoIPool(output_size=(7, 7), spatial_scale=0.125)
    for trial in range(20):
        features, rois, _, _ = _random_case(gen, trial)
        features = features.relu().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        reference = features.detach().clone().requires_grad_(True)
        out = pool(features, rois)
        expected = tv_roi_pool(reference, rois, (7, 7), 0.125)
        assert torch.equal(out, expected)
        upstream = torch.randn(out.shape, generator=gen)
        out.backward(upstream)
        expected.backward(upstream)
        assert torch.equal(features.grad, reference.grad), f"trial {trial}"


def test_module_is_a_torchvision_roipool_with_the_same_results():
    gen = torch.Generator().manual_seed(2)
    pool = rp.RoIPool(output_size=(4, 4), spatial_scale=0.5)
    features = torch.randn(1, 3, 16, 16, generator=gen, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 2.0, 20.0, 25.0], [0.0, 0.0, 0.0, 31.0, 31.0]])
    out = pool(features, rois)
    out.sum().backward()
    reference = features.detach().clone().requires_grad_(True)
    tv_roi_pool(reference, rois, (4, 4), 0.5).sum().backward()
    assert torch.equal(features.grad, reference.grad)
    with torch.inference_mode():
        assert torch.equal(pool(features.detach(), rois), out.detach())
    assert isinstance(pool, __import__("torchvision").ops.RoIPool)


def test_float64_without_gradients():
    gen = torch.Generator().manual_seed(3)
    features, rois, size, scale = _random_case(gen, 1)
    features, rois = features.double(), rois.double()
    assert torch.equal(rp.roi_max_pool(features, rois, size, scale), tv_roi_pool(features, rois, size, scale))
