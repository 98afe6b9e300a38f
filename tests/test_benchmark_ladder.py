"""The speed ladder (tools/benchmark.py ladder): R-CNN timed on K proposals and scaled to N, and the ladder built
from configs with random weights (tiny trunk, synthetic images)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from detect import build_model, load_config
from detect.cli import benchmark
from detect.data.loader import build_dataset
from detect.utils import speed, timing
from tests.engine_fakes import TickClock

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {key: CONFIGS / folder / "tiny_synthetic.yaml"
        for key, folder in (("rcnn", "rcnn"), ("fast", "fast_rcnn"), ("faster", "faster_rcnn"))}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Overrides that point every tiny config at the same 5 generated images (1 in 'test') at small sizes."""
    root = tmp_path_factory.mktemp("ladder") / "syn"
    # The Faster R-CNN demo config trains tiny8 on the plain style; the ladder compares like with like.
    return [f"data.root={root}", "data.synthetic_images=5", "data.synthetic_style=cluttered",
            "model.backbone.name=tiny", "model.input.min_size=[128]",
            "model.input.test_min_size=128", "model.input.max_size=224", "rcnn.crop_size=32",
            "rcnn.context_padding=2", "rcnn.window_batch=4"]


def test_rcnn_timed_on_k_proposals_and_scaled_to_n(synthetic):
    cfg = load_config(TINY["rcnn"], synthetic + ["rcnn.proposal_source=selective_search"])
    dataset = build_dataset(cfg, "test")
    torch.manual_seed(0)
    model = build_model(cfg, class_names=dataset.class_names).eval()
    model.proposals.test_top = 30                   # N: the cap the full run would use
    image, target = dataset[0]
    h, w = image.shape[-2:]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w / 2, h / 2], (40, 2))
    boxes = {target["image_id"]: np.concatenate([xy, xy + rng.uniform(8, 40, (40, 2))], 1).astype(np.float32)}
    seen = []
    region_features = model.head.region_features
    model.head.region_features = lambda net, image, props: (seen.append(len(props)), region_features(net, image, props))[1]

    _, sums = speed.time_images(model, dataset, [0], boxes, device="cpu", clock=TickClock(), sample=10)
    sampled = speed.per_image(speed.add_sums(dict(sums), sums))          # two identical images: the same mean
    assert seen == [10]                             # only K warps went through the CNN
    assert sampled["rois"] == 30 and sampled["sampled"] == 10
    assert sampled["proposals"] == 1.0              # the box lookup is not scaled
    # each lap is 1 tick: "features" is lapped twice (the transform; the warps through the CNN), the ladder's
    # "heads" three times (the SVMs, the detector's head lap, post-processing); all scaled by 30 / 10
    assert sampled["features"] == pytest.approx(2 * 3.0) and sampled["heads"] == pytest.approx(3 * 3.0)
    assert timing.time is __import__("time")       # the stage clock is put back

    full = speed.per_image(speed.time_images(model, dataset, [0], boxes, device="cpu", clock=TickClock())[1])
    assert seen[-1] == 30 and full["features"] == pytest.approx(2.0) and full["sampled"] == 30
    more = speed.per_image(speed.time_images(model, dataset, [0], boxes, device="cpu", clock=TickClock(),
                                             sample=100)[1])
    assert seen[-1] == 30 and more["features"] == pytest.approx(2.0)   # K above N runs all N, unscaled


def test_untrained_rcnn_scores_with_svms_and_regressors(synthetic):
    cfg = load_config(TINY["rcnn"], synthetic + ["rcnn.proposal_source=selective_search"])
    model = build_model(cfg, class_names=["a", "b"])
    assert not model.head.svm.trained
    benchmark._random_rcnn_heads(model)
    assert model.head.svm.trained and model.head.box_regressor.trained and float(model.head.svm.weight.abs().sum()) > 0


def test_ladder_from_configs_writes_a_timing_table(synthetic, tmp_path):
    out = tmp_path / "ladder.md"
    configs = ",".join(str(TINY[k]) for k in ("rcnn", "fast", "faster"))
    sets = [arg for s in synthetic for arg in ("--set", s)]
    assert benchmark.main(["ladder", "--from-configs", configs, *sets, "--limit", "1", "--rcnn-proposals", "8",
                           "--svd", "16,0", "--clock", "cpu", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| ") and "pipeline" not in line}
    assert set(rows) == {"R-CNN", "Fast R-CNN", "Fast R-CNN + SVD", "Faster R-CNN"}
    assert all(cells[-1].strip() == "n/a (untrained, timing only)" for cells in rows.values())
    rcnn_rois = int(rows["R-CNN"][0])
    assert rcnn_rois > 8 and rows["Fast R-CNN"][0] == rows["R-CNN"][0]       # same selective-search boxes
    assert rows["Faster R-CNN"][0].strip().startswith("≤")
    assert rows["R-CNN"][2].strip().endswith("*") and not rows["Fast R-CNN"][2].strip().endswith("*")
    assert rows["R-CNN"][1] == rows["Fast R-CNN"][1]                       # one selective-search time for both
    for cells in rows.values():                                            # total = proposals + features + heads
        p, f, h, without, total = (float(c.strip().rstrip("*")) for c in cells[1:6])
        assert total == pytest.approx(p + without, abs=2e-4) and without == pytest.approx(f + h, abs=2e-4)
    assert "first 8 proposals" in text and f"(mean {rcnn_rois})" in text and "wall total" in text
    for line in ("Fast R-CNN vs R-CNN", "Fast R-CNN + SVD (16/0) vs R-CNN", "truncated SVD cuts",
                 "Faster R-CNN vs Fast"):
        assert line in text


def test_ladder_argument_errors(synthetic, tmp_path, capsys):
    sets = [arg for s in synthetic for arg in ("--set", s)]
    fast = str(TINY["fast"])
    assert benchmark.main(["ladder", "--from-configs", fast, "--rcnn", str(tmp_path / "r.pt")]) == 2
    assert benchmark.main(["ladder", "--from-configs", f"{fast},{fast}", *sets]) == 2
    assert "at most one config each" in capsys.readouterr().err
    assert benchmark.main(["ladder", "--from-configs", str(TINY["faster"]), "--svd", "8,0", *sets]) == 2
    assert "--svd compresses the Fast R-CNN model" in capsys.readouterr().err
    assert benchmark.main(["ladder"]) == 2
    with pytest.raises(SystemExit):
        benchmark.main(["ladder", "--from-configs", fast, "--svd", "big"])
