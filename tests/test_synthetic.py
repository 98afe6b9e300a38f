"""Synthetic VOC dataset: determinism, a loadable VOC tree, exact boxes, variety, reuse/overwrite rules."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detect.cli.make_synthetic import main as make_synthetic_main
from detect.data.image import read_image
from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic, render_image, synthetic_scene
from detect.data.voc import VOCDataset, read_split
from detect.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 40


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", N_IMAGES, seed=0)


@pytest.fixture(scope="module")
def records(dataset):
    with_test = VOCDataset(dataset, "trainval", classes=list(SYNTHETIC_CLASSES)).records
    return with_test + VOCDataset(dataset, "test", classes=list(SYNTHETIC_CLASSES)).records


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    again = generate_synthetic(tmp_path / "again", N_IMAGES, seed=0)
    first, second = _digests(dataset), _digests(again)
    assert len(first) == 2 * N_IMAGES + 4 + 3      # jpg + xml, 4 splits, classes/README/synthetic.json
    assert first == second
    other = _digests(generate_synthetic(tmp_path / "other", N_IMAGES, seed=1))
    assert set(other) == set(first)
    changed = [name for name in first if name.endswith(".jpg") and first[name] != other[name]]
    assert len(changed) == N_IMAGES


def test_tree_loads_and_splits_are_disjoint_and_complete(dataset, records):
    ids = {f"{i:06d}" for i in range(N_IMAGES)}
    train, val, test = (set(read_split(dataset, s)) for s in ("train", "val", "test"))
    trainval = read_split(dataset, "trainval")
    assert len(trainval) == len(set(trainval)) == len(train) + len(val)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == ids and set(trainval) == train | val
    assert (len(train), len(val), len(test)) == (24, 8, 8)
    assert [r.image_id for r in records] and {r.image_id for r in records} == ids
    assert (dataset / "classes.txt").read_text().split() == list(SYNTHETIC_CLASSES)
    assert "circle" in (dataset / "README.txt").read_text()
    assert json.loads((dataset / "synthetic.json").read_text())["num_images"] == N_IMAGES


def test_boxes_inside_images_and_annotation_matches_rendering(dataset, records):
    by_id = {r.image_id: r for r in records}
    for image_id in ("000000", "000005", "000013"):
        record = by_id[image_id]
        image = read_image(record.path)
        assert image.shape == (record.height, record.width, 3)
        scene = synthetic_scene(0, int(image_id))     # not one of the empty images (checked below)
        assert len(scene.boxes) > 0
        np.testing.assert_array_equal(record.boxes, scene.boxes)
        np.testing.assert_array_equal(record.labels, scene.labels)
        np.testing.assert_array_equal(record.difficult, scene.difficult)
        # the JPEG is the rendered scene up to compression noise
        assert np.abs(image.astype(int) - scene.image.astype(int)).mean() < 4.0
    for record in records:
        b = record.boxes
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
        assert np.all(b[:, 2] <= record.width) and np.all(b[:, 3] <= record.height)
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        assert np.array_equal(b, np.round(b))    # whole pixels: VOC stores them exactly


@pytest.mark.parametrize("seed", range(12))
def test_single_object_box_is_tight_box_of_drawn_pixels(seed):
    scene = render_image(np.random.default_rng(seed), 160, 128, num_objects=1)
    assert len(scene.boxes) == 1
    x1, y1, x2, y2 = scene.boxes[0].astype(int)
    changed = np.any(scene.image != scene.background, axis=2)
    outside = np.ones_like(changed)
    outside[y1:y2, x1:x2] = False
    assert not changed[outside].any(), "pixels outside the box differ from the background"
    # every box edge touches drawn pixels
    assert changed[y1, x1:x2].any() and changed[y2 - 1, x1:x2].any()
    assert changed[y1:y2, x1].any() and changed[y1:y2, x2 - 1].any()
    rows, cols = np.flatnonzero(scene.masks[0].any(1)), np.flatnonzero(scene.masks[0].any(0))
    assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x1, y1, x2, y2)
    if not scene.difficult[0]:   # clearly visible: 90% of its pixels far from the background
        dist = np.linalg.norm(scene.image[scene.masks[0]].astype(float) - scene.background[scene.masks[0]], axis=1)
        assert np.percentile(dist, 10) >= 35


def test_multi_object_masks_are_disjoint_and_boxes_tight():
    truncated_seen = 0
    for seed in range(10):
        scene = render_image(np.random.default_rng(100 + seed), 256, 224, num_objects=6)
        h, w = scene.image.shape[:2]
        assert scene.masks.sum(axis=0).max(initial=0) <= 1            # later objects hide earlier ones
        union = scene.masks.any(axis=0)
        assert np.array_equal(scene.image[~union], scene.background[~union])
        for mask, box, trunc in zip(scene.masks, scene.boxes, scene.truncated):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert tuple(box) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            if trunc:
                truncated_seen += 1
                assert box[0] == 0 or box[1] == 0 or box[2] == w or box[3] == h
    assert truncated_seen > 0


def test_variety_empty_truncated_difficult_sizes_classes(records):
    assert sum(len(r.boxes) == 0 for r in records) >= 2
    difficult = np.concatenate([r.difficult for r in records])
    truncated = np.concatenate([r.truncated for r in records])
    labels = np.concatenate([r.labels for r in records])
    assert 0 < difficult.mean() < 0.3 and truncated.sum() >= 3
    assert np.bincount(labels, minlength=len(SYNTHETIC_CLASSES)).min() >= 10
    widths = [r.width for r in records]
    heights = [r.height for r in records]
    assert 192 <= min(widths + heights) <= 200 and 312 <= max(widths + heights) <= 320
    boxes = np.concatenate([r.boxes for r in records])
    longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert longest.min() <= 14 and longest.max() >= 150
    assert 0.02 < (longest < 20).mean() < 0.25      # small objects exist but are a minority
    aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert aspect.min() < 0.7 and aspect.max() > 1.4


def test_reuse_overwrite_and_refusal(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "d", 6, seed=3, min_side=96, max_side=128)
    before = _digests(root)
    import detect.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "render_image", lambda *a, **k: pytest.fail("regenerated a complete dataset"))
    assert generate_synthetic(root, 6, seed=3, min_side=96, max_side=128) == root
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"d holds a synthetic dataset made with other parameters.*num_images"):
        generate_synthetic(root, 4, seed=3, min_side=96, max_side=128)
    assert _digests(root) == before
    generate_synthetic(root, 4, seed=3, min_side=96, max_side=128, overwrite=True)
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 4           # stale images removed
    assert json.loads((root / "synthetic.json").read_text())["num_images"] == 4

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="foreign is not empty and is not a synthetic dataset"):
        generate_synthetic(foreign, 4)


def test_interrupted_generation_is_redone(tmp_path):
    root = generate_synthetic(tmp_path / "d", 5, seed=2, min_side=96, max_side=128)
    reference = _digests(root)
    (root / "synthetic.json").unlink()                       # as if killed before the last write
    (root / ".synthetic-incomplete.json").write_text("{}")
    (root / "JPEGImages" / "000004.jpg").unlink()
    generate_synthetic(root, 5, seed=2, min_side=96, max_side=128)
    assert _digests(root) == reference


def test_workers_write_the_same_bytes_and_plain_style_is_its_own_dataset(tmp_path, dataset):
    parallel = generate_synthetic(tmp_path / "parallel", N_IMAGES, seed=0, workers=2)
    assert _digests(parallel) == _digests(dataset)
    plain = generate_synthetic(tmp_path / "plain", N_IMAGES, seed=0, style="plain")
    assert json.loads((plain / "synthetic.json").read_text())["style"] == "plain"
    assert "style" not in json.loads((dataset / "synthetic.json").read_text())   # older trees stay valid
    assert _digests(generate_synthetic(tmp_path / "plain2", N_IMAGES, seed=0, style="plain", workers=2)) == \
        _digests(plain)
    # Same sizes and object counts per seed, but no distractor lines or two-colour textures: the
    # plain background is smoother than the cluttered one of the same image.
    smooth = [_roughness(read_image(plain / "JPEGImages" / f"{i:06d}.jpg")) for i in range(N_IMAGES)]
    rough = [_roughness(read_image(dataset / "JPEGImages" / f"{i:06d}.jpg")) for i in range(N_IMAGES)]
    assert np.mean(smooth) < np.mean(rough)
    with pytest.raises(DatasetError, match="holds a synthetic dataset made with other parameters"):
        generate_synthetic(plain, N_IMAGES, seed=0)


def _roughness(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=1)).mean())


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 2}, "num_images must be an integer >= 3"),
    ({"style": "fancy"}, "style must be one of"),
    ({"min_side": 300, "max_side": 200}, "min_side <= max_side"),
    ({"empty_fraction": 1.5}, "empty_fraction"),
])
def test_bad_parameters_are_refused(tmp_path, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        generate_synthetic(tmp_path / "x", **{"num_images": 5, **kwargs})


def test_cli_and_tool_wrapper(tmp_path, capsys):
    assert make_synthetic_main(["--out", str(tmp_path / "a"), "--images", "4", "--min-side", "96", "--max-side", "96"]) == 0
    assert len(read_split(tmp_path / "a", "trainval")) == 3   # 1 val, 1 test, 2 train
    assert make_synthetic_main(["--out", str(tmp_path / "a"), "--images", "5", "--min-side", "96", "--max-side", "96"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a holds a synthetic dataset" in err and err.count("\n") == 1
    assert make_synthetic_main(["--out", str(tmp_path / "b"), "--images", "two"]) == 2
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--out", str(tmp_path / "c"),
                           "--images", "3", "--min-side", "64", "--max-side", "64"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_image(tmp_path / "c" / "JPEGImages" / "000002.jpg").shape == (64, 64, 3)
