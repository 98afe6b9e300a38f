"""``benchmark_torchvision.py --mode deploy``: our fast inference paths beside torchvision eager fp32.

Rows per setting and thread count: torchvision eager fp32, ours eager fp32 (``prepare_for_inference``),
ours compiled fp32, the whole detector exported to ONNX and run by onnxruntime, bf16 (skipped on a CPU
without bf16 arithmetic) and int8 (:func:`detect.fast_inference.optimize`), all on the same images
with the same weights and settings, one run each. Every row is measured in a fresh subprocess; its
peak memory is that process's peak RSS (Linux ``VmHWM``, reset after the warm-up, so compilation
is not counted; ``resource.getrusage`` maxrss where ``/proc`` is missing). The first two images
are the warm-up (compilation happens there: its seconds are reported apart); ``--calibrate N``
other training images calibrate int8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from detect.cli.benchmark_pair import REPO, build_pair, load_images, peak_mb, reset_peak

VARIANTS = {                   # name -> (model, precision, compiled)
    "torchvision eager fp32": ("torchvision", "fp32", False),
    "ours eager fp32": ("ours", "fp32", False),
    "ours compiled fp32": ("ours", "fp32", True),
    "ours onnxruntime fp32": ("onnx", "fp32", False),
    "ours compiled bf16": ("ours", "bf16", True),
    "ours compiled int8": ("ours", "int8", True),
}


def _runner(variant: str, ours, theirs, calibration: list, threads: int):
    """The function that runs one image through ``variant`` (built from ``ours`` / ``theirs``, left untouched)."""
    import copy

    import torch

    from detect.fast_inference import optimize

    kind, precision, compiled = VARIANTS[variant]
    if kind == "ours":
        model = copy.deepcopy(ours).eval().prepare_for_inference()
        if compiled or precision != "fp32":
            model = optimize(model, precision=precision, compile=compiled, calibration_images=calibration)
        return lambda im: model.predict([im])
    if kind == "onnx":         # the whole detector as one ONNX graph (detect.export), run by onnxruntime
        model = _onnx_detector(copy.deepcopy(ours).eval(), threads)
        return lambda im: model.predict([im])
    theirs.eval()

    def run(im):
        with torch.inference_mode():
            return theirs([im])
    return run


def _setup(spec: dict):
    from detect.utils.runtime import setup_runtime

    setup_runtime(threads=spec["threads"])
    ours, theirs, _ = build_pair(spec["setting"], 5, spec["overrides"], spec["size"])
    images, _ = load_images(Path(spec["root"]), spec["images"] + spec["calibrate"])
    return ours, theirs, images[: spec["images"]], images[spec["images"]:]


def measure_variant(spec: dict) -> dict:
    """One row: images/s over ``passes`` passes, compile (warm-up) seconds, peak RSS MB."""
    from detect.fast_inference import compile_count

    ours, theirs, images, calibration = _setup(spec)
    start = time.perf_counter()
    run = _runner(spec["variant"], ours, theirs, calibration, spec["threads"])
    del ours
    for im in images[:2]:
        run(im)
    warmup = time.perf_counter() - start
    reset_peak()
    start = time.perf_counter()
    for _ in range(spec["passes"]):
        for im in images:
            run(im)
    seconds = time.perf_counter() - start
    return {"images_per_s": spec["passes"] * len(images) / seconds, "warmup_s": warmup, "peak_mb": peak_mb(),
            "graphs": compile_count()}


def measure_interleaved(spec: dict, before_timing=None) -> dict:
    """Every variant of ``spec["variants"]`` in this one process, taking turns image by image.

    Each image goes through all variants in a rotating order before the next image, so a burst of
    load from elsewhere lands on all of them alike (the subprocess-per-variant rows cannot promise
    that on a shared machine). Returns, per variant, the median milliseconds per image over
    ``passes`` passes and the warm-up seconds; no peak memory (the process holds them all).
    ``before_timing()``, when given, runs once the warm-ups are done (a harness may quiet the machine there).
    """
    import statistics

    ours, theirs, images, calibration = _setup(spec)
    runs, warmups = {}, {}
    for variant in spec["variants"]:
        start = time.perf_counter()
        runs[variant] = _runner(variant, ours, theirs, calibration, spec["threads"])
        for im in images[:2]:
            runs[variant](im)
        warmups[variant] = time.perf_counter() - start
    if before_timing is not None:
        before_timing()
    times: dict[str, list[float]] = {v: [] for v in runs}
    order = list(runs)
    for n in range(spec["passes"] * len(images)):
        im = images[n % len(images)]
        for variant in order[n % len(order):] + order[: n % len(order)]:
            start = time.perf_counter()
            runs[variant](im)
            times[variant].append(time.perf_counter() - start)
    return {v: {"ms": 1000 * statistics.median(t), "warmup_s": warmups[v]} for v, t in times.items()}


def _onnx_detector(model, threads: int):
    """``model`` exported to ONNX in memory (traced once, not checked: the export tests cover that), opened."""
    from detect.export import metadata, serialize, trace
    from detect.export_graphs import model_parts
    from detect.runtime import open_exported

    parts = model_parts(model)
    data = serialize(trace(parts), "onnx", metadata(parts, config={}, input_dtype="float32", source="", notes=[]))
    return open_exported(data, "onnx", where="benchmark", threads=max(1, threads))


def _worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "detect.cli.benchmark_deploy", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _needs_missing_bf16(variant: str, note: str | None) -> bool:
    """A bf16 row on a CPU without bf16 arithmetic (``note`` says so): emulated bf16 measures nothing useful."""
    return bool(note) and "bf16" in variant


def _skipped_row(setting: str, threads: int, variant: str) -> list[str]:
    return [setting, str(threads), variant, "skipped", "", "", "", "no AVX512-BF16 / AMX"]


def _interleaved_rows(args, setting: str, threads: int, root: Path, note: str | None) -> list[list[str]]:
    """``--interleave``: one subprocess measures every variant of a setting and thread count by turns."""
    variants = [v for v in VARIANTS if not _needs_missing_bf16(v, note)]
    spec = dict(setting=setting, variants=variants, root=str(root), images=args.images, passes=args.passes,
                calibrate=args.calibrate, threads=threads, overrides=args.overrides, size=args.size)
    r = _worker(spec)
    if "error" in r:
        print(f"  {setting} {threads}t: failed: {r['error']}", flush=True)
        return [[setting, str(threads), "all", "failed", "", "", "", r["error"]]]
    base = 1000 / r["torchvision eager fp32"]["ms"]
    rows = []
    for variant in VARIANTS:
        if variant not in r:
            rows.append(_skipped_row(setting, threads, variant))
            continue
        ips = 1000 / r[variant]["ms"]
        print(f"  {setting} {threads}t {variant:24s} {ips:6.2f} images/s {ips / base:5.2f}x "
              f"({r[variant]['ms']:.1f} ms median) warm-up {r[variant]['warmup_s']:.0f} s", flush=True)
        rows.append([setting, str(threads), variant, f"{ips:.2f}", f"{ips / base:.2f}x", "-",
                     f"{r[variant]['warmup_s']:.0f}", f"median {r[variant]['ms']:.1f} ms"])
    return rows


def deploy(args, settings: list[str], tmp: Path) -> str:
    """Measure every variant for each setting and thread count (1 and 2, or ``--threads``); the table."""
    import torch

    from detect.data.synthetic import generate_synthetic
    from detect.fast_inference import bf16_note, cpu_model
    from detect.utils.io import atomic_write_text

    note = bf16_note()
    if note:
        print(note)
    root = generate_synthetic(tmp / "images", num_images=2 * (args.images + args.calibrate), seed=0,
                              empty_fraction=0.0)
    rows = []
    for setting in settings:
        for threads in ([args.threads] if args.threads else [1, 2]):
            if args.interleave:
                rows += _interleaved_rows(args, setting, threads, root, note)
                continue
            base = None
            for variant in VARIANTS:
                if _needs_missing_bf16(variant, note):
                    print(f"  {setting} {threads}t {variant}: skipped (no bf16 hardware)", flush=True)
                    rows.append(_skipped_row(setting, threads, variant))
                    continue
                spec = dict(setting=setting, variant=variant, root=str(root), images=args.images,
                            passes=args.passes, calibrate=args.calibrate, threads=threads,
                            overrides=args.overrides, size=args.size)
                r = _worker(spec)
                if "error" in r:
                    print(f"  {setting} {threads}t {variant}: failed: {r['error']}", flush=True)
                    rows.append([setting, str(threads), variant, "failed", "", "", "", r["error"]])
                    continue
                base = r["images_per_s"] if variant.startswith("torchvision") else base
                ratio = f"{r['images_per_s'] / base:.2f}x" if base else ""
                print(f"  {setting} {threads}t {variant:24s} {r['images_per_s']:6.2f} images/s {ratio:>6s} "
                      f"warm-up {r['warmup_s']:.0f} s, peak {r['peak_mb']:.0f} MB", flush=True)
                rows.append([setting, str(threads), variant, f"{r['images_per_s']:.2f}", ratio,
                             f"{r['peak_mb']:.0f}", f"{r['warmup_s']:.0f}", ""])
    how = ("all variants in one process per setting and thread count, taking turns image by image; "
           "images/s from the median time per image; no per-variant peak memory" if args.interleave else
           "one run; peak = the subprocess's peak RSS after warm-up")
    header = (f"Inference, this toolkit's fast paths vs torchvision {__import__('torchvision').__version__} eager "
              f"fp32 (torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d')}, {args.images} images x "
              f"{args.passes} passes, {how})"
              + (f"\n\n{note}" if note else ""))
    lines = [header, "", "| setting | threads | variant | images/s | vs torchvision | peak RSS MB | warm-up s | note |",
             "|---|---|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    return text


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(measure_interleaved(job) if "variants" in job else measure_variant(job)))
