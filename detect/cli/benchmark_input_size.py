"""``tools/benchmark_input_size.py``: what each input size costs and what it buys small objects, on your data.

    tools/benchmark_input_size.py --config configs/faster_rcnn/tiny_custom.yaml --set data.root=DIR \\
        [--sizes 256,384,512] [--iters 12] [--images 8] [--threads 1] [--out sizes.md]

For each shorter side (the longer side capped as ``detect/input_size.py`` does: the widest image not
shrunk further, at most 1333): the share of the training split's objects at least 16 and 32 px at the
network input (all, and the worst class), the CPU seconds of one training step of ``train.images_per_batch``
images (random weights: speed does not depend on them) and of one test image, and each as a ratio to
the first size. CPU time of this process (``time.process_time``), so that other jobs on the machine
change the numbers little; the sizes are timed in turn, ``--repeats`` times, and the median is kept.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-benchmark-input-size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sizes", default="256,384,512", help="shorter sides, comma-separated")
    parser.add_argument("--iters", type=int, default=12, help="timed training steps per size and repeat")
    parser.add_argument("--images", type=int, default=8, help="timed test images per size and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers separated by commas, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 32 or args.iters < 1 or args.images < 1 or args.repeats < 1:
        parser.error("--sizes must be >= 32 px and --iters / --images / --repeats at least 1")
    return args


def longer_side(records, short: int) -> int:
    """The longer-side cap the input-size rule pairs with ``short`` (:meth:`ObjectTable.longer_side`)."""
    from detect.input_size import object_table

    return object_table(records).longer_side(short)


def _sized(cfg, short: int, long: int):
    import copy

    sized = copy.deepcopy(cfg)
    sized.model.input.auto, sized.model.anchors.auto = False, False
    sized.model.input.min_size, sized.model.input.max_size, sized.model.input.test_min_size = [short], long, short
    return sized


def _time_size(cfg, dataset, class_names, iters: int, images: int) -> tuple[float, float]:
    """CPU seconds of one training step and of one test image at ``cfg``'s input size (after one untimed each)."""
    import torch

    from detect.build import build_model
    from detect.data.loader import collate

    torch.manual_seed(0)
    model = build_model(cfg, class_names=list(class_names)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    per_batch = cfg.train.images_per_batch
    batches = [collate([dataset[(i * per_batch + j) % len(dataset)] for j in range(per_batch)])
               for i in range(iters + 1)]
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.process_time()
        loss = sum(model.loss(batch.images, batch.targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_s = (time.process_time() - start) / iters
    model.eval()
    pictures = [dataset[i % len(dataset)][0] for i in range(images + 1)]
    with torch.no_grad():
        model.predict(pictures[:1])
        start = time.process_time()
        for picture in pictures[1:]:
            model.predict([picture])
    return train_s, (time.process_time() - start) / images


def run(args: argparse.Namespace) -> str:
    from detect import load_config
    from detect.data.loader import build_dataset, load_records
    from detect.input_size import size_statistics
    from detect.utils.training_speed import cpu_model

    threads = apply_runtime(args).threads
    cfg = load_config(args.config, args.overrides)
    if cfg.model.pipeline != "faster_rcnn":
        raise ConfigError(f"{args.config}: model.pipeline is {cfg.model.pipeline!r}; this benchmark times "
                          "Faster R-CNN (whose cost is all in the image size)")
    records, class_names, _ = load_records(cfg, cfg.data.train_split)
    longs = {short: longer_side(records, short) for short in args.sizes}
    sized = {short: _sized(cfg, short, longs[short]) for short in args.sizes}
    datasets = {short: build_dataset(sized[short], cfg.data.train_split, train=True) for short in args.sizes}
    rows, times = [], {s: ([], []) for s in args.sizes}
    for _ in range(args.repeats):
        for short in args.sizes:
            train_s, test_s = _time_size(sized[short], datasets[short], class_names, args.iters, args.images)
            times[short][0].append(train_s)
            times[short][1].append(test_s)
    first = None
    for short in args.sizes:
        long = longs[short]
        stats = size_statistics(records, class_names, min_size=short, max_size=long)
        present = [row for row in stats[:-1] if row.count]
        worst16 = max(present, key=lambda row: row.under_16)
        worst32 = max(present, key=lambda row: row.under_32)
        train_s, test_s = (statistics.median(t) for t in times[short])
        first = first or (train_s, test_s)
        rows.append(f"| {short} / {long} | {1 - stats[-1].under_16:.1%} / {1 - worst16.under_16:.1%} ({worst16.name}) "
                    f"| {1 - stats[-1].under_32:.1%} / {1 - worst32.under_32:.1%} ({worst32.name}) "
                    f"| {train_s:.3f} | {train_s / first[0]:.2f}x | {test_s:.3f} | {test_s / first[1]:.2f}x |")
    table = "\n".join([
        f"CPU: {cpu_model()}; {threads} thread(s); CPU seconds (median of {args.repeats}); "
        f"{cfg.train.images_per_batch} images per step; {cfg.model.backbone.name} trunk; {cfg.data.root}",
        "",
        "| input (short / long cap) | objects >= 16 px: all / worst class | >= 32 px: all / worst class "
        "| train s/step | vs first | test s/img | vs first |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows])
    print(table)
    if args.out:
        from detect.utils.io import atomic_write_text

        atomic_write_text(args.out, table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
