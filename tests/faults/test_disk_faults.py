"""A full disk, a file-size limit, a read-only or forbidden folder: one line naming the file, exit 2, and the
files written before intact (they are written atomically).

``RLIMIT_FSIZE`` (in a forked child, with SIGXFSZ ignored) makes a real write fail with EFBIG, without
root and without filling a disk. These tests run as root, which ignores permission bits, so a read-only
(EROFS), forbidden (EACCES) or full (ENOSPC) folder is simulated by making the atomic writer's
``mkstemp`` / ``fsync`` fail with that errno.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.cli import demo, test as test_cli, train
from detect.cli.common import run_cli
from proposals import cli as proposals_cli
from tests.conftest import make_voc_tree
from tests.faults.hostile import run_forked, temp_files, tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
NAMES = ["cat", "dog"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk")
    make_voc_tree(base / "voc", num_images=4)
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / name, quality=95)
    return {"base": base, "voc": base / "voc", "images": images,
            "checkpoint": tiny_checkpoint(base / "model.pt", NAMES)}


def _only_line(lines: list[str]) -> str:
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _demo_args(setup, out: Path) -> list[str]:
    return ["--checkpoint", str(setup["checkpoint"]), "--images", str(setup["images"]), "--out", str(out),
            "--score-thresh", "0", "--device", "cpu", "--no-progress"]


def test_demo_over_the_file_size_limit_names_the_file_and_keeps_the_earlier_results(setup, tmp_path):
    out = tmp_path / "out"
    assert run_forked(lambda: demo.main(_demo_args(setup, out)))[0] == 0
    earlier = (out / "detections.json").read_bytes()
    code, err = run_forked(lambda: demo.main(_demo_args(setup, out)), file_limit=2_000)
    assert code == 2
    line = _only_line(err)
    assert str(out / "a.jpg") in line and "file too large" in line
    assert (out / "detections.json").read_bytes() == earlier and temp_files(out) == []


def test_test_tool_over_the_file_size_limit_is_one_line(setup, tmp_path):
    out = tmp_path / "results"
    args = ["--checkpoint", str(setup["checkpoint"]), "--set", "data.format=voc", "--set", f"data.root={setup['voc']}",
            "--set", "data.test_split=test", "--device", "cpu", "--no-progress", "--out", str(out)]
    code, err = run_forked(lambda: test_cli.main(args), file_limit=300)
    assert code == 2
    line = _only_line(err)
    assert f"error: {out}/" in line and "file too large" in line and temp_files(out) == []


def test_train_over_the_file_size_limit_stops_at_the_checkpoint_and_keeps_the_config(setup, tmp_path):
    out = tmp_path / "run"
    sets = ["data.format=voc", f"data.root={setup['voc']}", "data.classes=[cat,dog]", "data.train_split=test",
            "train.max_iter=2", "train.checkpoint_period=1", "train.workers=0", "train.images_per_batch=1",
            "pretrain.steps=0", "model.input.min_size=[64]", "model.input.test_min_size=64", "model.input.max_size=128"]
    args = ["--config", str(TINY), "--out", str(out), "--no-progress", "--no-test", "--device", "cpu",
            *[a for s in sets for a in ("--set", s)]]
    code, err = run_forked(lambda: train.main(args), file_limit=100_000)   # a checkpoint is ~1 MB
    assert code == 2
    line = [x for x in err if x.startswith("error: ")]
    assert len(line) == 1 and "file too large" in line[0].lower() and f"{out}/" in line[0] and ".pt" in line[0], err
    assert "Traceback" not in " ".join(err)
    assert (out / "config.yaml").read_text().startswith("data:") and temp_files(out) == []


def test_proposal_compute_over_the_file_size_limit_then_resumes(setup, tmp_path, capsys):
    store = tmp_path / "store"
    source = ["--voc", str(setup["voc"]), "--split", "test", "--store", str(store), "--mode", "single",
              "--top-k", "20", "--no-progress"]
    code, err = run_forked(lambda: proposals_cli.main(["compute", *source]), file_limit=700)
    assert code == 2
    line = _only_line(err)
    assert "part-00000-of-00001.bin" in line and "file too large" in line
    assert proposals_cli.main(["compute", *source]) == 0       # the records written before the failure are kept
    printed = capsys.readouterr().out
    assert "4 images in shard 0/1" in printed and "0 already there" not in printed and temp_files(store) == []


@pytest.mark.parametrize("code, where, message", [
    (errno.EROFS, "mkstemp", "read-only file system"),
    (errno.EACCES, "mkstemp", "permission denied"),
    (errno.ENOSPC, "fsync", "no space left on the device"),
])
def test_read_only_forbidden_or_full_folder_is_one_line_naming_the_file(setup, tmp_path, monkeypatch, capsys,
                                                                         code, where, message):
    import detect.utils.io as io_module

    out = tmp_path / "out"
    original = getattr(io_module.tempfile if where == "mkstemp" else io_module.os, where)

    def failing(*args, **kwargs):
        if where == "mkstemp" and str(out) not in str(kwargs.get("dir", "")):
            return original(*args, **kwargs)
        raise OSError(code, "simulated", *(() if where == "fsync" else (str(out / ".x.tmp"),)))

    monkeypatch.setattr(io_module.tempfile if where == "mkstemp" else io_module.os, where, failing)
    assert demo.main(_demo_args(setup, out)) == 2
    line = _only_line(capsys.readouterr().err.strip().splitlines())
    assert line == f"error: {out / 'a.jpg'}: {message} (files written before are intact; free space or fix " \
                   "the folder, then rerun)"
    assert not (out / "a.jpg").exists() and temp_files(out) == []


def test_other_os_errors_keep_their_traceback():
    def body():
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(ConnectionResetError):
        run_cli(body)


def test_eval_json_over_the_file_size_limit_is_one_line(tmp_path):
    from detect.cli import eval as eval_cli

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 50}],
                              "categories": [{"id": 1, "name": "cat"}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20],
                                               "area": 400, "iscrowd": 0}]}))
    results = tmp_path / "r.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "score": 0.5}]))
    args = ["--coco", str(gt), "--detections", str(results), "--metric", "coco", "--json", str(tmp_path / "m.json")]
    code, err = run_forked(lambda: eval_cli.main(args), file_limit=100)
    assert code == 2 and "m.json" in _only_line(err) and not (tmp_path / "m.json").exists()
