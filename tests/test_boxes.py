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
