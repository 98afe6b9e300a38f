"""Truncated SVD of fc layers (Fast R-CNN Sec. 3.1): error within the rank's bound, smaller model, same API."""

import copy

import pytest
import torch
from torch import nn

from detect.svd import TruncatedLinear, compress_fc, fc_layers, truncate_linear


def test_truncated_layer_error_is_within_the_first_dropped_singular_value():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    singular = torch.linalg.svdvals(layer.weight.detach())
    x = torch.randn(200, 64)
    dense = layer(x)
    for rank in (4, 16, 40):
        approx = truncate_linear(layer, rank)(x)
        err = (approx - dense).norm(dim=1)
        bound = singular[rank] * x.norm(dim=1)
        assert (err <= bound * 1.0001 + 1e-5).all()
        assert err.mean() > 0.05 * bound.mean()          # really truncated, not a copy
    full = truncate_linear(layer, 48)(x)
    assert torch.allclose(full, dense, atol=1e-4)


def test_low_rank_weights_are_reproduced_exactly_and_parameters_shrink():
    torch.manual_seed(0)
    layer = nn.Linear(100, 80)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 5) @ torch.randn(5, 100))
    small = truncate_linear(layer, 5)
    x = torch.randn(10, 100)
    assert torch.allclose(small(x), layer(x), atol=1e-3)
    assert sum(p.numel() for p in small.parameters()) == 5 * (100 + 80) + 80


def test_compress_fc_replaces_fc6_and_fc7_in_order():
    # Catches ranks given to the wrong layers, a layer left out, or weights not carried over.
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU())
    original = copy.deepcopy(head)
    report = compress_fc(head, [8, 4])
    layers = [layer for _, _, layer in fc_layers(head)]
    assert [type(l) for l in layers] == [TruncatedLinear, TruncatedLinear] and [l.rank for l in layers] == [8, 4]
    assert "fc6: 20x30 -> rank 8" in report[0] and "fc7" in report[1]
    x = torch.randn(2, 30)
    by_hand = torch.relu(truncate_linear(original[3], 4)(torch.relu(truncate_linear(original[1], 8)(x))))
    assert torch.allclose(head(x), by_hand, atol=1e-5)
    kept = copy.deepcopy(original)                   # full rank: the same function
    compress_fc(kept, [20, 10])
    assert torch.allclose(kept(x), original(x), atol=1e-4) and not torch.allclose(head(x), original(x), atol=1e-3)
    with pytest.raises(ValueError, match="already factorised"):
        compress_fc(head, [4])
    with pytest.raises(ValueError, match="outside"):
        truncate_linear(nn.Linear(3, 2), 3)
    with pytest.raises(ValueError, match="1 fully connected"):
        compress_fc(nn.Sequential(nn.Linear(4, 4)), [2, 2])
