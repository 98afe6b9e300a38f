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


# ---- Added from mutation testing (mutmut over detect/roi_pool.py); each test names the mutants it kills.

def test_float64_equals_torchvision_with_scales_that_are_not_powers_of_two():
    # Kills: the spatial scale made a float32 tensor (torchvision's kernel multiplies float64 RoIs by
    # the float64 scale), which changes the rounded corners of some RoIs at scales like 0.3 or 0.1.
    gen = torch.Generator().manual_seed(7)
    for trial in range(200):
        features, rois, size, _ = _random_case(gen, trial)
        scale = (0.3, 0.1, 1 / 3, 0.7, 0.45)[trial % 5]
        features, rois = features.double(), rois.double()
        assert torch.equal(rp.roi_max_pool(features, rois, size, scale), tv_roi_pool(features, rois, size, scale)), trial


def test_float64_boxes_per_image_are_cast_to_the_features_dtype():
    # Kills: _as_rois keeping float64 boxes (b.to(dtype) dropped, or dtype None) with float32 features:
    # bin edges computed from the float64 corners differ from those of the float32 RoIs torchvision uses.
    gen = torch.Generator().manual_seed(11)
    for trial in range(160):
        features, rois, size, _ = _random_case(gen, trial)
        scale = (0.3, 0.7, 0.45)[trial % 3]
        boxes = [rois[rois[:, 0] == i, 1:].double() for i in range(features.shape[0])]
        boxes = [b + torch.rand(b.shape, generator=gen, dtype=torch.float64) * 1e-6 for b in boxes]
        expected = tv_roi_pool(features, [b.float() for b in boxes], size, scale)
        assert torch.equal(rp.roi_max_pool(features, boxes, size, scale), expected), trial


def test_no_images_and_a_map_without_rows():
    # Kills: the empty-list branch of _as_rois (torch.cat of nothing, a fake RoI, wrong shape) and
    # "h == 0 or w == 0" -> "h == 0 and w == 0" (a map of zero height divided by zero).
    assert rp.roi_max_pool(torch.randn(2, 3, 4, 4), [], 2, 1.0).shape == (0, 3, 2, 2)
    flat = torch.randn(1, 3, 0, 5)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    assert torch.equal(rp.roi_max_pool(flat, rois, 2, 1.0), tv_roi_pool(flat, rois, 2, 1.0))
    assert torch.equal(rp.roi_max_pool(flat, rois, 2, 1.0), torch.zeros(1, 3, 2, 2))


def test_table_blocks_of_several_channels(monkeypatch):
    # Kills: "//" -> "/" (and "*" -> "/" inside) in the channel block size, which only shows when a
    # block holds more than one channel but not all of them: a float step for range().
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(1, 300, 8, 8, generator=gen)
    rois = torch.tensor([[0.0, 0.0, 0.0, 7.0, 7.0], [0.0, 1.0, 2.0, 6.0, 5.0]])
    # one 8x8 bin: 4 x 4 levels of 8 x 8 float32 cells, 4096 bytes per channel -> blocks of 3 channels
    monkeypatch.setattr(rp, "_TABLE_BYTES", 3 * 4096 + 100)
    assert torch.equal(rp.roi_max_pool(features, rois, 1, 1.0), tv_roi_pool(features, rois, 1, 1.0))


def test_bin_edges_are_clipped_to_the_map():
    # Kills: the clamps of bin_edges dropped (roi_max_pool gives the same result without them, but the
    # function promises cell ranges inside the map). Hand-computed on an 8 x 6 map, 2 x 3 bins:
    # RoI 1 crosses every border (15 rows in bins of 7.5, 13 columns in bins of 13/3), RoI 2 lies
    # above-left of the map, RoI 3 below-right.
    rois = torch.tensor([[0.0, -3.0, -2.0, 9.0, 12.0], [0.0, -20.0, -20.0, -11.0, -11.0], [0.0, 10.0, 12.0, 19.0, 21.0]])
    ys, ye, xs, xe = rp.bin_edges(rois, (2, 3), 1.0, 8, 6)
    assert ys.tolist() == [[0, 5], [0, 0], [8, 8]]
    assert ye.tolist() == [[6, 8], [0, 0], [8, 8]]
    assert xs.tolist() == [[0, 1, 5], [0, 0, 0], [6, 6, 6]]
    assert xe.tolist() == [[2, 6, 6], [0, 0, 0], [6, 6, 6]]


def test_module_takes_the_fast_path_exactly_when_no_gradient_is_needed(monkeypatch):
    # Kills: every mutant of RoIPool.forward's dispatch (fast path never taken, "!= cpu", dtype test
    # inverted, "and" -> "or" between grad mode and requires_grad): the results were equal either way.
    calls = []
    fast = rp.roi_max_pool
    monkeypatch.setattr(rp, "roi_max_pool", lambda *args: calls.append(1) or fast(*args))
    pool = rp.RoIPool(output_size=(3, 3), spatial_scale=0.5)
    features = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(6))
    rois = torch.tensor([[0.0, 1.0, 2.0, 20.0, 17.0]])
    expected = tv_roi_pool(features, rois, (3, 3), 0.5)
    for requires_grad, grad_mode, used in ((False, True, 1), (True, False, 1), (True, True, 0)):
        calls.clear()
        with torch.set_grad_enabled(grad_mode):
            out = pool(features.clone().requires_grad_(requires_grad), rois)
        assert len(calls) == used, (requires_grad, grad_mode)
        assert torch.equal(out.detach(), expected)
