"""make demo's driver (detect.cli.quickstart): process count, and a whole short run in two training processes."""

import json

import pytest
import torch

from detect.checkpoint import load_checkpoint
from detect.cli import quickstart


def test_training_processes():
    assert quickstart.training_processes(0, "cpu", images_per_batch=2, cores=2) == 2
    assert quickstart.training_processes(0, "cpu", images_per_batch=2, cores=16) == 2   # one per batch image
    assert quickstart.training_processes(0, "cpu", images_per_batch=4, cores=1) == 1
    assert quickstart.training_processes(1, "cpu", images_per_batch=2, cores=2) == 1
    assert quickstart.training_processes(0, "cuda", images_per_batch=2, cores=8) == 1


def test_negative_process_count_is_an_error(capsys):
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--processes", "-1"])
    assert "--processes must be 0 or more, got -1" in capsys.readouterr().err


def test_runtime_flags_reach_the_tools_it_calls(tmp_path, monkeypatch):
    """--threads / --no-flush-denormal are handed to train, test and demo (a quickstart that kept them would train
    and test with the default thread count)."""
    from detect.cli import demo, test, train

    seen = {}
    parse = train.parse_args
    monkeypatch.setattr(train, "main", lambda argv: (seen.setdefault("train", parse(argv)), 0)[1])
    monkeypatch.setattr(test, "run", lambda args: seen.setdefault("test", args) and {"metrics": {"voc07": {"mAP": 0.0}}})
    monkeypatch.setattr(demo, "run", lambda args: seen.setdefault("demo", args))
    quickstart.run(quickstart.parse_args(["--out", str(tmp_path / "qs"), "--threads", "3", "--no-flush-denormal",
                                          "--set", "data.synthetic_images=20", "--set", f"data.root={tmp_path / 'd'}",
                                          "--draw", "2"]))
    assert {name: (args.threads, args.flush_denormal) for name, args in seen.items()} == \
        {"train": (3, False), "test": (3, False), "demo": (3, False)}
    assert len(list(seen["demo"].images.iterdir())) == 2          # --draw 2: the first two test images only
    assert quickstart.runtime_flags(quickstart.parse_args([])) == []
    assert seen["train"].overrides[0] == "train.amp=auto"        # bf16 where the CPU has it (the demo's default)


def test_demo_trains_in_bf16_where_native_unless_told_otherwise():
    from detect.config import load_config

    assert load_config(quickstart.DEFAULT_CONFIG, quickstart.parse_args([]).overrides).train.amp == "auto"
    told = quickstart.parse_args(["--set", "train.amp=false"]).overrides
    assert load_config(quickstart.DEFAULT_CONFIG, told).train.amp is False


def test_demo_takes_one_thread_only_where_it_trains_in_bf16(monkeypatch):
    from detect.utils import runtime

    from detect.config import load_config

    for fast, argv, expected in ((True, [], 1), (False, [], None), (True, ["--threads", "2"], 2),
                                 (True, ["--set", "train.amp=false"], None), (True, ["--device", "cuda"], None)):
        monkeypatch.setattr(runtime, "fast_bf16", lambda flags=None, fast=fast: fast)
        args = quickstart.parse_args(argv)
        amp = load_config(quickstart.DEFAULT_CONFIG, args.overrides).train.amp
        assert quickstart.demo_threads(args, amp) == expected, (fast, argv)


def test_short_demo_trains_in_two_processes(tmp_path, capfd):
    out = tmp_path / "qs"
    code = quickstart.main(["--out", str(out), "--no-progress", "--processes", "2",
                            "--set", "data.synthetic_images=30", "--set", f"data.root={tmp_path / 'data'}",
                            "--set", "train.max_iter=4", "--set", "pretrain.steps=2",
                            "--set", "train.checkpoint_period=0"])
    assert code == 0
    assert (out / "train" / "model_final.pt").is_file()
    detections = json.loads((out / "demo" / "detections.json").read_text())
    assert len(detections["images"]) == len(list((out / "test_images").iterdir())) > 0
    printed = capfd.readouterr().out        # capfd: the training processes write to the file descriptor
    assert "VOC07 mAP@0.5 on the synthetic test split" in printed
    phases = printed[printed.index("seconds per phase: "):].splitlines()[0]
    assert [part.split()[0] for part in phases.removeprefix("seconds per phase: ").split(", ")] == \
        ["dataset", "training", "testing", "drawing"]
    # Two processes really trained (a driver that ignored --processes and trained in one passes the
    # checks above): torchrun's group had two members, and the last checkpoint holds one RNG state
    # per rank, each rank having drawn its own samples from its own seed.
    assert "2 process(es) on cpu" in printed
    saved = load_checkpoint(out / "train" / "checkpoints" / "ckpt_0000004.pt")
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
