"""Backbones: declared stride/channels, freezing, frozen BN and folding, weights from cache or file (never downloaded)."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detect.backbones import BACKBONES, build_backbone, fold_frozen_batchnorm
from detect.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("name", BACKBONES)
def test_declared_geometry_matches_the_network(name):
    torch.manual_seed(0)
    backbone, head = build_backbone(name)
    backbone.eval(), head.eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 96, 128))
        vectors = head(torch.rand(2, backbone.out_channels, backbone.roi_size, backbone.roi_size))
    assert features.shape[1] == backbone.out_channels
    stride = 8 if name == "tiny8" else 16
    assert backbone.stride == stride
    # AlexNet's unpadded pools lose a cell; the others give ceil(size / stride)
    assert abs(features.shape[2] - 96 / stride) <= 1 and abs(features.shape[3] - 128 / stride) <= 1
    assert vectors.shape == (2, backbone.head_channels)
    with torch.no_grad():     # the smallest padded input survives the trunk
        assert backbone(torch.rand(1, 3, backbone.min_input_size, backbone.min_input_size)).shape[-1] >= 1


def test_freeze_at_fixes_leading_stages():
    backbone, _ = build_backbone("vgg16", freeze_at=2)
    convs = [m for m in backbone.trunk.modules() if isinstance(m, nn.Conv2d)]
    assert [c.weight.requires_grad for c in convs[:5]] == [False, False, False, False, True]   # conv1_x, conv2_x fixed
    assert len(backbone.frozen_parameters()) == 8


def test_freeze_bn_and_fold_keeps_outputs():
    torch.manual_seed(0)
    backbone, head = build_backbone("resnet18", freeze_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*backbone.modules(), *head.modules()])
    for m in backbone.modules():        # non-trivial statistics so folding is really tested
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        assert fold_frozen_batchnorm(backbone) == 1 + 4 + 5 + 5   # stem, layer1, layer2 and layer3 with downsample
        after = backbone(x)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert torch.allclose(before, after, atol=1e-4)


def test_conv1x1_equals_a_1x1_convolution_forward_and_backward():
    from detect.backbones import Conv1x1

    torch.manual_seed(0)
    fast = Conv1x1(16, 8)
    x = torch.randn(5, 16, 7, 7, requires_grad=True)
    fast(x).square().sum().backward()
    grads = (x.grad.clone(), fast.weight.grad.clone(), fast.bias.grad.clone())
    x.grad = None
    out = torch.nn.functional.conv2d(x, fast.weight, fast.bias)
    assert torch.allclose(fast(x), out, atol=1e-5)
    weight, bias = fast.weight.detach().requires_grad_(), fast.bias.detach().requires_grad_()
    torch.nn.functional.conv2d(x, weight, bias).square().sum().backward()
    for ours, ref in zip(grads, (x.grad, weight.grad, bias.grad)):
        assert torch.allclose(ours, ref, atol=1e-4)
    # a channels-last input (RoI features of the CPU inference pooling) is multiplied in place, output channels-last
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    got = fast(cl)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.allclose(got, out, atol=1e-5)


def test_trainable_batchnorm_of_tiny8_folds_with_its_running_statistics():
    torch.manual_seed(0)
    backbone, _ = build_backbone("tiny8", freeze_bn=False)
    backbone.train()
    with torch.no_grad():
        for _ in range(3):                       # running statistics away from (0, 1)
            backbone(torch.rand(2, 3, 64, 64) * 3 + 1)
    backbone.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        assert fold_frozen_batchnorm(backbone) == 5
        after = backbone(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max().item())


def test_imagenet_weights_missing_from_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(CheckpointError, match="weights=none") as err:
        build_backbone("resnet18", weights="imagenet")
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_backbone("zf", weights="imagenet")


def test_imagenet_weights_are_read_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    backbone, head = build_backbone("resnet18", weights="imagenet", freeze_bn=False)
    assert torch.equal(backbone.trunk[0][0].weight, reference.conv1.weight)
    assert torch.equal(head[0][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_local_weight_files(tmp_path):
    reference = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    backbone, head = build_backbone("alexnet", weights=str(path))
    assert torch.equal(backbone.trunk[4][0].weight, reference.features[10].weight)
    assert torch.equal(head[2].weight, reference.classifier[1].weight)
    # this module's own layout round-trips too
    own = tmp_path / "own.pth"
    torch.save({**{f"trunk.{k}": v for k, v in backbone.trunk.state_dict().items()},
                **{f"box_head.{k}": v for k, v in head.state_dict().items()}}, own)
    again, again_head = build_backbone("alexnet", weights=str(own))
    assert torch.equal(again.trunk[0][0].weight, backbone.trunk[0][0].weight)
    # files written before the per-RoI layers were called box_head name them roi_head.*
    older = tmp_path / "older.pth"
    torch.save({**{f"trunk.{k}": v for k, v in backbone.trunk.state_dict().items()},
                **{f"roi_head.{k}": v for k, v in head.state_dict().items()}}, older)
    _, old_head = build_backbone("alexnet", weights=str(older))
    assert torch.equal(old_head[2].weight, head[2].weight) and torch.equal(again_head[2].weight, head[2].weight)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("features.0")}, partial)
    with pytest.raises(CheckpointError, match="missing"):
        build_backbone("alexnet", weights=str(partial))
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("alexnet", weights=str(tmp_path / "nope.pth"))


def test_a_weights_file_may_hold_the_trunk_alone_but_each_part_whole(tmp_path):
    torch.manual_seed(0)
    pretrained, _ = build_backbone("tiny8", freeze_bn=False)
    trunk_only = tmp_path / "trunk.pth"
    torch.save({f"trunk.{k}": v for k, v in pretrained.trunk.state_dict().items()}, trunk_only)
    torch.manual_seed(1)
    backbone, head = build_backbone("tiny8", weights=str(trunk_only), freeze_bn=False)
    torch.manual_seed(1)
    _, fresh_head = build_backbone("tiny8", freeze_bn=False)
    assert all(torch.equal(v, pretrained.trunk.state_dict()[k]) for k, v in backbone.trunk.state_dict().items())
    assert all(torch.equal(v, fresh_head.state_dict()[k]) for k, v in head.state_dict().items())   # init kept
    broken = tmp_path / "broken.pth"
    torch.save({f"trunk.{k}": v for k, v in list(pretrained.trunk.state_dict().items())[1:]}, broken)
    with pytest.raises(CheckpointError, match=r"trunk: missing keys \['0.0.weight'\]"):
        build_backbone("tiny8", weights=str(broken), freeze_bn=False)
    stray = tmp_path / "stray.pth"
    torch.save({"trunk.0.0.weight": pretrained.trunk[0][0].weight, "rpn.conv.weight": torch.zeros(1)}, stray)
    with pytest.raises(CheckpointError, match="unexpected top-level keys"):
        build_backbone("tiny8", weights=str(stray), freeze_bn=False)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match="vgg16"):
        build_backbone("vgg19")
