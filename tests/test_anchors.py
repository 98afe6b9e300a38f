"""Anchors against hand-computed grids and against torchvision's generator."""

import math

import pytest

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detect.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_keep_area_and_ratio():
    base = cell_anchors([16.0], [0.5, 1.0, 2.0])
    w = base[:, 2] - base[:, 0]
    h = base[:, 3] - base[:, 1]
    assert torch.allclose(w * h, torch.full((3,), 256.0))
    assert torch.allclose(h / w, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(base[1], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    assert torch.allclose(base[2], torch.tensor([-8 / math.sqrt(2), -8 * math.sqrt(2), 8 / math.sqrt(2), 8 * math.sqrt(2)]))


def test_grid_is_position_major_and_centred_in_cells():
    gen = AnchorGenerator(sizes=(32.0,), ratios=(1.0,), stride=16)
    anchors = gen(2, 3)
    assert anchors.shape == (6, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[8.0, 8.0], [24.0, 8.0], [40.0, 8.0], [8.0, 24.0], [24.0, 24.0], [40.0, 24.0]])
    assert torch.allclose(centres, expected)
    assert torch.allclose(anchors[4], torch.tensor([8.0, 8.0, 40.0, 40.0]))


def test_paper_default_has_nine_anchors_per_position():
    gen = AnchorGenerator()
    assert gen.num_anchors == 9
    anchors = gen(3, 4).view(3, 4, 9, 4)
    # anchor a of position (y, x) is number (y * W + x) * k + a
    assert torch.allclose(anchors[1, 2, 4], gen.base[4] + torch.tensor([40.0, 24.0, 40.0, 24.0]))
    areas = ((gen.base[:, 2] - gen.base[:, 0]) * (gen.base[:, 3] - gen.base[:, 1])).view(3, 3)
    assert torch.allclose(areas, torch.tensor([128.0, 256.0, 512.0]) ** 2)


def test_offset_zero_matches_torchvision():
    sizes, ratios = (32.0, 64.0), (1.0, 4.0)     # integer corners: torchvision's rounding is exact
    ours = AnchorGenerator(sizes=sizes, ratios=ratios, stride=16, offset=0.0)(5, 7)
    tv = TVAnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    images = ImageList(torch.zeros(1, 3, 80, 112), [(80, 112)])
    theirs = tv(images, [torch.zeros(1, 8, 5, 7)])[0]
    assert torch.allclose(ours, theirs)


def test_grid_cache_returns_same_values_for_new_sizes():
    # Catches a cache keyed on too little (a grid served for another size of the same area or height).
    gen = AnchorGenerator(sizes=(16.0,), ratios=(1.0,), stride=8)
    a = gen(4, 4)
    b = gen(4, 5)
    c = gen(5, 4)
    assert b.shape == (20, 4) and a.shape == (16, 4)
    assert torch.equal(gen(4, 4), a)
    for (h, w), cached in (((4, 5), b), ((5, 4), c)):
        fresh = AnchorGenerator(sizes=(16.0,), ratios=(1.0,), stride=8)(h, w)
        assert torch.equal(cached, fresh), (h, w)
        assert torch.equal(gen(h, w), fresh), (h, w)
    assert c[-1].tolist() == [20.0, 28.0, 36.0, 44.0]    # last cell of 5 rows x 4 columns: centre (28, 36)


def test_suggested_anchors_cover_small_objects_better():
    import numpy as np

    from detect.input_size import anchor_coverage, suggest_anchors

    rng = np.random.default_rng(0)
    side = np.concatenate([rng.uniform(14, 18, 100), rng.uniform(30, 34, 100), rng.uniform(60, 68, 100)])
    ratio = rng.choice([0.5, 1.0, 2.0], 300)
    w, h = side / np.sqrt(ratio), side * np.sqrt(ratio)
    sizes, ratios = suggest_anchors(w, h, 3, 3)
    assert sizes == pytest.approx([16, 32, 64], rel=0.05) and ratios == pytest.approx([0.5, 1.0, 2.0], rel=0.02)
    assert (anchor_coverage(w, h, sizes, ratios) >= 0.7).mean() > 0.95
    assert (anchor_coverage(w, h, [128, 256, 512], [0.5, 1.0, 2.0]) >= 0.5).mean() == 0
    # a box equal to an anchor shape has IoU 1
    assert anchor_coverage(np.array([16 / np.sqrt(2)]), np.array([16 * np.sqrt(2)]), [16], [2.0])[0] == pytest.approx(1)


def test_suggest_anchors_cli_on_a_voc_tree(tmp_path, capsys):
    from detect.cli.suggest_anchors import main
    from tests.conftest import make_voc_tree

    make_voc_tree(tmp_path / "voc", num_images=6)
    assert main(["--voc", str(tmp_path / "voc"), "--split", "test", "--set", "model.input.min_size=[200]"]) == 0
    out = capsys.readouterr().out
    assert "shorter side 200" in out and "suggested: sizes" in out and "    ratios: [" in out
    # per-class size table and the input-size rule: the tree's images are 80-139 px, so the rule keeps the
    # largest native shorter side (below the 256 floor) and says how many objects reach 16 px there
    from detect.data.voc import VOCDataset
    from detect.input_size import suggest_input_size

    records = VOCDataset(tmp_path / "voc", "test", classes="auto").records
    choice = suggest_input_size(records)
    assert f"recommended input size: shorter side {choice.min_size}, longer <= {choice.max_size}" in out
    assert f"    min_size: [{choice.min_size}]\n    max_size: {choice.max_size}\n" in out
    cats = sum(int((r.labels == 0).sum()) for r in records)
    assert any(line.split()[:2] == ["cat", str(cats)] for line in out.splitlines())
    # the config's own dataset instead of --voc
    assert main(["--set", "data.format=voc", "--set", f"data.root={tmp_path / 'voc'}", "--set", "data.classes=auto",
                 "--set", "data.train_split=test"]) == 0
    assert f"recommended input size: shorter side {choice.min_size}" in capsys.readouterr().out
    assert main(["--voc", str(tmp_path / "voc"), "--split", "nope"]) == 2
    assert "split file not found" in capsys.readouterr().err
