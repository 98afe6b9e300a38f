"""Shared fixtures: a tiny hand-made VOC tree (with difficult and truncated objects).

Also pins the CPU kernels to AVX2 for the whole suite (and every subprocess a test starts), before
torch is imported: ATen's vectorised kernels (``ATEN_CPU_CAPABILITY``) and oneDNN's convolutions
(``ONEDNN_MAX_CPU_ISA``) otherwise pick AVX-512 code where the CPU has it, whose results differ in the
last bits. The bitwise golden tests (``test_one_detector``) and the trained-model thresholds were
recorded with AVX2 kernels, and on an AVX-512 EPYC they failed without this (2026-12-02). A CPU
without AVX-512 runs the same kernels either way; set the variables yourself to test other kernels.
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from detect.data.records import ImageRecord  # noqa: E402
from detect.data.voc import VOCDataset, write_annotation, write_split  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_voc_tree(root: Path, num_images: int = 6, seed: int = 0) -> tuple[list[str], list[str]]:
    """Write a small VOC tree: images ``img<i>.jpg``, classes ``cat``/``dog``, split ``test``."""
    rng = np.random.default_rng(seed)
    names = ["cat", "dog"]
    ids = []
    for i in range(num_images):
        w, h = int(rng.integers(80, 140)), int(rng.integers(80, 140))
        path = root / "JPEGImages" / f"img{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        n = int(rng.integers(1, 4))
        xy = rng.integers(0, 40, (n, 2))
        wh = rng.integers(10, 40, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
        record = ImageRecord(f"img{i}", path, w, h, boxes, rng.integers(0, 2, n), rng.random(n) < 0.25, rng.random(n) < 0.3)
        write_annotation(root / "Annotations" / f"img{i}.xml", record, names)
        ids.append(f"img{i}")
    write_split(root, "test", ids)
    return ids, names


@pytest.fixture
def voc_tree(tmp_path):
    root = tmp_path / "voc"
    _, names = make_voc_tree(root)
    data = VOCDataset(root, "test", classes=names)
    return root, data.records, names


def pytest_configure(config):
    # tests/test_fast_inference.py: inductor compiles C++ kernels (a minute on 2 busy cores, uncached)
    config.addinivalue_line("markers", "slow: compiles with torch.compile; deselect with -m 'not slow'")
