"""CPU runtime setup (detect/utils/runtime.py and the tools' --threads / --no-flush-denormal).

The default thread rule is tested on made-up machines (a fake /sys tree, a patched affinity
mask and environment); flush-to-zero in fresh processes, since the CPU's flag is per thread
and the test process's thread pool already exists.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

import detect.cli
from detect.cli import common
from detect.config import TrainConfig, load_config
from detect.errors import ConfigError
from detect.utils import runtime
from detect.utils.runtime import cgroup_cpu_quota, default_threads, physical_cores

REPO = Path(__file__).resolve().parents[1]


def _fake_sys(root: Path, cores: dict[int, tuple[int, int]], cpu_max: str | None = None) -> Path:
    """A /sys tree whose CPU n sits on ``cores[n] = (package, core)``."""
    for cpu, (package, core) in cores.items():
        topology = root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{core}\n")
        (topology / "physical_package_id").write_text(f"{package}\n")
    if cpu_max is not None:
        (root / "fs" / "cgroup").mkdir(parents=True)
        (root / "fs" / "cgroup" / "cpu.max").write_text(cpu_max + "\n")
    return root


# Two packages, 2 cores each, 2 SMT siblings per core: CPUs n and n+4 share a core.
SMT = {cpu: (cpu % 4 // 2, cpu % 2) for cpu in range(8)}


def test_physical_cores_count_smt_siblings_once_and_follow_the_affinity(tmp_path):
    root = _fake_sys(tmp_path, SMT)
    assert physical_cores(list(range(8)), sys_root=root) == 4
    assert physical_cores([0, 4], sys_root=root) == 1          # two siblings of one core
    assert physical_cores([0, 1, 2], sys_root=root) == 3       # core 0 and 1 of package 0, core 0 of package 1
    assert physical_cores([0, 9], sys_root=root) == 2          # cpu9 has no topology: counted as its own core


def test_cgroup_quota_caps_the_cores_rounded_up(tmp_path):
    root = _fake_sys(tmp_path / "a", SMT, cpu_max="150000 100000")
    assert cgroup_cpu_quota(sys_root=root) == 2
    assert physical_cores(list(range(8)), sys_root=root) == 2
    assert cgroup_cpu_quota(sys_root=_fake_sys(tmp_path / "b", SMT, cpu_max="max 100000")) is None
    v1 = tmp_path / "c" / "fs" / "cgroup" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(sys_root=tmp_path / "c") == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(sys_root=tmp_path / "c") is None


@pytest.mark.parametrize("env, expected", [
    ({}, 4),                                            # the physical cores
    ({"LOCAL_WORLD_SIZE": "1"}, 4),
    ({"LOCAL_WORLD_SIZE": "3"}, 1),                     # 4 cores // 3 processes
    ({"LOCAL_WORLD_SIZE": "2"}, 2),
    ({"LOCAL_WORLD_SIZE": "8"}, 1),                     # never 0
    ({"OMP_NUM_THREADS": "3"}, 3),                      # an explicit choice is kept ...
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 2),   # ... except torchrun's blanket 1
    ({"OMP_NUM_THREADS": "lots", "LOCAL_WORLD_SIZE": "x"}, 4),  # unreadable values are ignored
])
def test_default_threads_rule(tmp_path, monkeypatch, env, expected):
    """The whole default path: affinity mask (8 logical CPUs) -> /sys topology -> environment."""
    monkeypatch.setattr(runtime, "SYS", _fake_sys(tmp_path, SMT))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_threads(env) == expected


def test_default_threads_without_affinity_or_sys_uses_the_cpu_count(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "SYS", tmp_path / "no-sys")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert default_threads({}) == 6
    assert default_threads({"LOCAL_WORLD_SIZE": "4"}) == 1


@pytest.fixture
def restore_threads():
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(threads)
    cv2.setNumThreads(cv2_threads)


def test_a_tool_applies_threads_before_its_work(tmp_path, restore_threads):
    from detect.cli import make_synthetic

    wanted = torch.get_num_threads() + 1
    assert make_synthetic.main(["--out", str(tmp_path / "syn"), "--images", "3", "--threads", str(wanted)]) == 0
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (wanted, wanted)


class _Reached(Exception):
    pass


def _tool_argv(tmp_path: Path) -> dict[str, list[str]]:
    """Arguments that reach each tool's runtime setup (paths that do not exist: any earlier work would fail)."""
    nothing = str(tmp_path / "nothing")
    return {
        "analyze": ["--checkpoint", nothing],
        "benchmark": ["ladder"],
        "check_dataset": ["--voc", nothing],
        "compress": ["--checkpoint", nothing],
        "convert": ["voc2coco", "--voc", nothing, "--split", "x", "--out", nothing],
        "demo": ["--checkpoint", nothing, "--images", nothing, "--out", nothing],
        "eval": ["--voc", nothing, "--detections", nothing],
        "explain": ["--checkpoint", nothing, "--image", nothing],
        "make_synthetic": ["--out", nothing],
        "quickstart": ["--out", nothing],
        "suggest_anchors": ["--voc", nothing],
        "test": ["--checkpoint", nothing],
        "train": ["--config", str(REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"), "--out", nothing],
        "train_rcnn": ["--config", str(REPO / "configs" / "rcnn" / "tiny_synthetic.yaml"), "--out", nothing],
        "proposals": ["compute", "--voc", nothing],
        "export": ["--checkpoint", nothing, "--out", str(tmp_path / "x.onnx")],
        "benchmark_precision": ["--checkpoint", nothing],
        "benchmark_input_size": ["--config", nothing],
    }


# Not tools (torchvision_twin, benchmark_pair: shared pieces), or with their own --threads handed to
# detect.utils.runtime per measured subprocess (benchmark_torchvision, benchmark_deploy).
NOT_COVERED = {"torchvision_twin", "benchmark_torchvision", "benchmark_pair", "benchmark_deploy", "common"}


def test_every_tool_has_the_runtime_flags_and_applies_them_first(tmp_path, monkeypatch):
    """Each tool hands ``--threads 3 --no-flush-denormal`` to apply_runtime before doing anything else
    (catches a tool without the flags, one that never calls the setup, or calls it after reading its inputs)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")     # quickstart sets it
    argvs = _tool_argv(tmp_path)
    tools = {m.name for m in pkgutil.iter_modules(detect.cli.__path__)} - NOT_COVERED
    assert tools | {"proposals"} == set(argvs)
    seen = {}

    def fake(args, train=None):
        seen[name] = (args.threads, args.flush_denormal, train)
        raise _Reached

    for name, argv in argvs.items():
        module = importlib.import_module("proposals.cli" if name == "proposals" else f"detect.cli.{name}")
        monkeypatch.setattr(common, "apply_runtime", fake)
        if hasattr(module, "apply_runtime"):
            monkeypatch.setattr(module, "apply_runtime", fake)
        with pytest.raises(_Reached):
            module.main(argv + ["--threads", "3", "--no-flush-denormal"])
        assert seen[name][:2] == (3, False), name
    # the training tools hand over their config's train section, so the flags land in config.yaml
    assert isinstance(seen["train"][2], TrainConfig) and isinstance(seen["train_rcnn"][2], TrainConfig)
    assert seen["eval"][2] is None


def test_flags_override_the_config_and_are_recorded_in_it(monkeypatch):
    calls = []
    monkeypatch.setattr("detect.utils.runtime.setup_runtime", lambda **kw: calls.append(kw))
    parser = argparse.ArgumentParser()
    common.add_runtime_args(parser)
    train = load_config(None, ["train.threads=2", "train.flush_denormal=false"]).train
    common.apply_runtime(parser.parse_args([]), train)
    assert calls[-1] == {"threads": 2, "flush_denormal": False}
    common.apply_runtime(parser.parse_args(["--threads", "5"]), train)
    assert calls[-1] == {"threads": 5, "flush_denormal": False} and train.threads == 5
    train = TrainConfig()
    common.apply_runtime(parser.parse_args(["--no-flush-denormal"]), train)
    assert calls[-1] == {"threads": 0, "flush_denormal": False} and train.flush_denormal is False
    common.apply_runtime(parser.parse_args([]))
    assert calls[-1] == {"threads": 0, "flush_denormal": True}       # no config: automatic, flushed
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "-1"])


def _fresh_process(code: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


# 2^20 subnormals (made and read as integer bits: see runtime.denormals_flushed), times 1, split over the threads.
PROBE = ("import torch\nx = torch.full((1 << 20,), 0x00400000, dtype=torch.int32).view(torch.float32)\n"
         "print(int(torch.count_nonzero((x * 1.0).view(torch.int32))))\n")


def test_flush_to_zero_reaches_every_thread_and_can_be_turned_off():
    """Two threads multiply 2^20 denormals: all become 0 after setup_runtime(), none with flush_denormal=False.
    A call after the thread pool started reaches only the caller's thread, and says so (flushing False)."""
    setup = "from detect.utils.runtime import setup_runtime\n"
    on = _fresh_process(setup + "r = setup_runtime(threads=2)\nprint(r.threads, r.flushing)\n" + PROBE)
    assert on == ["2", "True", "0"]
    off = _fresh_process(setup + "r = setup_runtime(threads=2, flush_denormal=False)\nprint(r.flushing)\n" + PROBE
                         + "print(setup_runtime(threads=2).flushing)\n")
    assert off[:2] == ["False", str(1 << 20)] and off[2] == "False"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # every op on this thread, whose flag the test sets
    flushed = runtime.denormals_flushed(1)
    yield
    torch.set_flush_denormal(flushed)
    torch.set_num_threads(threads)


def test_tiny_detector_losses_gradients_and_detections_do_not_change_with_flush_to_zero(tmp_path, one_thread):
    from detect import build_model
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor
    from tests.engine_fakes import CLASSES, write_images

    cfg = load_config(REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml",
                      ["model.input.min_size=[96]", "model.input.test_min_size=96", "model.input.max_size=160"])
    torch.manual_seed(0)
    model = build_model(cfg, class_names=CLASSES)
    records = write_images(tmp_path, 2)
    images = [image_to_tensor(read_image(r.path)) for r in records]
    targets = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels)} for r in records]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for flush in (False, True):
        model.load_state_dict(initial)                     # the loss moved BatchNorm's running statistics
        torch.set_flush_denormal(flush)
        assert runtime.denormals_flushed(1) is flush      # the mode is in effect for this model's ops
        torch.manual_seed(1)                               # same anchor / RoI samples
        model.train()
        model.zero_grad()
        losses = model.loss(images, targets)
        sum(losses.values()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.no_grad():
            detections = model.predict(images)
        results[flush] = ({k: float(v.detach()) for k, v in losses.items()}, grads, detections)
    (loss0, grad0, det0), (loss1, grad1, det1) = results[False], results[True]
    assert loss0 == pytest.approx(loss1, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad1, grad0, rtol=1e-5, atol=1e-8)
    for a, b in zip(det0, det1):
        assert len(a["boxes"]) > 0 and a["labels"].tolist() == b["labels"].tolist()
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-6)


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert runtime.cpu_flags(cpuinfo=info) >= {"avx2", "avx512_bf16"}
    assert runtime.native_bf16({"avx2", "avx512f"}) is False
    assert runtime.native_bf16({"amx_bf16", "amx_tile"}) is True
    assert runtime.native_bf16(runtime.cpu_flags(cpuinfo=info)) is True


def test_amp_dtype_is_float16_on_cuda_and_bfloat16_on_the_cpu_with_a_note_where_it_is_emulated():
    messages = []
    assert runtime.autocast_dtype(True, torch.device("cuda"), log=messages.append) == torch.float16
    assert runtime.autocast_dtype(True, torch.device("cpu"), log=messages.append, flags={"avx512_bf16"}) \
        == torch.bfloat16
    assert messages == []
    assert runtime.autocast_dtype(True, torch.device("cpu"), log=messages.append, flags={"avx2"}) == torch.bfloat16
    assert len(messages) == 1 and "emulated" in messages[0]
    assert runtime.autocast_dtype(True, torch.device("meta"), log=messages.append) is None
    assert runtime.autocast_dtype(False, torch.device("cpu"), log=messages.append) is None and len(messages) == 2


def test_the_tools_make_idle_openmp_threads_sleep_unless_told_otherwise():
    code = "import detect.cli.eval, os\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"PYTHONPATH": str(REPO)}, **({"OMP_WAIT_POLICY": given} if given else {}))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.stdout.split() == [expected], done.stderr


def test_amp_auto_takes_bfloat16_only_where_the_cpu_and_torchs_kernels_compute_it(monkeypatch):
    messages = []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime.autocast_dtype("auto", torch.device("cpu"), log=messages.append, flags={"avx512_bf16"}) \
        == torch.bfloat16
    assert runtime.autocast_dtype("auto", torch.device("cpu"), log=messages.append, flags={"avx2"}) is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")   # ATEN_CPU_CAPABILITY=avx2
    assert runtime.autocast_dtype("auto", torch.device("cpu"), log=messages.append, flags={"avx512_bf16"}) is None
    assert [m.split(": ")[1].split()[0] for m in messages] == ["bfloat16", "float32", "float32"]
    assert runtime.autocast_dtype("auto", torch.device("cuda"), log=messages.append) == torch.float16
    assert load_config(None, ["train.amp=auto"]).train.amp == "auto"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=yes please"])
