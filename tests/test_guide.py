"""The README's "Train on your own data" walk, on a generated VOC tree that is not the synthetic default's.

The commands are the guide's, in its order, with the guide's flags; only ``--set`` overrides that shrink the
schedule (a few steps instead of thousands) are added, so the walk takes seconds: splits, check, size
statistics, train, test, draw, report, and loading the model from Python.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from detect import Detector
from detect.cli import analyze, check_dataset, convert, demo, suggest_anchors, test as test_cli, train
from tests.conftest import make_voc_tree

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "faster_rcnn" / "tiny_custom.yaml"
SHORT = ["train.max_iter=6", "train.warmup_iters=1", "train.log_period=2", "train.checkpoint_period=0",
         "pretrain.steps=4", "train.workers=0", "model.anchors.auto=false"]


def sets(values):
    return [a for v in values for a in ("--set", v)]


def test_the_guide_walks_on_a_new_voc_tree(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my_data"
    make_voc_tree(folder, num_images=15, seed=3)
    shutil.rmtree(folder / "ImageSets")                          # a folder as an annotation tool exports it
    assert convert.main(["splits", "--voc", str(folder)]) == 0
    splits = {p.stem: p.read_text().split() for p in (folder / "ImageSets" / "Main").glob("*.txt")}
    assert set(splits) == {"train", "val", "trainval", "test"} and len(splits["trainval"]) + len(splits["test"]) == 15
    assert check_dataset.main(["--voc", str(folder), "--split", "trainval"]) in (0, 1)
    assert suggest_anchors.main(["--voc", str(folder), "--config", str(CONFIG)]) == 0
    printed = capsys.readouterr().out
    assert "cat" in printed and "dog" in printed                 # the per-class size table

    assert train.main(["--config", str(CONFIG), "--set", f"data.root={folder}", "--out", "runs/mine",
                       "--no-progress", *sets(SHORT)]) == 0
    printed = capsys.readouterr().out
    assert "model.input.auto:" in printed and "VOC07 mAP on 'test'" in printed
    saved = (tmp_path / "runs" / "mine" / "config.yaml").read_text()
    assert "auto: false" in saved                                 # the chosen size is written resolved

    assert test_cli.main(["--checkpoint", "runs/mine/model_final.pt", "--no-progress"]) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in splits["test"][:2]:
        shutil.copy(folder / "JPEGImages" / f"{name}.jpg", photos)
    assert demo.main(["--checkpoint", "runs/mine", "--images", str(photos), "--out", "runs/mine/drawn",
                      "--score-thresh", "0.0", "--labels", "auto", "--legend", "--no-progress"]) == 0
    drawn = json.loads((tmp_path / "runs" / "mine" / "drawn" / "detections.json").read_text())
    assert len(drawn["images"]) == 2
    assert analyze.main(["--checkpoint", "runs/mine/model_final.pt", "--split", "test", "--out",
                         "runs/mine/report", "--occlusion", "1"]) == 0
    assert (tmp_path / "runs" / "mine" / "report" / "index.html").is_file()

    det = Detector.from_checkpoint("runs/mine/model_final.pt")
    result = det.predict([str(photos / f"{splits['test'][0]}.jpg")])[0]
    assert det.class_names == ["cat", "dog"] and set(result) == {"boxes", "scores", "labels"}
    entry = next(e for e in drawn["images"] if e["file"] == f"{splits['test'][0]}.jpg")
    kept = result["scores"] >= 0.0
    assert len(entry["detections"]) == int(kept.sum())          # the tool and the API give the same detections
    assert torch.allclose(result["scores"][kept], torch.tensor([d["score"] for d in entry["detections"]]))
