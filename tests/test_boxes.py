"""Box coder: hand-computed deltas, round trip, exp clamp, clipping, degenerate boxes."""

import math

import pytest
import torch

from detect.boxes import DEFAULT_SCALE_CLAMP, BoxCoder, clip_boxes, degenerate_box_problem


def test_encode_matches_hand_computed_deltas():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[5.0, 5.0, 15.0, 25.0]])     # centre (10, 15), 10 x 20
    deltas = BoxCoder().encode(box, ref)
    assert torch.allclose(deltas, torch.tensor([[0.5, 1.0, 0.0, math.log(2.0)]]))
    weighted = BoxCoder(weights=(10, 10, 5, 5)).encode(box, ref)
    assert torch.allclose(weighted, torch.tensor([[5.0, 10.0, 0.0, 5 * math.log(2.0)]]))


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    ref = torch.cat([xy, xy + 1 + torch.rand(200, 2, generator=g) * 300], 1)
    xy = torch.rand(200, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 1 + torch.rand(200, 2, generator=g) * 300], 1)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(coder.decode(coder.encode(boxes, ref), ref), boxes, atol=1e-3)


def test_class_specific_decode_keeps_shape():
    coder = BoxCoder()
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0]])
    deltas = torch.zeros(2, 3 * 4)
    out = coder.decode(deltas, ref)
    assert out.shape == (2, 12)
    assert torch.equal(out.view(2, 3, 4)[:, 2], ref)


def test_decode_clamps_huge_scales_so_nothing_overflows():
    coder = BoxCoder()
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), ref)
    assert torch.isfinite(out).all()
    assert out[0, 2] - out[0, 0] == pytest.approx(16 * math.exp(DEFAULT_SCALE_CLAMP), rel=1e-4)


def test_clip_boxes_uses_each_images_size():
    boxes = torch.tensor([[[-5.0, -5.0, 50.0, 50.0]], [[-5.0, 2.0, 50.0, 50.0]]])
    out = clip_boxes(boxes, torch.tensor([40, 20]), torch.tensor([30, 60]))
    assert out.tolist() == [[[0.0, 0.0, 30.0, 40.0]], [[0.0, 2.0, 50.0, 20.0]]]


def test_degenerate_boxes_are_named():
    assert degenerate_box_problem(torch.tensor([[0.0, 0.0, 1.0, 1.0]])) is None
    assert "#1" in degenerate_box_problem(torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 9.0]]))
    assert "not finite" in degenerate_box_problem(torch.tensor([[0.0, 0.0, float("nan"), 1.0]]))
    assert "shape" in degenerate_box_problem(torch.zeros(3))


def test_encode_on_batched_boxes_equals_row_by_row():
    # Found by mutation testing: stacking the deltas on dim=1 instead of dim=-1 passed on (N, 4) inputs;
    # (images, boxes, 4) inputs must give each box its own (dx, dy, dw, dh).
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 3, 2, generator=g) * 50
    ref = torch.cat([xy, xy + 5 + torch.rand(2, 3, 2, generator=g) * 20], -1)
    boxes = ref + torch.rand(2, 3, 4, generator=g) * 4
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    batched = coder.encode(boxes, ref)
    assert batched.shape == (2, 3, 4)
    assert torch.equal(batched.reshape(6, 4), coder.encode(boxes.reshape(6, 4), ref.reshape(6, 4)))


def test_decode_and_clip_keep_the_dtype_of_the_boxes():
    # Found by mutation testing: without reference.to(deltas.dtype) a float64 reference turned float32
    # deltas into float64 boxes; the same for clip_boxes with float64 image sizes.
    coder = BoxCoder()
    out = coder.decode(torch.tensor([[0.1, -0.2, 0.3, 0.0]]), torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64))
    assert out.dtype == torch.float32
    half_w = 0.5 * math.exp(0.3) * 10.0
    # centre (6, 6), 2 * half_w wide, 20 tall
    assert out[0].tolist() == pytest.approx([6.0 - half_w, -4.0, 6.0 + half_w, 16.0], abs=1e-5)
    clipped = clip_boxes(torch.tensor([[[-1.0, 2.5, 70.0, 50.0]]]), torch.tensor([40.0], dtype=torch.float64),
                         torch.tensor([60.0], dtype=torch.float64))
    assert clipped.dtype == torch.float32 and clipped.tolist() == [[[0.0, 2.5, 60.0, 40.0]]]


def test_weights_must_be_four_numbers():
    with pytest.raises(ValueError, match=r"box coder weights must have 4 values \(dx, dy, dw, dh\), got \[1, 2, 3\]"):
        BoxCoder(weights=(1, 2, 3))


def test_degenerate_box_problem_names_the_right_row_and_axis():
    # Found by mutation testing: the row of a non-finite box, a zero height, x2 compared with y1, and a
    # 1-D tensor of 4 numbers were never checked.
    assert degenerate_box_problem(torch.tensor([[0.0, 10.0, 5.0, 20.0]])) is None      # x2 < y1 is fine
    flat = torch.tensor([[5.0, 5.0, 9.0, 5.0]])                                          # zero height
    assert degenerate_box_problem(flat) == "box #0 [5.0, 5.0, 9.0, 5.0] has no area (need x2 > x1 and y2 > y1)"
    nan_row = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, float("inf"), 1.0, 1.0]])
    assert degenerate_box_problem(nan_row) == "box #1 [0.0, inf, 1.0, 1.0] is not finite"
    assert degenerate_box_problem(torch.zeros(4)) == "boxes must have shape (N, 4), got (4,)"
