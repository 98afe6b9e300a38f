"""``tools/benchmark.py ladder|training``: R-CNN, Fast R-CNN and Faster R-CNN side by side, at test and training time.

    tools/benchmark.py ladder --rcnn runs/rcnn/model_final.pt --fast runs/fast/model_final.pt \\
        --faster runs/faster/model_final.pt [--split test] [--limit 50] [--out ladder.md] [--device cpu|cuda]
    tools/benchmark.py ladder --from-configs configs/rcnn/vgg16_voc07.yaml,configs/fast_rcnn/vgg16_voc07.yaml,\\
configs/faster_rcnn/vgg16_voc07.yaml --set data.root=../shared/data/bccd --set data.classes=auto \\
        --limit 3 --rcnn-proposals 64 --svd 1024,256 --threads 1 --clock cpu

For each pipeline: seconds per image split into proposals, features and heads, the total,
and VOC07 mAP, as one markdown table (printed and written to ``--out``). The pipelines
must share a backbone and a class list. Selective search runs once per test image,
timed, and the same boxes feed R-CNN and Fast R-CNN; its time is their "proposals"
column (the papers count it when comparing with Faster R-CNN, whose RPN time is its own
"proposals"). Ratios follow the table: Fast R-CNN vs R-CNN without proposal time (Fast
R-CNN Table 4: 146x, 213x with SVD, VGG16 on a GPU), and Faster vs Fast R-CNN with it
(Faster R-CNN Table 5).

``training`` trains each config's pipeline for the same iterations on the first ``--limit``
training images and times every stage (R-CNN: proposals, fine-tuning, features, SVMs, box
regression; Fast R-CNN: proposals, training; Faster R-CNN: training), printing the CPU model::

    tools/benchmark.py training --configs configs/rcnn/tiny_bccd.yaml,configs/fast_rcnn/tiny_bccd.yaml,\
configs/faster_rcnn/tiny_synthetic.yaml --set data.format=voc --set data.root=../shared/data/bccd \
        --set data.classes=auto --set model.backbone.name=tiny --limit 40 --iters 100 --threads 1

``--from-configs`` builds each pipeline from its config with random weights instead of
loading checkpoints: a real backbone's speed needs no trained model (mAP is then
"n/a"). ``--rcnn-proposals K`` runs R-CNN on only the first K proposals of each image
and scales its features and heads linearly to the full count -- the warps go through
the CNN in fixed-size batches, so the cost is linear in the count, and VGG16 at ~0.4 s
per warp on one CPU core would take ~13 minutes per image at 2,000. ``--svd R6,R7``
adds Fast R-CNN with truncated-SVD fc6 / fc7 (Sec. 3.1). ``--clock cpu`` reads stage
times from this process's CPU time, for machines shared with other jobs. Each pipeline
makes one untimed prediction first; then every image goes through the pipelines in turn,
so a change in the machine's load during the run hits them all alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ConfigError
from detect.utils.speed import add_sums, per_image, time_images, timed_selective_search, warm_up

PIPELINES = (("rcnn", "R-CNN"), ("fast", "Fast R-CNN"), ("fast_svd", "Fast R-CNN + SVD"), ("faster", "Faster R-CNN"))
PIPELINE_OF = {"rcnn": "rcnn", "fast": "fast_rcnn", "faster": "faster_rcnn"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _paths(text: str) -> list[Path]:
    return [Path(p) for p in text.split(",") if p.strip()]


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--svd wants ranks like 1024,256 (fc6, fc7; 0 keeps a layer), not '{text}'")
    if not any(r > 0 for r in ranks) or any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(f"--svd {text}: ranks must be >= 0 and at least one > 0")
    return ranks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("torchvision", add_help=False,
                   help="this toolkit's Faster R-CNN against torchvision's, configured alike (see `torchvision --help`)")
    _training_parser(sub)
    ladder = sub.add_parser("ladder", help="the three pipelines, same backbone, same images: time and mAP")
    ladder.add_argument("--rcnn", type=Path, help="R-CNN checkpoint")
    ladder.add_argument("--fast", type=Path, help="Fast R-CNN checkpoint")
    ladder.add_argument("--faster", type=Path, help="Faster R-CNN checkpoint")
    ladder.add_argument("--from-configs", type=_paths, default=None, metavar="A.yaml,B.yaml,...",
                        help="instead of checkpoints: build each config's pipeline with random weights (timing "
                             "only, backbone weights 'none' unless --set says otherwise); the test images come "
                             "from the data section of the R-CNN config, else Fast R-CNN's, else Faster R-CNN's")
    ladder.add_argument("--split", default=None, help="test split (default: the first model's test split)")
    ladder.add_argument("--limit", type=int, default=0, help="only the first N images")
    ladder.add_argument("--rcnn-proposals", type=int, default=0, metavar="K",
                        help="time R-CNN on the first K proposals of each image and extrapolate linearly to the "
                             "full count (0: all)")
    ladder.add_argument("--svd", type=_ranks, default=None, metavar="RANK6,RANK7",
                        help="also time Fast R-CNN with truncated-SVD fc layers, e.g. 1024,256 (Sec. 3.1)")
    ladder.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="stage times from the wall clock or from this process's CPU time (a shared machine)")
    ladder.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time from the first call (default: one untimed prediction per pipeline first)")
    ladder.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ladder.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every config, e.g. data.root=/data/VOC2007")
    ladder.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_runtime_args(ladder)
    return parser.parse_args(argv)


def _training_parser(sub) -> None:
    training = sub.add_parser("training", help="the three pipelines trained alike: seconds per training stage")
    training.add_argument("--configs", type=_paths, required=True, metavar="A.yaml,B.yaml,...",
                          help="at most one config each of rcnn, fast_rcnn and faster_rcnn")
    training.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of every config, e.g. data.root=../shared/data/bccd")
    training.add_argument("--limit", type=int, default=0, help="the first N training images (0: all)")
    training.add_argument("--iters", type=int, default=0,
                          help="training iterations of every pipeline (steps at 3/4; 0: each config's own)")
    training.add_argument("--clock", default="cpu", choices=tuple(CLOCKS),
                          help="stage times from this process's CPU time (default: a shared machine) or the wall")
    add_runtime_args(training)
    training.add_argument("--run-dir", type=Path, default=None,
                          help="folder for the runs, store and cache (default: a temporary one, deleted)")
    training.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    training.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    training.add_argument("--progress", action="store_true", help="progress bars for each stage")


def run_training(args: argparse.Namespace) -> dict:
    """``training``: load the configs alike, time every pipeline's training, print and write the table."""
    import tempfile

    from detect.distributed import resolve_device
    from detect.utils.io import atomic_write_text
    from detect.utils.training_speed import cpu_model, format_training_table, load_training_configs, time_training

    apply_runtime(args)
    configs = load_training_configs(args.configs, args.overrides, iters=args.iters)
    device = resolve_device(args.device)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        runs = time_training(configs, out_dir=args.run_dir or Path(scratch), limit=args.limit, device=device,
                             clock=CLOCKS[args.clock], progress=args.progress,
                             log=lambda m: print(m, file=sys.stderr))
    note = f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    table = format_training_table(runs, cpu=cpu_model(), threads=torch.get_num_threads(), clock=args.clock, note=note)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out, table + "\n")
        print(f"table written to {args.out}", file=sys.stderr)
    return runs


def _models_from_checkpoints(args, device) -> tuple[dict, bool]:
    from detect.build import model_from_checkpoint

    models = {}
    for key in PIPELINE_OF:
        path = getattr(args, key)
        if path is None:
            continue
        model, cfg, ckpt = model_from_checkpoint(path, overrides=args.overrides, device=device)
        if cfg.model.pipeline != PIPELINE_OF[key]:
            raise ConfigError(f"--{key} {path}: that checkpoint is a '{cfg.model.pipeline}' model, "
                              f"not '{PIPELINE_OF[key]}'")
        models[key] = (model, cfg, tuple(ckpt["class_names"]))
    return models, True


def _models_from_configs(args, device, dataset_for) -> tuple[dict, bool]:
    """Each config's pipeline with random weights (timing only); R-CNN gets random SVMs and box regressors."""
    from detect import build_model, load_config

    key_of = {pipeline: key for key, pipeline in PIPELINE_OF.items()}
    configs = {}
    for path in args.from_configs:
        # random weights unless --set names a local file; the proposals are the timed boxes, no store is read
        cfg = load_config(path, ["model.backbone.weights=none", *args.overrides])
        key = key_of.get(cfg.model.pipeline)
        if key is None or key in configs:
            raise ConfigError(f"--from-configs {path}: a '{cfg.model.pipeline}' config; give at most one config "
                              "each of rcnn, fast_rcnn and faster_rcnn")
        configs[key] = cfg
    first = configs[next(k for k in PIPELINE_OF if k in configs)]
    names = dataset_for(first).class_names
    models = {}
    for key in PIPELINE_OF:
        if key not in configs:
            continue
        cfg = configs[key]
        cfg.rcnn.proposal_source = cfg.fast_rcnn.proposal_source = "selective_search"
        torch.manual_seed(0)
        model = build_model(cfg, class_names=names).to(device).eval()
        if key == "rcnn":
            _random_rcnn_heads(model)
        models[key] = (model, cfg, tuple(names))
    return models, False


@torch.no_grad()
def _random_rcnn_heads(model) -> None:
    """Random linear SVMs and box regressors, so an untrained R-CNN times the paper's test path (Sec. 2.2)."""
    for head in (model.head.svm, model.head.box_regressor):
        head.weight.normal_(0.0, 1e-3)
        head.fitted.fill_(True)


def run(args: argparse.Namespace) -> dict:
    from detect.data.loader import build_dataset
    from detect.distributed import resolve_device
    from detect.evaluation import evaluate
    from detect.utils.io import atomic_write_text

    apply_runtime(args)
    given = [key for key in PIPELINE_OF if getattr(args, key) is not None]
    if args.from_configs is not None and given:
        raise ConfigError("ladder: give checkpoints (--rcnn/--fast/--faster) or --from-configs, not both")
    if not given and not args.from_configs:
        raise ConfigError("ladder: give at least one of --rcnn, --fast, --faster, or --from-configs")
    if args.rcnn_proposals < 0:
        raise ConfigError(f"--rcnn-proposals {args.rcnn_proposals}: must be >= 0")
    device = resolve_device(args.device)
    datasets: dict = {}

    def dataset_for(cfg):
        split = args.split or cfg.test.split or cfg.data.test_split
        if split not in datasets:
            datasets[split] = build_dataset(cfg, split)
        return datasets[split]

    if args.from_configs:
        models, trained = _models_from_configs(args, device, dataset_for)
    else:
        models, trained = _models_from_checkpoints(args, device)
    first_cfg = next(iter(models.values()))[1]
    backbones = {k: cfg.model.backbone.name for k, (_, cfg, _) in models.items()}
    if len(set(backbones.values())) > 1:
        raise ConfigError(f"ladder: the pipelines have different backbones {backbones}; compare like with like")
    classes = {k: names for k, (_, _, names) in models.items()}
    if len(set(classes.values())) > 1:
        raise ConfigError(f"ladder: the checkpoints were trained for different classes {classes}")
    if args.svd is not None:
        models["fast_svd"] = _compressed(models, args.svd, trained)
    split = args.split or first_cfg.test.split or first_cfg.data.test_split
    dataset = dataset_for(first_cfg)
    count = min(len(dataset), args.limit) if args.limit > 0 else len(dataset)
    records = dataset.records[:count]
    clock = CLOCKS[args.clock]
    proposals, ss_seconds, ss_wall = ({}, 0.0, 0.0)
    if "rcnn" in models or "fast" in models:
        print(f"selective search on {count} images ...", file=sys.stderr)
        proposals, ss_seconds, ss_wall = timed_selective_search(first_cfg, dataset, count, clock)
    order = [(key, label) for key, label in PIPELINES if key in models]
    samples = {key: args.rcnn_proposals if key == "rcnn" else 0 for key, _ in order}
    boxes = {key: None if key == "faster" else proposals for key, _ in order}
    if args.warmup:
        for key, _ in order:
            warm_up(models[key][0], dataset, count, boxes[key], device=device, sample=samples[key])
    detections = {key: {} for key, _ in order}
    sums: dict = {key: {} for key, _ in order}
    for index in range(count):     # image by image, every pipeline in turn: load drift hits them all alike
        print(f"image {index + 1}/{count} ...", file=sys.stderr)
        for key, _ in order:
            found, more = time_images(models[key][0], dataset, [index], boxes[key], device=device, clock=clock,
                                      sample=samples[key])
            detections[key].update(found)
            add_sums(sums[key], more)
    rows = {}
    for key, label in order:
        cfg, times = models[key][1], per_image(sums[key])
        row = {"label": label, "features": times["features"], "heads": times["heads"],
               "rois": f"≤{cfg.model.rpn.post_nms_top_n_test}" if key == "faster" else f"{times['rois']:.0f}",
               "mean_rois": times["rois"], "sampled": times["sampled"] if samples[key] else 0.0}
        row["no_proposals"] = row["features"] + row["heads"]
        row["proposals"] = times["proposals"] if key == "faster" else ss_seconds
        row["total"] = row["no_proposals"] + row["proposals"]
        row["wall"] = times["wall"] + (0.0 if key == "faster" else ss_wall)
        row["mAP"] = evaluate(records, detections[key], dataset.class_names, "voc07")["mAP"] if trained else None
        rows[key] = row
        print(f"{label}: {row['total']:.3f} s per image", file=sys.stderr)
    table = format_table(rows, backbone=next(iter(backbones.values())), split=split, count=count, device=str(device),
                         clock=args.clock, threads=torch.get_num_threads(), sample=args.rcnn_proposals,
                         svd=args.svd)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out, table + "\n")
        print(f"table written to {args.out}", file=sys.stderr)
    return rows


def _compressed(models: dict, ranks: list[int], trained: bool) -> tuple:
    """Fast R-CNN with truncated-SVD fc layers; untrained weights only need the factorised shape."""
    from detect.svd import compress_fc

    if "fast" not in models:
        raise ConfigError("--svd compresses the Fast R-CNN model: give --fast or a fast_rcnn config")
    model, cfg, names = models["fast"]
    small = copy.deepcopy(model)
    try:
        for line in compress_fc(small.head.box_head, ranks, structure_only=not trained):
            print(f"svd: {line}", file=sys.stderr)
    except ValueError as exc:
        raise ConfigError(f"--svd {','.join(map(str, ranks))}: {exc}") from None
    return small.eval(), cfg, names


def format_table(rows: dict, *, backbone: str, split: str, count: int, device: str, clock: str = "wall",
                 threads: int = 0, sample: int = 0, svd: list[int] | None = None) -> str:
    """The ladder as markdown, with the papers' speed ratios and the measurement's caveats below it."""
    wall_column = clock != "wall"
    unit = "CPU seconds (this process)" if clock == "cpu" else "seconds"
    lines = [f"Backbone `{backbone}`, {count} images of '{split}', {device}"
             f"{f', {threads} thread(s)' if threads else ''}; {unit} per image.", "",
             "| pipeline | RoIs | proposals | features | heads | total w/o proposals | total |"
             f"{' wall total |' if wall_column else ''} VOC07 mAP |",
             f"|---|---:|---:|---:|---:|---:|---:|{'---:|' if wall_column else ''}---:|"]
    for key, row in rows.items():
        mark = "*" if key == "rcnn" and row["sampled"] else ""
        score = "n/a (untrained, timing only)" if row["mAP"] is None else f"{row['mAP']:.4f}"
        wall = f" {row['wall']:.4f}{mark} |" if wall_column else ""
        lines.append(f"| {row['label']} | {row['rois']} | {row['proposals']:.4f} | {row['features']:.4f}{mark} | "
                     f"{row['heads']:.4f}{mark} | {row['no_proposals']:.4f}{mark} | {row['total']:.4f}{mark} |"
                     f"{wall} {score} |")
    lines.append("")
    if "rcnn" in rows and rows["rcnn"]["sampled"]:
        r = rows["rcnn"]
        lines.append(f"- \\* extrapolated: R-CNN's features and heads were timed on the first {sample} proposals of "
                     f"each image (mean {r['sampled']:.0f}) and scaled linearly to its full count "
                     f"(mean {r['mean_rois']:.0f})"
                     + (f"; its mAP is over those {sample} proposals" if r["mAP"] is not None else ""))
    if clock == "cpu":
        lines.append("- stage times are process CPU time (time.process_time); 'wall total' is elapsed time")
    if "rcnn" in rows and "fast" in rows:
        ratio = rows["rcnn"]["no_proposals"] / max(rows["fast"]["no_proposals"], 1e-12)
        with_ss = rows["rcnn"]["total"] / max(rows["fast"]["total"], 1e-12)
        lines.append(f"- Fast R-CNN vs R-CNN, test time without proposals: {ratio:.1f}x faster "
                     f"(goal >= 50x; the paper: 146x, 213x with truncated SVD, VGG16 on a GPU); "
                     f"with selective search counted: {with_ss:.1f}x")
    if "rcnn" in rows and "fast_svd" in rows:
        ratio = rows["rcnn"]["no_proposals"] / max(rows["fast_svd"]["no_proposals"], 1e-12)
        ranks = "/".join(map(str, svd or []))
        lines.append(f"- Fast R-CNN + SVD ({ranks}) vs R-CNN, without proposals: {ratio:.1f}x faster")
    if "fast" in rows and "fast_svd" in rows:
        cut = 1 - rows["fast_svd"]["heads"] / max(rows["fast"]["heads"], 1e-12)
        lines.append(f"- truncated SVD cuts Fast R-CNN's head time by {100 * cut:.0f}%")
    if "fast" in rows and "faster" in rows:
        ratio = rows["fast"]["total"] / max(rows["faster"]["total"], 1e-12)
        lines.append(f"- Faster R-CNN vs Fast R-CNN, with proposal time: {ratio:.1f}x faster "
                     f"(the paper: 1.83 s -> 0.198 s per image, VGG16 on a GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchvision"]:   # ours against torchvision's FasterRCNN: detect/cli/benchmark_torchvision.py
        from detect.cli.benchmark_torchvision import main as torchvision_main

        return torchvision_main(argv[1:])
    args = parse_args(argv)
    return run_cli(lambda: ((run_training if args.mode == "training" else run)(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
