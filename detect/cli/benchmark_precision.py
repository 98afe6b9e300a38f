"""``tools/benchmark_precision.py``: VOC07 mAP of a checkpoint eager fp32 vs bf16 / int8 (a benchmark, not a test).

    tools/benchmark_precision.py --checkpoint runs/x/model_final.pt [--data DIR] [--calibrate 32] [--limit 200]

The test split is the checkpoint's own (the synthetic split it was trained with) or, with ``--data``,
a VOC-format folder's ``test`` split (classes must match the checkpoint's). int8 is calibrated on the
first ``--calibrate`` images of the training split (never test images). Each row also gives the
model's milliseconds per test image (``predict`` only, per stage too) after a warm-up on two training
images that compiles the graphs, and its speed against eager fp32 in the same run.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli

WARMUP = 2          # training images run before timing (compilation happens there)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark-precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=None, help="VOC folder (default: the checkpoint's data)")
    parser.add_argument("--calibrate", type=int, default=32, metavar="N", help="int8: training images to calibrate on")
    parser.add_argument("--precisions", default="int8,bf16", help="comma-separated: fp32 (compiled), bf16, int8")
    parser.add_argument("--no-compile", action="store_true", help="eager bf16 / int8 reference (slow for int8)")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per precision, eager fp32 first: "precision", "mAP", "ms_per_image", "stages_ms", "prepare_s"."""
    apply_runtime(args)
    from detect.build import model_from_checkpoint
    from detect.data.loader import build_dataset
    from detect.errors import DetectError
    from detect.fast_inference import bf16_note, cpu_model

    overrides = [] if args.data is None else ["data.format=voc", f"data.root={args.data}", "data.test_split=test",
                                              "data.train_split=trainval"]
    model, cfg, _ = model_from_checkpoint(args.checkpoint, overrides=overrides)
    test_set = build_dataset(cfg, cfg.data.test_split)
    if list(test_set.class_names) != list(model.class_names):
        raise DetectError(f"{args.data}: classes {test_set.class_names} differ from the checkpoint's {model.class_names}")
    train_set = build_dataset(cfg, cfg.data.train_split)
    calibration = [train_set[i][0] for i in range(min(max(args.calibrate, WARMUP), len(train_set)))]
    note = bf16_note()
    print(f"{cpu_model()}, {__import__('torch').get_num_threads()} thread(s), {args.checkpoint}, "
          f"{min(args.limit or len(test_set), len(test_set))} test images", flush=True)
    rows = []
    for precision in ["eager fp32", *[p for p in args.precisions.split(",") if p]]:
        if precision == "bf16" and note:
            print(note)
        rows.append(measure(model, precision, test_set, calibration[: args.calibrate], calibration[:WARMUP], args))
        row, base = rows[-1], rows[0]
        print(f"  {precision:10s} VOC07 mAP {row['mAP']:.4f} (change {100 * (row['mAP'] - base['mAP']):+.2f} points), "
              f"{row['ms_per_image']:.1f} ms/image = {base['ms_per_image'] / row['ms_per_image']:.2f}x eager fp32 "
              f"[{', '.join(f'{k} {v:.1f}' for k, v in row['stages_ms'].items())} ms], "
              f"prepared in {row['prepare_s']:.0f} s, {row['recompiles']} recompilations while timed", flush=True)
    return rows


def measure(model, precision: str, test_set, calibration: list, warmup: list, args) -> dict:
    """Optimize ``model`` for ``precision``, warm it up on training images, score the test split.

    ``ms_per_image`` is the model's own time (``predict``, as tools/test.py times it), after the
    warm-up that compiles the graphs; recompilations during the timed pass are counted.
    """
    import torch

    from detect.detector import TIMING_KEYS
    from detect.engine import evaluate_split
    from detect.fast_inference import compile_count, optimize

    start = time.perf_counter()
    if precision == "eager fp32":       # the fastest eager model (as the deploy benchmark's)
        fast = copy.deepcopy(model).prepare_for_inference()
    else:
        fast = optimize(model, precision=precision, compile=not args.no_compile, calibration_images=calibration)
    with torch.inference_mode():
        for image in warmup:
            fast.predict([image])
    prepare = time.perf_counter() - start
    graphs, timings = compile_count(), {}
    metrics, _ = evaluate_split(fast, test_set, device=torch.device("cpu"), metric="voc07", log=lambda *_: None,
                                limit=args.limit, timings=timings)
    n = max(1, timings.get("images", 0))
    return {"precision": precision, "mAP": metrics["mAP"], "ms_per_image": 1000 * timings.get("total", 0.0) / n,
            "stages_ms": {k: 1000 * timings.get(k, 0.0) / n for k in TIMING_KEYS if k in timings},
            "prepare_s": prepare, "recompiles": compile_count() - graphs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
