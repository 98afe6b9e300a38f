"""The training-time ladder (tools/benchmark.py training): each pipeline's stages timed, the table's sums, ratios."""

from pathlib import Path

import pytest

from detect.cli import benchmark
from detect.utils.training_speed import cpu_model, load_training_configs
from tests.engine_fakes import TickClock

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [CONFIGS / folder / "tiny_synthetic.yaml" for folder in ("rcnn", "fast_rcnn", "faster_rcnn")]


def _sets(root):
    """Every tiny config on the same 5 generated images, small inputs and warps, few proposals."""
    sets = [f"data.root={root}", "data.synthetic_images=5", "data.synthetic_style=cluttered",
            "model.backbone.name=tiny", "model.input.min_size=[128]", "model.input.test_min_size=128",
            "model.input.max_size=224", "rcnn.crop_size=32", "rcnn.context_padding=2", "rcnn.window_batch=64",
            "proposals.mode=single", "proposals.top_k=60", "train.images_per_batch=2", "pretrain.steps=0"]
    return [arg for s in sets for arg in ("--set", s)]


def test_training_ladder_times_each_pipelines_stages(tmp_path, monkeypatch, capsys):
    """Catches a stage timed twice or not at all, the shared proposal store counted once, a wrong ratio, and a
    stage that does not run (R-CNN's SVMs and regressors untrained, other iteration counts)."""
    monkeypatch.setitem(benchmark.CLOCKS, "cpu", TickClock())
    out = tmp_path / "training.md"
    args = ["training", "--configs", ",".join(map(str, TINY)), *_sets(tmp_path / "syn"), "--limit", "4",
            "--iters", "2", "--threads", "1", "--run-dir", str(tmp_path / "runs"), "--out", str(out)]
    assert benchmark.main(args) == 0
    table = out.read_text()
    assert table.startswith(cpu_model() + "; 1 thread(s); CPU seconds (this process). 4 training images, "
                            "2 iterations of 2 images")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "pipeline" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")][:7] for row in rows]
    assert cells == [["R-CNN", "1.0", "1.0", "1.0", "1.0", "1.0", "5.0"],
                     ["Fast R-CNN", "1.0*", "1.0", "-", "-", "-", "2.0"],
                     ["Faster R-CNN", "-", "1.0", "-", "-", "-", "1.0"]]
    assert "- Fast R-CNN trains 2.5x faster than R-CNN (4.0x without proposals" in table
    assert "- Faster R-CNN trains 2.0x faster than Fast R-CNN" in table
    assert (tmp_path / "runs" / "rcnn" / "features" / "meta.json").is_file()     # stage 2 wrote its cache
    assert len(list((tmp_path / "runs" / "proposals").glob("*/*/proposals.bin"))) == 1   # one store, filled once


def test_streaming_rcnn_times_features_and_svms_together(tmp_path):
    from detect.utils.training_speed import time_training

    configs = load_training_configs([TINY[0]], [s for s in _sets(tmp_path / "syn") if s != "--set"]
                                    + ["rcnn.feature_cache_mode=streaming"], iters=2)
    runs = time_training(configs, out_dir=tmp_path / "runs", limit=3, clock=TickClock(), log=lambda m: None)
    rcnn = runs["rcnn"]
    assert rcnn["seconds"] == {"proposals": 1.0, "train": 1.0, "features": 1.0, "svm": 0.0, "bbox": 1.0}
    assert rcnn["model"].head.svm.trained and rcnn["model"].head.box_regressor.trained and rcnn["images"] == 3
    assert not (tmp_path / "runs" / "rcnn" / "features").exists()                # nothing cached on disk


def test_training_ladder_refuses_a_pipeline_twice(tmp_path):
    from detect.errors import ConfigError

    with pytest.raises(ConfigError, match="a second 'rcnn' config"):
        load_training_configs([TINY[0], TINY[0]], [], iters=2)
