"""detect.roi_pool: the range-maximum RoI pooling equals torchvision's RoIPool bit for bit."""

import math

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


def _c_round(v: float) -> int:
    return math.floor(v + 0.5) if v >= 0 else math.ceil(v - 0.5)


def reference_roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], scale: float):
    """RoI max pooling bin by bin, as torchvision's kernel documents it, in plain Python and torch.

    Float64 only (Python floats are doubles, so the bin edges are the kernel's exactly). Returns the
    (K, C, ph, pw) output and a function mapping an upstream gradient of that shape to the gradient
    of ``features``: each bin's gradient goes to its first maximum (row-major), none from empty bins.
    """
    assert features.dtype == rois.dtype == torch.float64
    ph, pw = output_size
    n, c, h, w = features.shape
    out = features.new_zeros(len(rois), c, ph, pw)
    targets = []                           # (roi, bin row, bin col, flat index into features) per bin
    for k, (b, *corners) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (_c_round(v * scale) for v in corners)
        bin_h, bin_w = max(y2 - y1 + 1, 1) / ph, max(x2 - x1 + 1, 1) / pw
        for i in range(ph):
            ys = min(max(math.floor(i * bin_h) + y1, 0), h)
            ye = min(max(math.ceil((i + 1) * bin_h) + y1, 0), h)
            for j in range(pw):
                xs = min(max(math.floor(j * bin_w) + x1, 0), w)
                xe = min(max(math.ceil((j + 1) * bin_w) + x1, 0), w)
                if ye <= ys or xe <= xs:
                    continue                                   # empty bin: 0, and no gradient
                value, pos = features[int(b), :, ys:ye, xs:xe].reshape(c, -1).max(dim=1)
                out[k, :, i, j] = value
                flat = int(b) * c * h * w + torch.arange(c) * h * w + (ys + pos // (xe - xs)) * w + xs + pos % (xe - xs)
                targets.append((k, i, j, flat))

    def backward(upstream: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros(n * c * h * w, dtype=upstream.dtype)
        for k, i, j, flat in targets:
            grad.index_add_(0, flat, upstream[k, :, i, j])
        return grad.view(n, c, h, w)

    return out, backward


def test_reference_is_a_max_pool():
    """The hand-built reference itself, on a case worked out by hand."""
    features = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0], [0.0, 2.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    out, backward = reference_roi_pool(features, rois, (2, 2), 1.0)
    assert out[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    assert out[1, 0].tolist() == [[6.0, 6.0], [6.0, 6.0]]       # a one-cell RoI: every bin is that cell
    grad = backward(torch.ones(2, 1, 2, 2, dtype=torch.float64))
    expected = torch.zeros(16, dtype=torch.float64)
    expected[[5, 7, 13, 15]] = 1.0
    expected[6] = 4.0
    assert torch.equal(grad.view(-1), expected)


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


def test_training_and_inference_paths_equal_a_hand_built_max_pool():
    """Catches a broken roi_max_pool (the inference path) and a broken backward (the training path).

    Both paths of the module are compared with :func:`reference_roi_pool`, not with torchvision
    (the training path *is* torchvision's kernel). ReLU'd maps have ties (zeros): the gradient goes
    to the first maximum.
    """
    gen = torch.Generator().manual_seed(5)
    pool = rp.RoIPool(output_size=(7, 7), spatial_scale=0.125)
    for trial in range(16):
        features, rois, _, _ = _random_case(gen, trial)
        features, rois = features.double(), rois.double()
        if trial % 2:
            features = features.relu().contiguous(memory_format=torch.channels_last)
        expected, backward = reference_roi_pool(features, rois, (7, 7), 0.125)
        with torch.no_grad():
            assert torch.equal(pool(features, rois), expected), f"trial {trial}: inference path"
        leaf = features.clone().requires_grad_(True)
        out = pool(leaf, rois)
        assert torch.equal(out, expected), f"trial {trial}: training path"
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(upstream)
        assert torch.allclose(leaf.grad, backward(upstream), rtol=0, atol=1e-12), f"trial {trial}: gradient"


def test_gradient_passes_gradcheck():
    """Finite differences of the module's own forward agree with its backward (float64, no ties)."""
    gen = torch.Generator().manual_seed(7)
    pool = rp.RoIPool(output_size=(3, 2), spatial_scale=0.5)
    features = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 17.0, 12.0], [1, 0.0, 0.0, 21.0, 17.0], [1, 6.0, 4.0, 9.0, 30.0],
                         [0, 15.0, 15.0, 15.0, 15.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: pool(f, rois), (features,), eps=1e-6, atol=1e-6)


def test_module_is_a_torchvision_roipool_with_the_same_results():
    gen = torch.Generator().manual_seed(2)
    pool = rp.RoIPool(output_size=(4, 4), spatial_scale=0.5)
    features = torch.randn(1, 3, 16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 2.0, 20.0, 25.0], [0.0, 0.0, 0.0, 31.0, 31.0]], dtype=torch.float64)
    out = pool(features, rois)
    out.sum().backward()
    expected, backward = reference_roi_pool(features.detach(), rois, (4, 4), 0.5)
    assert torch.equal(out.detach(), expected)
    assert torch.allclose(features.grad, backward(torch.ones_like(expected)), rtol=0, atol=1e-12)
    with torch.inference_mode():
        assert torch.equal(pool(features.detach(), rois), expected)
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


# ---------------------------------------------------------------------------------------------------------------------
# Rounding of the scaled corners just below a half (found by mutation testing): floor(v + 0.5) rounds 0.49999997 up.

@pytest.mark.parametrize("scale", [0.1, 1 / 3, 0.7])
def test_corners_just_below_a_half_round_like_torchvision(scale):
    features = torch.arange(64.0).reshape(1, 1, 8, 8)
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))          # 0.49999997 in float32
    corner = float(below_half / torch.tensor(scale, dtype=torch.float32))
    rois = torch.tensor([[0.0, 0.0, 0.0, corner * 9, corner * 9],
                         [0.0, corner, corner, 7.0, 7.0],
                         [0.0, 0.0, 0.0, 4.9999995, 4.9999995]])
    expected = tv_roi_pool(features, rois, (2, 2), scale)
    with torch.no_grad():
        got = rp.roi_max_pool(features, rois, (2, 2), scale)
    assert torch.equal(got, expected)
