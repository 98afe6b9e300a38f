"""Training and checkpoints under faults: divergence, a second writer, partial and corrupt files, a full disk.

Each test names the failure of issue 13 it holds. The real tiny detector runs in-process through
``tools/train.py``'s ``main``; runs that must be killed or limited run in forked children
(:mod:`tests.faults.training_children`).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from detect import checkpoint as ck
from detect.cli import train
from detect.config import Config, config_to_dict
from detect.engine import TrainingDiverged, fit
from detect.errors import CheckpointError
from detect.runlog import RunDirBusy, lock_run_dir
from tests.engine_fakes import CLASSES, FakeDetector, fake_config, fake_dataset
from tests.faults.training_children import IN_WRITE, Child, freeze_checkpoint_write, run, temp_files

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"


def tiny_args(out: Path, synth: Path, *sets: str, resume: bool = False) -> list[str]:
    """tools/train.py on the real tiny detector: 12 synthetic images at 160 px, 6 iterations."""
    base = [f"data.root={synth}", "data.synthetic_images=12", "pretrain.steps=0", "train.max_iter=6",
            "train.checkpoint_period=2", "train.eval_period=0", "train.images_per_batch=2", "train.workers=0",
            "train.warmup_iters=0", "train.log_period=2", "model.input.min_size=[160]",
            "model.input.test_min_size=160", *sets]
    return ["--config", str(CONFIG), "--out", str(out), "--no-progress", "--no-test",
            *(["--resume"] if resume else []), *[a for s in base for a in ("--set", s)]]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    if not CONFIG.is_file():
        pytest.skip("configs/faster_rcnn/tiny_synthetic.yaml not present")
    return tmp_path_factory.mktemp("synth") / "data"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fake_dataset(tmp_path_factory.mktemp("images"))


def _all_finite(path: Path) -> bool:
    payload = torch.load(path, weights_only=True)
    tensors = list(payload["model"].values())
    tensors += [v for s in payload.get("optimizer", {}).get("state", {}).values() for v in s.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------- failure 1: divergence


@pytest.mark.parametrize("optimizer,lr,why", [("sgd", "10000.0", "exploded"), ("adamw", "10000.0", "exploded"),
                                              ("sgd", "1.0e+30", "")])
def test_a_diverging_run_stops_with_one_line_and_leaves_no_poisoned_checkpoint(optimizer, lr, why, synth, tmp_path,
                                                                               capsys):
    """Issue 13 failure 1: SGD at lr 1e4 exited 0 with inf BatchNorm variances in every checkpoint; AdamW
    reached a loss of 5e21 silently; at lr 1e30 a checkpoint with NaN/inf was saved before the guard fired."""
    out = tmp_path / "run"
    code = train.main(tiny_args(out, synth, f"train.optimizer={optimizer}", f"train.lr={lr}",
                                "train.checkpoint_period=1"))
    err = capsys.readouterr().err
    written = sorted((out / "checkpoints").glob("ckpt_*")) if (out / "checkpoints").is_dir() else []
    assert all(_all_finite(p) for p in written), [p.name for p in written if not _all_finite(p)]
    assert code == 2 and not (out / "model_final.pt").exists()
    line = _one_error_line(err)
    assert line.startswith("error: training diverged at iteration ") and "on images ['" in line and why in line
    # --resume can choose none of them: each was written from the state that took off, or later
    assert ck.list_checkpoints(out / "checkpoints") == []


def test_a_single_exploded_batch_is_skipped_and_the_run_goes_on(images, tmp_path):
    class Spiky(FakeDetector):
        def loss(self, images, targets):
            losses = super().loss(images, targets)
            if self.calls == 5:    # the 5th step sees a loss 1e6 x the others (a corrupt box, say)
                losses["loss_box"] = losses["loss_box"] + 1e6
            return losses

    model = Spiky()
    messages = []
    torch.manual_seed(0)
    result = fit(model, images, fake_config(max_iter=8, checkpoint_period=0), out_dir=tmp_path, progress=False,
                 log=messages.append)
    skipped = [m for m in messages if "step skipped" in m]
    assert result["iteration"] == 8 and len(skipped) == 1
    assert skipped[0].startswith("iteration 5: loss 1e+06 exploded (over 1000x its running median")


class _Poisoner(FakeDetector):
    """A BatchNorm-like buffer, and planted faults on one call of ``loss``."""

    def __init__(self, *, poison_buffer_at: int = -1, nan_grad_at: int = -1):
        super().__init__()
        self.register_buffer("running_var", torch.ones(8))
        self.poison_buffer_at, self.nan_grad_at = poison_buffer_at, nan_grad_at

    def loss(self, images, targets):
        call = self.calls
        losses = super().loss(images, targets)
        with torch.no_grad():
            self.running_var.mul_(0.9).add_(0.1)   # moves every step, like BatchNorm's running statistics
            if call == self.poison_buffer_at:
                self.running_var[3] = math.inf     # what a batch variance of 1e39 does to BatchNorm
        if call == self.nan_grad_at:
            # finite loss (sqrt(0) = 0), NaN gradient (inf * 0)
            losses["loss_box"] = losses["loss_box"] + torch.sqrt(self.cls.weight.sum() * 0.0)
        return losses


def test_a_non_finite_batchnorm_statistic_skips_the_step_and_is_put_back(images, tmp_path):
    """The loss stays finite when only a running statistic overflows; inference would then output garbage."""
    messages = []
    torch.manual_seed(0)
    model = _Poisoner(poison_buffer_at=2)
    fit(model, images, fake_config(max_iter=4, checkpoint_period=1), out_dir=tmp_path, progress=False,
        log=messages.append)
    assert [m.split(" (")[0] for m in messages if "skipped" in m] == \
        ["iteration 3: non-finite buffer running_var after the forward pass"]
    # put back before the skipped forward, then moved by the 3 good steps only
    expected = torch.ones(8)
    for _ in range(3):
        expected = expected * 0.9 + 0.1
    assert torch.equal(model.running_var, expected)
    assert all(_all_finite(p) for p in (tmp_path / "checkpoints").glob("*.pt"))


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step(images, tmp_path):
    messages = []
    torch.manual_seed(0)
    model = _Poisoner(nan_grad_at=1)
    result = fit(model, images, fake_config(max_iter=5, checkpoint_period=0), out_dir=tmp_path, progress=False,
                 log=messages.append)
    lines = [m for m in messages if "skipped" in m]
    assert len(lines) == 1 and lines[0].startswith("iteration 2: non-finite gradient of ")
    assert result["iteration"] == 5 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_divergence_sets_aside_the_checkpoints_of_the_diverged_stretch(images, tmp_path):
    """The state after 3 steps gives bad losses from step 4 on: ckpt 4 (written during the bad steps) goes aside."""
    torch.manual_seed(0)
    model = FakeDetector(nan_calls={3, 4, 5})
    with pytest.raises(TrainingDiverged) as caught:
        fit(model, images, fake_config(max_iter=10, checkpoint_period=2, keep_checkpoints=0, max_nonfinite=3),
            out_dir=tmp_path, progress=False, log=lambda m: None)
    message = str(caught.value)
    assert message.startswith("training diverged at iteration 6 on images [")
    assert "set aside 1 checkpoint(s) from iteration 3 on" in message and "continue from ckpt_0000002.pt" in message
    assert [i for i, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert (tmp_path / "checkpoints" / "ckpt_0000004.pt.diverged").is_file()
    assert (tmp_path / "checkpoints" / "last_checkpoint").read_text() == "ckpt_0000002.pt\n"


def test_resume_skips_a_checkpoint_holding_nan(images, tmp_path):
    """A checkpoint written with inf by an older version is never chosen by --resume."""
    torch.manual_seed(0)
    fit(FakeDetector(), images, fake_config(max_iter=5, checkpoint_period=2, keep_checkpoints=0), out_dir=tmp_path,
        progress=False, log=lambda m: None, stop_after=5)
    poisoned = torch.load(tmp_path / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    poisoned["model"]["conv.weight"][0, 0, 0, 0] = math.inf
    torch.save(poisoned, tmp_path / "checkpoints" / "ckpt_0000004.pt")   # unsealed, as older versions wrote
    messages = []
    torch.manual_seed(0)
    fit(FakeDetector(), images, fake_config(max_iter=5, checkpoint_period=2, keep_checkpoints=0), out_dir=tmp_path,
        progress=False, log=messages.append, resume=tmp_path)
    assert "ckpt_0000004.pt: model weight 'conv.weight' holds NaN or inf" in messages[0]
    assert "falling back to the previous checkpoint" in messages[0]
    assert messages[1].endswith("ckpt_0000002.pt at iteration 2")


def test_no_checkpoint_is_written_or_loaded_with_nan(tmp_path):
    model = FakeDetector()
    config = config_to_dict(Config())
    with torch.no_grad():
        model.box.bias[1] = math.nan
    with pytest.raises(CheckpointError, match=r"c\.pt: not written: model weight 'box.bias' holds NaN or inf"):
        ck.save_checkpoint(tmp_path / "c.pt", model=model, config=config, class_names=CLASSES)
    assert list(tmp_path.iterdir()) == []
    torch.save({"format": ck.FORMAT, "version": 1, "config": config, "class_names": CLASSES,
                "model": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old.pt: model weight 'box.bias' holds NaN or inf"):
        ck.load_checkpoint(tmp_path / "old.pt")


# --------------------------------------------------------------------------- failure 3: two trainings, one folder


def _frozen_training(out: Path, synth: Path):
    """A real training that stops inside its first checkpoint write (holding the folder) until killed."""
    def target(report):
        freeze_checkpoint_write(report, 1)
        return train.main(tiny_args(out, synth, "train.max_iter=2", "train.checkpoint_period=1"))
    return target


def test_a_second_training_into_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(synth, tmp_path,
                                                                                            capsys):
    """Issue 13 failure 3: both ran and mixed the folder. Also: the killed run's temp file is removed on start."""
    out = tmp_path / "run"
    first = Child(_frozen_training(out, synth), log=tmp_path / "first.log")
    try:
        assert first.wait_for(IN_WRITE), first.text()
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        code = train.main(tiny_args(out, synth, "train.max_iter=2", "train.checkpoint_period=1"))
        line = _one_error_line(capsys.readouterr().err)
        after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    finally:
        first.kill()
    assert code == 2
    assert line.startswith(f"error: output folder {out} is in use by another process (pid {first.pid} on ")
    assert after == before    # the refused run wrote nothing
    stale = temp_files(out)
    assert len(stale) == 1 and stale[0].startswith(".ckpt_0000001.pt.")

    code = train.main(tiny_args(out, synth, "train.max_iter=2", "train.checkpoint_period=1"))
    printed = capsys.readouterr().out
    assert code == 0
    assert f"its previous training (pid {first.pid} on " in printed
    assert "removed 1 temp file(s) left by an interrupted write: .ckpt_0000001.pt." in printed
    assert temp_files(out) == [] and ck.load_checkpoint(out / "model_final.pt")["iteration"] == 2


def test_under_torchrun_only_rank_0_takes_the_lock_and_every_rank_gets_its_verdict(tmp_path, monkeypatch):
    from detect import runlog

    monkeypatch.setattr(runlog.distributed, "is_main", lambda: False)
    monkeypatch.setattr(runlog.distributed, "broadcast_object", lambda obj, src=0: None)   # rank 0: free
    with lock_run_dir(tmp_path / "run"):
        pass
    assert not (tmp_path / "run" / ".lock").exists()
    verdict = (True, "output folder x is in use by another process (pid 1)")
    monkeypatch.setattr(runlog.distributed, "broadcast_object", lambda obj, src=0: verdict)   # rank 0: busy
    with pytest.raises(RunDirBusy, match=r"^output folder x is in use by another process \(pid 1\)$"):
        with lock_run_dir(tmp_path / "run"):
            pass


def test_a_file_system_without_locks_trains_unprotected_and_says_so(tmp_path, monkeypatch):
    import errno

    from detect.utils import io as io_utils

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io_utils.fcntl, "lockf", no_locks)
    messages = []
    with lock_run_dir(tmp_path / "run", log=messages.append):
        pass
    assert messages == [f"warning: cannot lock {tmp_path / 'run'} (No locks available); a second training into "
                        f"it would not be refused"]


# --------------------------------------------------------------------------- partial files


def test_temp_files_of_dead_writers_are_removed_on_start_and_on_prune(images, tmp_path):
    """kill -9 during a checkpoint write left ``.ckpt_*.pt.*.tmp`` files (9 MB each) that nothing removed."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = Child(lambda report: 0, log=tmp_path / "dead.log")
    dead.join()                                                     # a pid that is surely gone now
    stale = [folder / f".ckpt_0000002.pt.{dead.pid}.k3j_x9a1.tmp",  # this version's name: pid inside
             folder / ".ckpt_0000004.pt.a8_fk2lq.tmp",              # older versions: no pid
             tmp_path / f".metrics.jsonl.{dead.pid}.zz0_a1b2.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    fit(FakeDetector(), images, fake_config(max_iter=2, checkpoint_period=0), out_dir=tmp_path, progress=False,
        log=lambda m: None)
    assert temp_files(tmp_path) == []

    # pruning, without the run's lock: only writers that are gone lose their files
    alive = folder / f".ckpt_0000006.pt.{os.getppid()}.abcdefgh.tmp"
    gone = folder / f".ckpt_0000008.pt.{dead.pid}.abcdefgh.tmp"
    for path in (alive, gone):
        path.write_bytes(b"x")
    ck.save_periodic(folder, 10, 2, model=FakeDetector(), config=config_to_dict(Config()), class_names=CLASSES)
    assert temp_files(folder) == [alive.name]


def test_random_bytes_named_pt_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"model\.pt: not a checkpoint \(not a PyTorch archive") as caught:
        ck.load_checkpoint(path)
    assert "pickled objects" not in str(caught.value)


def test_auto_resume_falls_back_past_a_truncated_newest_checkpoint_and_ends_equal(images, tmp_path):
    """Auto-resume whose newest checkpoint is truncated errored instead of using the previous good one."""
    cfg = dict(max_iter=9, checkpoint_period=2, keep_checkpoints=3)
    torch.manual_seed(0)
    reference = FakeDetector()
    fit(reference, images, fake_config(**cfg), out_dir=tmp_path / "ref", progress=False, log=lambda m: None)
    torch.manual_seed(0)
    fit(FakeDetector(), images, fake_config(**cfg), out_dir=tmp_path / "run", progress=False, log=lambda m: None,
        stop_after=7)
    newest = tmp_path / "run" / "checkpoints" / "ckpt_0000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    messages = []
    torch.manual_seed(5)
    resumed = FakeDetector()
    fit(resumed, images, fake_config(**cfg), out_dir=tmp_path / "run", progress=False, log=messages.append,
        resume=tmp_path / "run")
    assert "ckpt_0000006.pt: not a readable checkpoint: truncated or damaged" in messages[0]
    assert messages[0].endswith("falling back to the previous checkpoint")
    assert messages[1].endswith("ckpt_0000004.pt at iteration 4")
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def _limited_training(out: Path, synth: Path, limit: int):
    def target(report):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return train.main(tiny_args(out, synth, "train.max_iter=3", "train.checkpoint_period=1", resume=True))
    return target


def test_disk_full_while_writing_a_checkpoint_is_one_line_and_keeps_the_earlier_files(synth, tmp_path, capsys):
    """A write that fails (ENOSPC; here EFBIG from RLIMIT_FSIZE) was a traceback with exit 1."""
    out = tmp_path / "run"
    assert train.main(tiny_args(out, synth, "train.max_iter=2", "train.checkpoint_period=1")) == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("ckpt_*.pt")}
    capsys.readouterr()
    code, printed = run(_limited_training(out, synth, 1 << 20), log=tmp_path / "full.log")   # 1 MB < 9 MB
    assert code == 2, printed
    line = [x for x in printed.splitlines() if x.startswith("error: ")]
    assert line == [f"error: {out / 'checkpoints' / 'ckpt_0000003.pt'}: could not be written (EFBIG: File too "
                    f"large); the files written before it are intact"]
    assert temp_files(out) == []
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("ckpt_*.pt")} == before
    assert ck.load_checkpoint(out / "checkpoints" / "ckpt_0000002.pt")["iteration"] == 2


# --------------------------------------------------------------------------- corruption


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, model=FakeDetector(), config=config_to_dict(Config()), class_names=CLASSES,
                       iteration=3)
    return path


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["weight", "pickle", "seal"])
def test_a_flipped_bit_is_detected_and_never_used(where, tmp_path):
    """torch.load does not check the zip's CRCs: a flipped bit in a weight loaded silently."""
    path = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
    if where == "seal":
        offset = path.stat().st_size - 5
    else:
        info = entries["data/0" if where == "weight" else "data.pkl"]
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    _flip(path, offset, bit=2)
    with pytest.raises(CheckpointError, match=r"c\.pt: damaged: its content does not match the sha256"):
        ck.load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused_and_an_unsealed_old_one_still_loads(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    assert data[-48:-32] == ck.SEAL
    old = tmp_path / "old.pt"
    old.write_bytes(data[:-48])   # what versions without the seal wrote
    assert ck.load_checkpoint(old)["iteration"] == 3
    for size in (len(data) // 3, len(data) - 100):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"c\.pt: not a readable checkpoint: truncated or damaged"):
            ck.load_checkpoint(path)


def test_weights_that_overflow_in_the_optimizer_step_stop_the_run_at_that_iteration(images, tmp_path):
    """Finite loss and gradients, but lr x gradient overflows float32: nothing can undo that step."""
    class Steep(FakeDetector):
        def loss(self, images, targets):
            losses = super().loss(images, targets)
            losses["loss_cls"] = losses["loss_cls"] * 100.0   # gradients of ~10: 1e38 x 10 > float32's 3.4e38
            return losses

    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged) as caught:
        fit(Steep(random=False), images, fake_config(max_iter=4, lr=1e38, checkpoint_period=1),
            out_dir=tmp_path, progress=False, log=lambda m: None)
    assert str(caught.value).startswith("training diverged at iteration 1 on images [")
    assert "non-finite conv.weight after the optimizer step" in str(caught.value)
    assert not (tmp_path / "checkpoints").exists()
