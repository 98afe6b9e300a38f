"""``tools/benchmark_precision.py``: VOC07 mAP of a checkpoint eager fp32 vs bf16 / int8 (a benchmark, not a test).

    tools/benchmark_precision.py --checkpoint runs/x/model_final.pt [--data DIR] [--calibrate 32] [--limit 200]

The test split is the checkpoint's own (the synthetic split it was trained with) or, with ``--data``,
a VOC-format folder's ``test`` split (classes must match the checkpoint's). int8 is calibrated on the
first ``--calibrate`` images of the training split (never test images).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli


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


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(precision, VOC07 mAP, seconds) rows, eager fp32 first."""
    apply_runtime(args)
    import torch

    from detect.build import model_from_checkpoint
    from detect.data.loader import build_dataset
    from detect.engine import evaluate_split
    from detect.errors import DetectError
    from detect.fast_inference import bf16_note, optimize

    overrides = [] if args.data is None else ["data.format=voc", f"data.root={args.data}", "data.test_split=test",
                                              "data.train_split=trainval"]
    model, cfg, _ = model_from_checkpoint(args.checkpoint, overrides=overrides)
    test_set = build_dataset(cfg, cfg.data.test_split)
    if list(test_set.class_names) != list(model.class_names):
        raise DetectError(f"{args.data}: classes {test_set.class_names} differ from the checkpoint's {model.class_names}")
    train_set = build_dataset(cfg, cfg.data.train_split)
    calibration = [train_set[i][0] for i in range(min(args.calibrate, len(train_set)))]
    note = bf16_note()
    rows = []
    for precision in ["eager fp32", *[p for p in args.precisions.split(",") if p]]:
        start = time.perf_counter()
        if precision == "eager fp32":
            fast = model
        else:
            if precision == "bf16" and note:
                print(note)
            fast = optimize(model, precision=precision, compile=not args.no_compile, calibration_images=calibration)
        metrics, _ = evaluate_split(fast, test_set, device=torch.device("cpu"), metric="voc07",
                                    log=lambda *_: None, limit=args.limit)
        rows.append((precision, metrics["mAP"], time.perf_counter() - start))
        print(f"  {precision:10s} VOC07 mAP {metrics['mAP']:.4f}  (change {100 * (metrics['mAP'] - rows[0][1]):+.2f} "
              f"points, {rows[-1][2]:.0f} s with compilation)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
