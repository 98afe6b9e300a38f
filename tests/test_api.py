"""The README's Python-API example, run as written against a checkpoint of each pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect import Detector, build_model, load_config
from detect.checkpoint import save_checkpoint
from detect.config import config_to_dict
from detect.data.image import read_image
from detect.data.loader import image_to_tensor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PATH = "runs/quickstart/train/model_final.pt"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its api-example block"
    return match.group(1)


def checkpoint(pipeline: str, where: Path) -> Path:
    overrides = ["model.backbone.weights=none", "data.classes=auto", "model.num_classes=0",
                 "model.roi_heads.score_thresh=0.0", "rcnn.crop_size=32", "rcnn.context_padding=2",
                 "proposals.mode=single", "proposals.max_side=96"]
    cfg = load_config(ROOT / "configs" / pipeline / "tiny_synthetic.yaml", overrides)
    torch.manual_seed(0)
    names = ["cat", "dog"]
    model = build_model(cfg, class_names=names)
    return save_checkpoint(where, model=model, config=config_to_dict(cfg), class_names=names)


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view); returns its pixels as viewed."""
    stored = (np.random.default_rng(0).uniform(0, 255, (60, 90, 3))).astype(np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return read_image(path)


@pytest.mark.parametrize("pipeline", ["faster_rcnn", "fast_rcnn", "rcnn"])
def test_readme_example_runs_as_written(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / EXAMPLE_PATH).parent.mkdir(parents=True)
    checkpoint(pipeline, tmp_path / EXAMPLE_PATH)
    viewed = exif_rotated_jpeg(tmp_path / "a.jpg")
    Image.fromarray(viewed).save(tmp_path / "b.jpg", quality=95)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    det, results = namespace["det"], namespace["results"]
    assert isinstance(det, Detector) and det.class_names == ["cat", "dog"]
    assert len(results) == 4 and all(set(r) == {"boxes", "scores", "labels"} for r in results)
    assert capsys.readouterr().out.count("\n") == sum(len(r["scores"]) for r in results)
    # every form gives what the tensors of its pixels give (one batch: padding is shared); the path is read
    # upright (EXIF applied), the PIL image too
    assert viewed.shape[:2] == (90, 60)
    pixels = [image_to_tensor(viewed), image_to_tensor(read_image(tmp_path / "b.jpg"))]
    expected = det.predict([pixels[0], pixels[1], pixels[1], namespace["tensor"]])
    assert len(results[0]["scores"]) > 0
    for got, want in zip(results, expected):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(got[k], want[k])
    assert (results[0]["boxes"][:, 2] <= 60 + 1e-3).all() and (results[0]["boxes"][:, 3] <= 90 + 1e-3).all()


def test_from_checkpoint_needs_the_package_entry_point(monkeypatch, tmp_path):
    # Detector.from_checkpoint is wired by detect.build; without it the error says how to import it.
    monkeypatch.setattr(Detector, "loader", None)
    with pytest.raises(RuntimeError, match="from detect import Detector"):
        Detector.from_checkpoint(tmp_path / "x.pt")
