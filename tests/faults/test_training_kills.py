"""kill -9 at random moments of training, inside checkpoint writes included, then resume.

Each trial compares the weights of the killed-and-resumed run with those of an uninterrupted run,
bitwise, and checks that no temp file is left. The trials are seeded (the seed and where the kill
landed are printed, and repeated in every assertion message). One trial trains the real tiny
detector through ``tools/train.py`` with two DataLoader workers and kills the trainer alone, so its
workers outlive it for a moment while the resumed run starts (they must not hold the folder).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from detect import checkpoint as ck
from detect.cli import train
from detect.engine import fit
from tests.engine_fakes import FakeDetector, fake_config, fake_dataset
from tests.faults.test_training_faults import CONFIG, tiny_args
from tests.faults.training_children import (IN_WRITE, STEP, Child, freeze_checkpoint_write, mark_steps, run,
                                            temp_files)

FAKE = dict(max_iter=12, steps=[9], checkpoint_period=2, keep_checkpoints=2)
SEEDS = range(12)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fake_dataset(tmp_path_factory.mktemp("images"))


def _fake_training(images, out: Path, *, freeze: int = 0):
    """The fake detector's training as tools/train.py --resume runs it: resumed when a checkpoint exists."""
    def target(report):
        mark_steps(report)
        if freeze:
            freeze_checkpoint_write(report, freeze)
        torch.manual_seed(0)
        cfg = fake_config(**FAKE)
        cfg.model.input.flip = True
        resume = out if ck.list_checkpoints(out / "checkpoints") else None
        fit(FakeDetector(), images, cfg, out_dir=out, resume=resume, progress=False, log=print)
        return 0
    return target


def _weights(path: Path) -> dict:
    return ck.load_checkpoint(path)["model"]


def _assert_same(reference: dict, resumed: dict, what: str) -> None:
    assert reference.keys() == resumed.keys(), what
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), f"{what}: {name} differs"


@pytest.fixture(scope="module")
def fake_reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    code, printed = run(_fake_training(images, out), log=out / "log.txt")
    assert code == 0, printed
    return _weights(out / "model_final.pt")


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_at_a_random_moment_then_resumed_ends_bitwise_equal(seed, images, fake_reference, tmp_path):
    rng = random.Random(seed)
    after_steps, delay = rng.randint(1, FAKE["max_iter"] - 1), rng.uniform(0.0, 0.01)
    what = f"seed {seed}: kill -9 {delay * 1000:.1f} ms after iteration {after_steps}"
    print(what)
    out = tmp_path / "run"
    child = Child(_fake_training(images, out), log=tmp_path / "killed.log")
    alive = child.wait_for(STEP, after_steps)
    if alive:
        time.sleep(delay)
    child.kill()
    print(f"{what}: exit {child.status}, checkpoints {[i for i, _ in ck.list_checkpoints(out / 'checkpoints')]}, "
          f"temp files {temp_files(out)}")
    code, printed = run(_fake_training(images, out), log=tmp_path / "resumed.log")
    assert code == 0, f"{what}: {printed}"
    _assert_same(fake_reference, _weights(out / "model_final.pt"), what)
    assert temp_files(out) == [], what


@pytest.mark.parametrize("write", [3, 7])   # ckpt_0000006.pt; model_final.pt (after the last ckpt)
def test_killed_inside_a_checkpoint_write_then_resumed_ends_bitwise_equal(write, images, fake_reference, tmp_path):
    what = f"kill -9 inside checkpoint write #{write}"
    out = tmp_path / "run"
    child = Child(_fake_training(images, out, freeze=write), log=tmp_path / "killed.log")
    assert child.wait_for(IN_WRITE), f"{what}: {child.text()}"
    child.kill()
    left = temp_files(out)
    assert len(left) == 1, f"{what}: {left}"   # the kill did land inside the write
    code, printed = run(_fake_training(images, out), log=tmp_path / "resumed.log")
    assert code == 0, f"{what}: {printed}"
    _assert_same(fake_reference, _weights(out / "model_final.pt"), what)
    assert temp_files(out) == [], what


def _real_training(out: Path, synth: Path, *, resume: bool = False, freeze: int = 0):
    """tools/train.py on the real tiny detector with 2 DataLoader workers (the resumed run: ``--resume``)."""
    def target(report):
        mark_steps(report)
        if freeze:
            freeze_checkpoint_write(report, freeze)
        return train.main(tiny_args(out, synth, "train.workers=2", resume=resume))
    return target


@pytest.fixture(scope="module")
def real_reference(tmp_path_factory):
    if not CONFIG.is_file():
        pytest.skip("configs/faster_rcnn/tiny_synthetic.yaml not present")
    base = tmp_path_factory.mktemp("real")
    code, printed = run(_real_training(base / "ref", base / "synth"), log=base / "ref.log")
    assert code == 0, printed
    return base / "synth", _weights(base / "ref" / "model_final.pt")


def test_real_detector_with_workers_killed_inside_a_write_resumes_bitwise_equal(real_reference, tmp_path):
    """Issue 17: the real tiny Faster R-CNN, 2 DataLoader workers, a real kill -9 of the trainer process."""
    synth, reference = real_reference
    out = tmp_path / "run"
    child = Child(_real_training(out, synth, freeze=2), log=tmp_path / "killed.log")   # inside ckpt_0000004.pt
    try:
        assert child.wait_for(IN_WRITE, timeout=120), child.text()
        child.kill(group=False)   # the trainer only: its 2 workers live on a few seconds, holding its files open
        print(f"workers of the killed trainer still running when the resumed run starts: {child.group_alive()}")
        assert [p.split(".pt.")[0] for p in temp_files(out)] == [".ckpt_0000004"]
        code, printed = run(_real_training(out, synth, resume=True), log=tmp_path / "resumed.log")
    finally:
        child.kill()
    assert code == 0, printed
    assert "ckpt_0000002.pt at iteration 2" in printed and "removed 1 temp file(s)" in printed
    _assert_same(reference, _weights(out / "model_final.pt"), "real detector")
    assert temp_files(out) == []


@pytest.mark.parametrize("seed", [0])
def test_real_detector_killed_at_a_random_moment_resumes_bitwise_equal(seed, real_reference, tmp_path):
    synth, reference = real_reference
    rng = random.Random(seed)
    after_steps, delay = rng.randint(1, 5), rng.uniform(0.0, 0.2)
    what = f"real detector, seed {seed}: kill -9 {delay * 1000:.0f} ms after iteration {after_steps}"
    print(what)
    out = tmp_path / "run"
    child = Child(_real_training(out, synth), log=tmp_path / "killed.log")
    try:
        if child.wait_for(STEP, after_steps, timeout=120):
            time.sleep(delay)
        child.kill()
        print(f"{what}: exit {child.status}, checkpoints {[i for i, _ in ck.list_checkpoints(out / 'checkpoints')]}")
        code, printed = run(_real_training(out, synth, resume=True), log=tmp_path / "resumed.log")
    finally:
        child.kill()
    assert code == 0, f"{what}: {printed}"
    _assert_same(reference, _weights(out / "model_final.pt"), what)
    assert temp_files(out) == [], what
