"""Checkpoints: round trip, RNG state, safe loading, model/class checks, keep-last-K, atomic writes."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from detect import checkpoint as ck
from detect.config import Config, config_to_dict
from detect.errors import CheckpointError
from tests.engine_fakes import CLASSES, FakeDetector


def _config() -> dict:
    cfg = Config()
    cfg.model.backbone.name = "fake"
    return config_to_dict(cfg)


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = FakeDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.cls.weight.grad = torch.ones_like(model.cls.weight)
    opt.step()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    ck.save_checkpoint(tmp_path / "c.pt", model=model, config=_config(), class_names=CLASSES, iteration=42,
                       optimizer=opt, rng=ck.rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loaded = ck.load_checkpoint(tmp_path / "c.pt")
    other = FakeDetector()
    ck.load_model_weights(other, loaded)
    ck.set_rng_state(loaded["rng"])
    assert (torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
            and random.random() == expected[2])
    assert loaded["iteration"] == 42 and loaded["class_names"] == CLASSES
    assert loaded["config"]["model"]["backbone"]["name"] == "fake"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state[other.cls.weight]["momentum_buffer"], torch.ones_like(model.cls.weight))


def test_missing_file_and_empty_folder_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=f"no checkpoint in directory {tmp_path}"):
        ck.load_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "model": {}, "config": {}, "class_names": [], "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        ck.load_checkpoint(path)
    assert not _Evil.marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_and_bare_state_dict_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(pickle.dumps({"a": 1}) + b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        ck.load_checkpoint(tmp_path / "junk.pt")
    torch.save(FakeDetector().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this toolkit"):
        ck.load_checkpoint(tmp_path / "bare.pt")


def test_weights_of_another_model_are_refused_with_the_keys(tmp_path):
    ck.save_checkpoint(tmp_path / "c.pt", model=FakeDetector(["a", "b"]), config=_config(), class_names=["a", "b"])
    loaded = ck.load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches .*cls.weight \(3, 8\) vs \(4, 8\)"):
        ck.load_model_weights(FakeDetector(CLASSES), loaded)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing 2 keys .*'0.weight'"):
        ck.load_model_weights(other, loaded)


def test_other_class_list_or_backbone_is_refused(tmp_path):
    ck.save_checkpoint(tmp_path / "c.pt", model=FakeDetector(), config=_config(), class_names=CLASSES)
    loaded = ck.load_checkpoint(tmp_path / "c.pt")
    ck.check_compatible(loaded, config=_config(), class_names=CLASSES)
    with pytest.raises(CheckpointError, match=r"trained for classes \['red', 'green', 'blue'\]"):
        ck.check_compatible(loaded, config=_config(), class_names=["red", "blue", "green"])
    mine = _config()
    mine["model"]["backbone"]["name"] = "vgg16"
    with pytest.raises(CheckpointError, match="backbone.name is 'fake' in the checkpoint but 'vgg16'"):
        ck.check_compatible(loaded, config=mine, class_names=CLASSES)


def test_periodic_checkpoints_keep_the_last_k(tmp_path):
    model = FakeDetector()
    for it in (10, 20, 30, 40):
        ck.save_periodic(tmp_path, it, 2, model=model, config=_config(), class_names=CLASSES)
    assert [i for i, _ in ck.list_checkpoints(tmp_path)] == [30, 40]
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_0000040.pt"
    assert (tmp_path / "last_checkpoint").read_text() == "ckpt_0000040.pt\n"
    # a run folder resolves to model_final.pt first when loading for inference
    run = tmp_path / "run"
    ck.save_periodic(run / "checkpoints", 5, 0, model=model, config=_config(), class_names=CLASSES)
    assert ck.load_checkpoint(run)["iteration"] == 5
    ck.save_checkpoint(run / "model_final.pt", model=model, config=_config(), class_names=CLASSES, iteration=9)
    assert ck.load_checkpoint(run)["iteration"] == 9


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, model=FakeDetector(), config=_config(), class_names=CLASSES, iteration=1)

    def killed_before_rename(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed_before_rename)   # the new file is fully written, never renamed
    # a failed write is now one CheckpointError line naming the file (the tools print it and exit 2)
    with pytest.raises(CheckpointError, match=r"c\.pt: could not be written \(killed\)"):
        ck.save_checkpoint(path, model=FakeDetector(), config=_config(), class_names=CLASSES, iteration=2)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
