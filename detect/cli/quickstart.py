"""``make demo``: generate the synthetic dataset, train the tiny Faster R-CNN, test it, draw its detections.

    python -m detect.cli.quickstart [--out runs/quickstart] [--config configs/faster_rcnn/tiny_synthetic.yaml]

One command that exercises the whole toolkit on a CPU in minutes: the same code paths
as ``tools/train.py``, ``tools/test.py`` and ``tools/demo.py``, called in turn.

``--processes N`` trains in N single-thread processes instead (``torchrun --standalone``,
DistributedDataParallel over gloo, the batch's images split between them). On 2 cores two
processes train the tiny detector ~1.15x faster than one process on two threads (27.6 vs
~24 images/s), but the demo recipe then reached VOC07 0.870 instead of 0.905 (one run,
2026-11-27; most likely because each BatchNorm normalises one image instead of the
batch's two). So the default is one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import DetectError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"


DEMO_AMP = "train.amp=auto"   # bf16 where native: quickstart 5.5 min at one thread vs 6.8 fp32 (README)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs") / "quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--draw", type=int, default=40, metavar="N",
                        help="draw the detections of the first N test images (0: all); the mAP uses them all")
    parser.add_argument("--processes", type=int, default=1,
                        help="training processes (CPU: torchrun; 0: one per image of the batch, up to the cores)")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.processes < 0:
        parser.error(f"--processes must be 0 or more, got {args.processes}")
    if args.draw < 0:
        parser.error(f"--draw must be 0 or more, got {args.draw}")
    # bfloat16 autocast where the CPU computes it natively (utils.runtime.fast_bf16), float32 elsewhere;
    # a --set train.amp=... of the user's comes later and wins.
    args.overrides = [DEMO_AMP, *args.overrides]
    return args


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the training processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def training_processes(requested: int, device: str, images_per_batch: int, cores: int | None) -> int:
    """How many processes train: ``requested``, or (0) one per batch image up to the cores; 1 off the CPU."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    if requested:
        return requested
    return max(1, min(images_per_batch, cores or 1))


def train_in_processes(train_args: list[str], processes: int, cores: int) -> None:
    """``tools/train.py`` under ``torchrun --standalone``, each process on its share of the cores."""

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "detect.cli.train", *train_args]
    if subprocess.run(command, env=env).returncode != 0:
        raise DetectError(f"training failed in {processes} processes (see above); "
                          f"--processes 1 trains in one process")


def runtime_flags(args: argparse.Namespace) -> list[str]:
    """The ``--threads`` / ``--no-flush-denormal`` given to the quickstart, for the tools it calls."""
    return ([] if args.threads is None else ["--threads", str(args.threads)]) + \
        ([] if args.flush_denormal is None else ["--no-flush-denormal"])


def demo_threads(args: argparse.Namespace, amp: bool | str) -> int | None:
    """``--threads``, else 1 where the demo trains in bfloat16 on the CPU (``amp``: its ``train.amp``), else None.

    On a 2-core AMD EPYC with AVX512-BF16 (2026-12-02) the bfloat16 quickstart took 5.5 min at one thread
    and 6.6 min at two (float32: 6.8 min at two), with the same mAP: bfloat16 kernels gain little from the
    second thread here, and one thread leaves the other core to the rest of the machine.
    """
    import torch

    from detect.utils.runtime import fast_bf16

    if args.threads is not None or args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return args.threads
    return 1 if amp == "auto" and fast_bf16() else None


def run(args: argparse.Namespace) -> dict:
    from detect import load_config
    from detect.cli import demo, test, train
    from detect.data.loader import ensure_synthetic
    from detect.data.voc import find_image, read_split

    cfg = load_config(args.config, args.overrides)
    args.threads = demo_threads(args, cfg.train.amp)
    apply_runtime(args)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    root = ensure_synthetic(cfg.data)
    phases: dict[str, float] = {}

    def lap(name: str) -> float:
        """Seconds since the previous phase ended, recorded as phase ``name``."""
        phases[name] = time.perf_counter() - start - sum(phases.values())
        return phases[name]

    lap("dataset")
    print(f"[1/4] synthetic dataset: {root}  ({phases['dataset']:.0f} s)")

    print("[2/4] training")
    train_dir = args.out / "train"
    common = ["--device", args.device, *runtime_flags(args), *(["--no-progress"] if args.no_progress else [])]
    train_args = ["--config", str(args.config), "--out", str(train_dir), "--overwrite", "--no-test",
                  *(f"--set={o}" for o in args.overrides), *common]
    cores = os.cpu_count() or 1
    processes = training_processes(args.processes, args.device, cfg.train.images_per_batch, cores)
    if processes > 1:
        train_in_processes(train_args, processes, cores)
    else:
        if train.main(train_args):        # the tool printed its one-line error
            raise DetectError("quickstart: training failed (see the error above)")

    print(f"[3/4] testing  (training took {lap('training'):.0f} s)")
    checkpoint = train_dir / "model_final.pt"
    report = test.run(test.parse_args(["--checkpoint", str(checkpoint), "--split", cfg.data.test_split,
                                       "--metric", "voc07", "--out", str(args.out / "test"), *common]))

    drawing = f"the first {args.draw}" if args.draw else "all"
    print(f"[4/4] demo: drawing the detections of {drawing} test images  (testing took {lap('testing'):.0f} s)")
    images = args.out / "test_images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    test_ids = read_split(root, cfg.data.test_split)
    for image_id in test_ids[:args.draw] if args.draw else test_ids:
        source = find_image(root, image_id)
        shutil.copyfile(source, images / source.name)
    drawn = args.out / "demo"
    demo.run(demo.parse_args(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(drawn),
                              *common]))

    lap("drawing")
    mean_ap = report["metrics"]["voc07"]["mAP"]
    minutes = (time.perf_counter() - start) / 60
    cpu_minutes = (_cpu_seconds() - cpu_start) / 60
    print(f"\nVOC07 mAP@0.5 on the synthetic test split: {mean_ap:.4f}  ({minutes:.1f} min, {cpu_minutes:.1f} CPU min)")
    print(f"drawn detections: {drawn}/  (detections.json, detections.csv)")
    print("seconds per phase: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in phases.items()))
    return {"mAP": mean_ap, "minutes": minutes, "cpu_minutes": cpu_minutes, "demo": drawn, "seconds": phases}


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a busy machine (other jobs, the data
    # loader) spinning threads burn their cores waiting for a descheduled sibling, which made
    # training up to 10x slower in CPU time. Read when torch loads, so set before any import of it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
