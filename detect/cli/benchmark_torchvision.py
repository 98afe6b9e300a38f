"""This toolkit's Faster R-CNN against ``torchvision.models.detection.FasterRCNN`` configured alike.

    python tools/benchmark_torchvision.py [--setting tiny|resnet50_c4] [--mode speed|accuracy] [--device cpu|cuda]

Both detectors get the same trunk and per-RoI layers (our modules, copied, so the
random initial weights are identical), the same RPN and predictor weights, image
sizes, anchors, proposal counts, sampling sizes, thresholds and RoI pooling op.
What differs is everything around the layers: input transform, anchors, proposal
layer, target assignment, sampling, post-processing, and our inference
preparation (:meth:`detect.faster_rcnn.FasterRCNN.prepare_for_inference`).

``--mode speed`` measures inference images/s (one image per call), training
images/s (loss + backward + SGD step) and peak memory. Every measurement runs in
a fresh subprocess so peak RSS belongs to it alone (Linux: the high-water mark is
reset just before the timed part; CUDA: ``torch.cuda.max_memory_allocated``); the
two detectors alternate, ``--repeats`` times, and the best time of each counts, so
a burst of load on a shared machine hurts neither side alone.

``--mode accuracy`` trains both from scratch on the same batches with the same SGD
schedule (the engine's optimizer and LR schedule) on a small VOC-format dataset
(``../shared/data/bccd`` or ``raccoon`` next to the checkout) and reports VOC07 mAP
on its test split.

The markdown table (ratios ours / torchvision) is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detect.cli.benchmark_pair import DATA, REPO, SETTINGS, build_pair  # noqa: F401  (build_pair: the tests)
from detect.cli.benchmark_pair import load_images as _images, peak_mb as _peak_mb, reset_peak as _reset_peak


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark-torchvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("speed", "accuracy", "deploy"), default="speed",
                        help="deploy: ours eager/compiled fp32, bf16, int8 vs torchvision eager fp32 (inference)")
    parser.add_argument("--calibrate", type=int, default=8, metavar="N",
                        help="deploy: training images that calibrate int8 quantization")
    parser.add_argument("--amp", action="store_true",
                        help="speed: training steps of both detectors under bfloat16 autocast (train.amp)")
    parser.add_argument("--interleave", action="store_true",
                        help="deploy: all variants in one process, taking turns image by image (fair on a "
                             "shared machine; no per-variant peak memory)")
    parser.add_argument("--setting", action="append", choices=sorted(SETTINGS), default=None,
                        help="trunk and sizes (repeatable; default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied to both detectors")
    parser.add_argument("--size", type=int, default=0, help="shorter image side (default: the setting's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--images", type=int, default=8, help="distinct images measured")
    parser.add_argument("--passes", type=int, default=2, help="speed: timed passes over the images")
    parser.add_argument("--batch", type=int, default=2, help="speed: training images per iteration")
    parser.add_argument("--repeats", type=int, default=2, help="speed: measurements per detector (best counts)")
    parser.add_argument("--datasets", default="bccd,raccoon", help="accuracy: dataset names under ../shared/data")
    parser.add_argument("--max-iter", type=int, default=3000, help="accuracy: SGD iterations per detector")
    parser.add_argument("--seeds", default="0",
                        help="accuracy: comma-separated seeds (initial weights and batch order); the mean counts")
    parser.add_argument("--data-root", type=Path, default=DATA,
                        help="accuracy: folder holding the datasets (default: ../shared/data beside the checkout)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "benchmark_torchvision.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train_and_test_pair(setting: str, root: Path, args, seed: int = 0) -> dict:
    """Train ours and the twin from the same initial weights on the same batches; VOC07 mAP on the test split.

    Both run the engine's loop (:func:`detect.engine.fit`: SGD, warm-up, schedule, same
    seeded batch order and flips), so only the detectors differ. ``seed`` sets the
    initial weights and the training seed (batch order, flips, sampling).
    """
    import torch

    from detect.cli.torchvision_twin import TorchvisionAdapter
    from detect.data.loader import build_dataset
    from detect.engine import evaluate_split, fit

    data = ["data.format=voc", f"data.root={root}", "data.classes=auto", "data.train_split=trainval",
            "data.test_split=test", "train.eval_period=0", f"train.max_iter={args.max_iter}",
            f"train.steps=[{int(args.max_iter * 0.75)}]", "train.checkpoint_period=0", "train.workers=0",
            f"train.seed={seed}", *args.overrides]
    from detect import load_config

    probe = load_config(SETTINGS[setting]["config"], data)
    train_set = build_dataset(probe, "trainval", train=True)
    test_set = build_dataset(probe, "test")
    names = train_set.class_names
    result = {"iterations": args.max_iter, "seed": seed}
    ours, theirs, cfg = build_pair(setting, len(names), data, args.size, seed=seed)
    twin = TorchvisionAdapter(theirs, names)
    device = torch.device(args.device)
    for key, model in (("ours", ours), ("torchvision", twin)):
        start = time.perf_counter()
        with_dir = Path(args.out).with_suffix("") / f"{root.name}_{key}_seed{seed}"
        fit(model, train_set, cfg, out_dir=with_dir, device=device, progress=False, log=lambda *_: None)
        result[f"{key}_minutes"] = (time.perf_counter() - start) / 60
        metrics, _ = evaluate_split(model, test_set, device=device, metric="voc07", log=lambda *_: None)
        result[key] = metrics["mAP"]
        print(f"  {setting} on {root.name} (seed {seed}): {key} VOC07 mAP {metrics['mAP']:.4f} "
              f"({result[f'{key}_minutes']:.1f} min)", flush=True)
    return result


def measure(spec: dict) -> dict:
    """One timed measurement: ``spec`` names the detector ("ours"/"torchvision") and phase ("inference"/"train")."""
    import torch

    from detect.utils.runtime import setup_runtime   # flush-to-zero for both detectors alike (issue 15.6)
    setup_runtime(threads=spec["threads"] or torch.get_num_threads())
    device = torch.device(spec["device"])
    ours, theirs, _ = build_pair(spec["setting"], 5, spec["overrides"], spec["size"])
    model = (ours if spec["model"] == "ours" else theirs).to(device)
    del ours, theirs
    images, targets = _images(Path(spec["root"]), spec["images"])
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    if spec["phase"] == "inference":
        model.eval()
        if spec["model"] == "ours":
            model.prepare_for_inference()
            run = lambda im: model.predict([im])                    # noqa: E731
        else:
            def run(im):
                with torch.inference_mode():
                    return model([im])
        work = [lambda im=im: run(im) for im in images]
        count = len(images)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        loss = (lambda i, t: model.loss(i, t)) if spec["model"] == "ours" else (lambda i, t: model(i, t))
        b = spec["batch"]

        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(spec.get("amp")))

        def step(k):
            pick = [(k * b + j) % len(images) for j in range(b)]
            with amp:
                total = sum(loss([images[i] for i in pick], [targets[i] for i in pick]).values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        steps = max(1, len(images) // b)
        work = [lambda k=k: step(k) for k in range(steps)]
        count = steps * b
    for job in work[:2]:          # warm-up: allocator, oneDNN kernels, anchor caches
        job()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(spec["passes"]):
        for job in work:
            job()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_mb()
    return {"images_per_s": spec["passes"] * count / seconds, "cpu_s": time.process_time() - cpu, "peak_mb": peak}


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "detect.cli.benchmark_torchvision", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {spec['model']}/{spec['phase']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, setting: str, root: Path) -> list[list[str]]:
    rows = []
    for phase in ("inference", "train"):
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for model in ("ours", "torchvision"):
                spec = dict(setting=setting, model=model, phase=phase, root=str(root), images=args.images,
                            passes=args.passes, batch=args.batch, device=args.device, threads=args.threads,
                            overrides=args.overrides, size=args.size, amp=args.amp and phase == "train")
                result = _run_worker(spec)
                if model not in best or result["images_per_s"] > best[model]["images_per_s"]:
                    best[model] = result
                print(f"  {setting} {phase:9s} {model:11s} {result['images_per_s']:7.2f} images/s "
                      f"(cpu {result['cpu_s']:.1f} s), peak {result['peak_mb']:.0f} MB", flush=True)
        o, t = best["ours"], best["torchvision"]
        amp = ", bf16 autocast" if args.amp else ""
        what = "inference" if phase == "inference" else f"training (batch {args.batch}{amp})"
        rows.append([setting, f"{what} images/s", f"{o['images_per_s']:.2f}", f"{t['images_per_s']:.2f}",
                     f"{o['images_per_s'] / t['images_per_s']:.2f}x"])
        mem = "GPU memory allocated" if args.device == "cuda" else "RSS"
        rows.append([setting, f"{what} peak {mem} MB", f"{o['peak_mb']:.0f}", f"{t['peak_mb']:.0f}",
                     f"{o['peak_mb'] / t['peak_mb']:.2f}x"])
    return rows


def accuracy(args: argparse.Namespace, setting: str) -> list[list[str]]:

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        root = args.data_root / name
        if not (root / "Annotations").is_dir():
            print(f"  {name}: {root} is missing, skipped")
            continue
        runs = [train_and_test_pair(setting, root, args, seed=seed) for seed in seeds]
        rows += accuracy_rows(f"{setting} on {name}", runs)
    return rows


def accuracy_rows(label: str, runs: list[dict]) -> list[list[str]]:
    """Table rows of one dataset: the mean over seeds, with each seed's value beside it."""
    def mean(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    def each(key: str) -> str:
        return "" if len(runs) == 1 else " (" + ", ".join(f"{r[key]:.3f}" for r in runs) + ")"

    what = f"VOC07 mAP (test, {runs[0]['iterations']} iterations"
    what += f", mean of {len(runs)} seeds)" if len(runs) > 1 else ")"
    o, t = mean("ours"), mean("torchvision")
    wins = sum(r["ours"] >= r["torchvision"] for r in runs)
    ratio = f"{o / max(t, 1e-9):.2f}x" + (f", ours >= in {wins}/{len(runs)}" if len(runs) > 1 else "")
    om, tm = mean("ours_minutes"), mean("torchvision_minutes")
    return [[label, what, f"{o:.4f}{each('ours')}", f"{t:.4f}{each('torchvision')}", ratio],
            [label, "training minutes" + (" (mean)" if len(runs) > 1 else ""), f"{om:.1f}", f"{tm:.1f}",
             f"{om / max(tm, 1e-9):.2f}x"]]


def table(rows: list[list[str]], header: str) -> str:
    lines = [header, "", "| setting | measure | ours | torchvision | ours / torchvision |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    import torch

    from detect.data.synthetic import generate_synthetic
    from detect.utils.io import atomic_write_text

    settings = args.setting or ["tiny"]
    rows: list[list[str]] = []
    from detect.utils.runtime import setup_runtime   # the accuracy mode trains here; speed workers set their own
    setup_runtime(threads=args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "speed":
            root = generate_synthetic(Path(tmp) / "images", num_images=max(3, 2 * args.images), seed=0,
                                      empty_fraction=0.0)
            for setting in settings:
                rows += speed(args, setting, root)
        elif args.mode == "deploy":
            from detect.cli.benchmark_deploy import deploy
            return deploy(args, settings, Path(tmp))
        else:
            for setting in settings:
                rows += accuracy(args, setting)
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    header = (f"Faster R-CNN, this toolkit vs torchvision {__import__('torchvision').__version__} "
              f"(torch {torch.__version__}, {device}, {threads} threads, load {os.getloadavg()[0]:.1f}, "
              f"mode {args.mode})")
    text = table(rows, header)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    return text


def main(argv: list[str] | None = None) -> int:
    from detect.cli.common import run_cli

    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
