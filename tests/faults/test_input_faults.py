"""Hostile input: decompression bombs, files that are not files, hostile XML, bad results files, bad configs.

Each is refused with one line naming the file (and the entry, line or key), exit code 2 for the
tools; a run over many images skips the bad one, lists it, and finishes the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from detect.cli import demo, eval as eval_cli, test as test_cli, train
from detect.config import Config, load_config
from detect.data.image import read_image
from detect.data.loader import DetectionDataset, Skipped, build_dataset
from detect.data.records import ImageRecord
from detect.errors import ConfigError, ImageReadError, ResultsFormatError
from detect.evaluation import evaluate_coco
from tests.conftest import make_voc_tree
from tests.faults.hostile import bomb_png, run_forked, tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
NAMES = ["cat", "dog"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", NAMES)


# --------------------------------------------------------------------------- decompression bombs


def test_pillow_global_limit_is_left_alone_and_the_default_is_pillows():
    from detect.data.image import DEFAULT_MAX_PIXELS

    # The old module raised Pillow's global limit to 1e9 for every caller in the process.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    assert DEFAULT_MAX_PIXELS == Config().data.max_image_pixels == 89_478_485


def test_bomb_is_refused_from_the_header_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 100_000                      # 76 KB in the issue; 1.2 GB as RGB
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageReadError) as info:
        read_image(bomb)
    assert decoded == []
    assert str(bomb) in str(info.value) and "20000x20000" in str(info.value) and "limit" in str(info.value)


def test_the_limit_is_configurable_also_above_pillows_hard_limit(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((200, 300, 3), 7, np.uint8)).save(path)
    with pytest.raises(ImageReadError, match="300x200"):
        read_image(path, max_pixels=59_999)
    assert read_image(path, max_pixels=60_000).shape == (200, 300, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)    # Pillow alone would refuse 60 kpx (> 2 x 10k)
    assert read_image(path, max_pixels=100_000)[0, 0].tolist() == [7, 7, 7]
    assert Image.MAX_IMAGE_PIXELS == 10_000                   # lifted for that one open, then restored


def test_training_and_test_datasets_skip_a_bomb_and_strict_makes_it_an_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    bomb = bomb_png(tmp_path / "bomb.png", 10_000, 9_000)     # 90 Mpx: just above the default limit
    records = [ImageRecord("good", good, 30, 20), ImageRecord("bomb", bomb, 10_000, 9_000)]
    dataset = DetectionDataset(records, NAMES, train=True)
    assert tuple(dataset[0][0].shape) == (3, 20, 30)
    skipped = dataset[1]
    assert isinstance(skipped, Skipped) and skipped.image_id == "bomb" and "limit" in skipped.reason
    with pytest.raises(ImageReadError, match="bomb.png"):
        DetectionDataset(records, NAMES, strict=True)[1]
    root = tmp_path / "voc"
    make_voc_tree(root, num_images=2)
    cfg = load_config(None, ["data.format=voc", f"data.root={root}", "data.classes=[cat,dog]",
                             "data.max_image_pixels=100"])            # data.max_image_pixels reaches the dataset
    item = build_dataset(cfg, "test")[0]
    assert isinstance(item, Skipped) and "100 Mpx" not in item.reason and "above the limit" in item.reason


def _folder_of_hostile_files(images: Path) -> list[str]:
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / name)
    bomb_png(images / "bomb.png", 10_000, 9_000)
    (images / "broken.jpg").symlink_to(images / "gone.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    os.mkfifo(images / "fifo.jpg")                            # opening it would block forever
    return ["a.jpg", "b.png"]


def test_demo_lists_bombs_broken_links_loops_and_fifos_and_draws_every_good_image(checkpoint, tmp_path):
    good = _folder_of_hostile_files(tmp_path / "images")
    out = tmp_path / "out"
    code, err = run_forked(lambda: demo.main(["--checkpoint", str(checkpoint), "--images", str(tmp_path / "images"),
                                              "--out", str(out), "--score-thresh", "0", "--device", "cpu",
                                              "--no-progress"]), timeout=120)
    assert code == 0, err
    report = json.loads((out / "detections.json").read_text())
    assert [e["file"] for e in report["images"]] == good
    assert all((out / name).is_file() for name in good)
    reasons = {u["file"]: u["reason"] for u in report["unreadable"]}
    assert sorted(reasons) == ["bomb.png", "broken.jpg", "fifo.jpg", "loop.jpg"]
    assert "10000x9000" in reasons["bomb.png"] and "FIFO" in reasons["fifo.jpg"]
    assert "broken symlink" in reasons["broken.jpg"] and "broken symlink" in reasons["loop.jpg"]


def test_test_tool_skips_a_bomb_and_strict_stops_at_it(checkpoint, tmp_path, capsys):
    root = tmp_path / "voc"
    make_voc_tree(root, num_images=3)
    bomb_png(root / "JPEGImages" / "img1.jpg", 10_000, 9_000)
    args = ["--checkpoint", str(checkpoint), "--set", "data.format=voc", "--set", f"data.root={root}",
            "--set", "data.test_split=test", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]
    assert test_cli.main(args) == 0
    captured = capsys.readouterr()
    assert "skipped image img1" in captured.err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["detected_images"] == 2
    assert test_cli.main([*args, "--strict"]) == 2
    assert "img1.jpg" in _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- hostile XML, bad results files

ENTITY_BOMB = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
               + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                         for i in range(1, 10))
               + ']>\n<annotation><filename>&lol9;</filename></annotation>\n')
XXE = ('<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
       '<annotation><filename>&x;</filename></annotation>\n')


@pytest.mark.parametrize("text, message", [(ENTITY_BOMB, "img0.xml"), (XXE, "img0.xml"),
                                           ("<annotation><object>\n", "img0.xml")])
def test_hostile_or_malformed_annotation_xml_is_one_line(tmp_path, capsys, text, message):
    root = tmp_path / "voc"
    make_voc_tree(root, num_images=2)
    (root / "Annotations" / "img0.xml").write_text(text)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "comp4_det_test_cat.txt").write_text("")
    code = eval_cli.main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "d"),
                          "--classes", "cat,dog"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line and "root:" not in line                  # nothing of /etc/passwd is echoed


def test_voc_results_with_nan_score_is_one_line(tmp_path, capsys):
    root = tmp_path / "voc"
    make_voc_tree(root, num_images=2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "comp4_det_test_cat.txt").write_text("img0 0.5 1 1 10 10\nimg1 nan 1 1 10 10\n")
    assert eval_cli.main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "d"),
                          "--classes", "cat,dog"]) == 2
    assert "comp4_det_test_cat.txt:2: non-finite" in _one_error_line(capsys.readouterr().err)


def _coco_ground_truth(path: Path) -> Path:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                     {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 40, 40], "area": 1600,
                           "iscrowd": 0}]}
    path.write_text(json.dumps(gt))
    return path


GOOD = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "score": 0.9}


@pytest.mark.parametrize("bad, message", [
    ({"category_id": 2}, "entry 1 has category_id 2, not a category"),
    ({"score": float("nan")}, "entry 1 has a non-finite score"),
    ({"score": float("inf")}, "entry 1 has a non-finite score"),
    ({"bbox": [10, 10, -30, 20]}, "entry 1 has a negative width or height"),
    ({"bbox": [10, 10, 30, -1]}, "entry 1 has a negative width or height"),
    ({"bbox": [10, float("nan"), 30, 20]}, "entry 1 has a non-finite bbox coordinate"),
    ({"image_id": 9}, "entry 1 has image_id 9, not an image"),
])
def test_bad_coco_results_are_one_line_naming_file_and_entry(tmp_path, capsys, bad, message):
    gt = _coco_ground_truth(tmp_path / "gt.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([GOOD, {**GOOD, "image_id": 2, "category_id": 3, **bad}]))   # NaN as JSON NaN
    assert eval_cli.main(["--coco", str(gt), "--detections", str(results), "--metric", "coco"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{results}: {message}" in line
    with pytest.raises(ResultsFormatError, match=message):            # the library refuses them too
        evaluate_coco(json.loads(gt.read_text()), json.loads(results.read_text()))


def test_good_coco_results_still_score(tmp_path, capsys):
    gt = _coco_ground_truth(tmp_path / "gt.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([GOOD, {"image_id": 2, "category_id": 3, "bbox": [5, 5, 40, 40], "score": 0.8}]))
    assert eval_cli.main(["--coco", str(gt), "--detections", str(results), "--metric", "coco"]) == 0
    assert "mAP 1.0000" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- bad configs


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  lr: 0.01   # réglé\n".encode("latin-1"))
    assert train.main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "UTF-8" in line


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
def test_yaml_python_tags_are_refused_and_never_run(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"train:\n  lr: {tag} [\"touch {marker}\"]\n")
    assert train.main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "line 2" in line and "Python tags are never executed" in line
    code = train.main(["--config", str(TINY), "--set", f"train.lr={tag} [\"touch {marker}\"]",
                       "--out", str(tmp_path / "run")])
    assert code == 2 and "train.lr" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "run" / "model_final.pt").exists()


@pytest.mark.parametrize("text, expected", [("1e-3", 0.001), ("1E4", 10000.0), ("1.5e+2", 150.0), (".5", 0.5),
                                            ("10", 10.0), ("2.", 2.0), ("-1e-1", -0.1)])
def test_float_keys_take_numbers_as_people_write_them(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text.lstrip('-')}\nrcnn:\n  svm:\n    hard_thresh: {text}\n")
    cfg = load_config(path, [f"model.rpn.smooth_l1_beta={text.lstrip('-')}"])
    assert cfg.train.lr == cfg.model.rpn.smooth_l1_beta == abs(expected) and cfg.rcnn.svm.hard_thresh == expected
    assert isinstance(cfg.train.lr, float)
    assert load_config(None, ["rcnn.score_thresh=-inf"]).rcnn.score_thresh == float("-inf")   # inf where it means "all"
    with pytest.raises(ConfigError, match="'train.max_iter' must be an integer"):
        load_config(None, ["train.max_iter=1e3"])                   # integer keys stay integers


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=-5", "'train.max_iter' must be > 0, got -5"),
    ("train.lr=-0.01", "'train.lr' must be > 0"),
    ("train.lr=0", "'train.lr' must be > 0"),
    ("train.images_per_batch=0", "'train.images_per_batch' must be > 0"),
    ("train.warmup_iters=-1", "'train.warmup_iters' must be >= 0"),
    ("pretrain.lr=-1e-3", "'pretrain.lr' must be > 0"),
    ("model.rpn.nms_thresh=1.5", "'model.rpn.nms_thresh' must be in [0, 1]"),
    ("train.lr=.nan", "'train.lr' is NaN"),
    ("train.lr=inf", "'train.lr' must be finite"),
    ("model.anchors.sizes=[32,-64]", "'model.anchors.sizes' must be > 0"),
])
def test_nonsensical_numbers_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert message in str(info.value) and str(TINY) in str(info.value)


def test_negative_max_iter_stops_train_before_it_writes_a_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--config", str(TINY), "--set", "train.max_iter=-5", "--out", str(out), "--no-progress"]) == 2
    assert "train.max_iter" in _one_error_line(capsys.readouterr().err)
    assert not (out / "model_final.pt").exists()
