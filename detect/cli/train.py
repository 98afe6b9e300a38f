"""``detect-train`` / ``tools/train.py``: train a detector from a config.

    tools/train.py --config configs/faster_rcnn/tiny_synthetic.yaml [--set train.lr=0.01 ...] [--out DIR] [--resume]
    torchrun --nproc_per_node 2 tools/train.py --config ...      # DistributedDataParallel, same global batch

The output folder receives ``config.yaml`` (the resolved config), ``class_names.json``,
``metrics.jsonl`` (and TensorBoard events when installed), ``checkpoints/ckpt_*.pt``
(the newest ``train.keep_checkpoints``) and ``model_final.pt``. At the end the model
is evaluated on the test split and its mAP printed (the config's ``test.metric``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from detect import distributed
from detect.cli.common import METRIC_NAMES, format_ap, run_distributed_cli
from detect.errors import ConfigError, DetectError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="continue from CKPT, or (without a value) from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out folder that holds checkpoints of an earlier run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only); same as --set train.amp=true")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-test", action="store_true", help="skip the final evaluation on the test split")
    parser.add_argument("--proposals-limit", type=int, default=None, metavar="N",
                        help="selective-search boxes kept per image in the store (same as --set proposals.top_k=N)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Print on rank 0 without breaking the progress bar."""
    if distributed.is_main():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out`` and prove it writable; refuse to mix a fresh run into an earlier run's checkpoints."""
    from detect.checkpoint import list_checkpoints

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DetectError(f"output folder {out} is not writable ({exc.strerror or exc})") from None
    run_dirs = [out, *sorted(out.glob("step[1-4]"))]    # step<k>: alternating training
    old = [path for d in run_dirs for _, path in list_checkpoints(d / "checkpoints")]
    if old and not resume:
        if not overwrite:
            raise DetectError(f"output folder {out} already holds checkpoints ({old[-1]}); pass --resume to "
                              f"continue that run, --overwrite to start afresh, or another --out")
        for path in old:
            path.unlink(missing_ok=True)
        for d in run_dirs:
            (d / "model_final.pt").unlink(missing_ok=True)
            for diverged in (d / "checkpoints").glob("ckpt_*.pt.diverged"):
                diverged.unlink()


def resolve_resume(value: str | None, out: Path) -> Path | None:
    """``--resume CKPT``: that file; ``--resume``: the run folder (its newest usable checkpoint), or None."""
    from detect.checkpoint import latest_checkpoint

    if value is None:
        return None
    if value != "auto":
        return Path(value)
    if latest_checkpoint(out) is None:
        log(f"--resume: no checkpoint in {out}/checkpoints yet; starting from scratch")
        return None
    return out


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; returns ``{"out", "final_checkpoint", "test": metrics or None}``."""
    from detect import load_config
    from detect.runlog import lock_run_dir

    overrides = list(args.overrides) + (["train.amp=true"] if args.amp else [])
    overrides += [f"proposals.top_k={args.proposals_limit}"] if args.proposals_limit is not None else []
    cfg = load_config(args.config, overrides)
    info = distributed.init_from_env(args.device)
    out = args.out or Path("runs") / args.config.stem
    with lock_run_dir(out, log=log):   # before anything is written or deleted there
        return _train(args, cfg, info, out)


def _train(args: argparse.Namespace, cfg, info, out: Path) -> dict:
    from detect import build_model
    from detect.config import dump_config
    from detect.data.loader import build_dataset
    from detect.engine import evaluate_split, fit
    from detect.runlog import MetricsLog
    from detect.utils.io import atomic_write_json

    if distributed.is_main():
        prepare_out_dir(out, resume=args.resume is not None, overwrite=args.overwrite)
    distributed.barrier()
    alternating = cfg.train.training_mode == "alternating"
    resume = None if alternating else resolve_resume(args.resume, out)
    if alternating and cfg.model.pipeline != "faster_rcnn":
        raise ConfigError(f"{args.config}: train.training_mode 'alternating' is the 4-step training of Faster R-CNN; "
                          f"model.pipeline is '{cfg.model.pipeline}'")

    train_set = build_dataset(cfg, cfg.data.train_split, train=True, strict=args.strict)
    val_set = build_dataset(cfg, cfg.data.val_split, strict=args.strict) if cfg.train.eval_period > 0 else None

    def build():
        torch.manual_seed(cfg.train.seed)   # same initial weights on every rank and every run
        return build_model(cfg, class_names=train_set.class_names)

    if distributed.is_main():
        dump_config(cfg, out / "config.yaml")
        atomic_write_json(out / "class_names.json", train_set.class_names)
        log(f"training on {len(train_set)} images of '{cfg.data.train_split}' ({len(train_set.class_names)} classes), "
            f"{info.world_size} process(es) on {info.device}, output in {out}")
    pipeline = cfg.model.pipeline
    section = {"fast_rcnn": cfg.fast_rcnn, "rcnn": cfg.rcnn}.get(pipeline)
    if section is not None and section.proposal_source == "stored":
        # Fast R-CNN and R-CNN read selective-search boxes from the store: fill it first (resumable).
        from detect.proposal_sources import ensure_stored_proposals

        splits = [cfg.data.train_split] + ([] if args.no_test else [cfg.test.split or cfg.data.test_split])
        if distributed.is_main():
            for split in dict.fromkeys(splits):
                log(f"selective-search proposals for '{split}' (computed once, then read from {cfg.proposals.store or 'the store'})")
                ensure_stored_proposals(cfg, split, workers=max(cfg.train.workers, 1), progress=not args.no_progress, log=log)
        distributed.barrier()
    if pipeline == "rcnn" and distributed.is_main():
        log("R-CNN: tools/train.py runs stage 1 (fine-tuning); tools/train_rcnn.py runs stages 2-4 (features, SVMs, box regression)")
    if alternating and cfg.pretrain.steps:
        raise ConfigError(f"{args.config}: pretrain.steps is not combined with train.training_mode 'alternating' "
                          "(set pretrain.steps=0, or train jointly)")
    if alternating:
        from detect.alternating import fit_alternating

        result = fit_alternating(build, train_set, cfg, out_dir=out, device=info.device, val_set=val_set,
                                 resume=args.resume is not None, log=log, progress=not args.no_progress)
        model = result["model"]
    else:
        model = build()
        if resume is None and cfg.pretrain.steps:
            # Rank 0 pre-trains alone, with the threads of every process on its node (the others wait);
            # DistributedDataParallel then starts every rank from rank 0's weights and buffers.
            from detect.pretrain import pretrain_trunk

            if distributed.is_main():
                threads = torch.get_num_threads()
                torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                try:
                    pretrain_trunk(model.backbone, train_set.records, len(train_set.class_names), cfg.pretrain,
                                   device=info.device, log=log)
                finally:
                    torch.set_num_threads(threads)
            distributed.barrier()
        result = fit(model, train_set, cfg, out_dir=out, device=info.device, val_set=val_set, resume=resume,
                     log=log, progress=not args.no_progress)

    test = None
    if not args.no_test:
        split = cfg.test.split or cfg.data.test_split
        test_set = build_dataset(cfg, split, strict=args.strict)
        metric = cfg.test.metric
        scored, _ = evaluate_split(model, test_set, device=info.device, metric=metric, log=log,
                                   batch_size=cfg.test.images_per_batch, workers=cfg.train.workers,
                                   progress=not args.no_progress)
        by_metric = scored if metric == "all" else {metric: scored}
        test = by_metric["voc07"] if metric == "all" else scored
        if distributed.is_main():
            for name_of_metric, res in by_metric.items():
                MetricsLog.append(out, {"iteration": result["iteration"], "split": split, "metric": name_of_metric,
                                        "mAP": res["mAP"], "per_class": res["per_class"]})
                for name, ap in res["per_class"].items():
                    log(f"  {name:>20s}  AP {format_ap(ap)}")
                log(f"{METRIC_NAMES[name_of_metric]} mAP on '{split}' ({len(test_set)} images): {format_ap(res['mAP'])}")
    if distributed.is_main():
        log(f"final weights: {result['final_checkpoint']}")
    return {"out": out, "final_checkpoint": result["final_checkpoint"], "test": test}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_distributed_cli(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
