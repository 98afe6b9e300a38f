"""``tools/train_rcnn.py``: R-CNN's four training stages from a config (R-CNN Sec. 2.3, Appendix C).

    tools/train_rcnn.py --config configs/rcnn/tiny_synthetic.yaml [--out DIR] [--stages finetune,features,svm,bbox]
    tools/train_rcnn.py --config C --checkpoint runs/x/finetune/model_final.pt --stages features,svm,bbox

1. ``finetune``: the CNN with a (C+1)-way classifier on warped proposals (``detect.engine.fit`` on
   ``RCNN.loss``), into ``<out>/finetune``; without this stage ``--checkpoint`` gives the fine-tuned CNN.
2. ``features``: fc7 (and pool5 where IoU > 0.6) of every training proposal into the feature cache
   (``rcnn.feature_cache``, default ``<out>/features``); resumable, refuses another model's cache.
3. ``svm``: one-vs-rest linear SVMs with hard negative mining.
4. ``bbox``: class-specific ridge box regression on pool5.

Stored proposals of the train and test splits are computed first when missing (``--proposal-workers``).
Writes ``<out>/model_final.pt`` (a checkpoint ``tools/test.py`` reads) and prints the test mAP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ConfigError

STAGES = ("finetune", "features", "svm", "bbox")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-train-rcnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML config with model.pipeline: rcnn")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {', '.join(STAGES)}")
    parser.add_argument("--checkpoint", type=Path, default=None, help="fine-tuned R-CNN when 'finetune' is skipped")
    parser.add_argument("--proposal-workers", type=int, default=1, help="processes computing missing proposals")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-test", action="store_true", help="skip the final evaluation on the test split")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def run(args: argparse.Namespace) -> dict:
    from detect import load_config
    from detect.distributed import resolve_device
    from detect.runlog import lock_run_dir

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown} (choose from {', '.join(STAGES)})")
    cfg = load_config(args.config, args.overrides)
    apply_runtime(args, cfg.train)
    if cfg.model.pipeline != "rcnn":
        raise ConfigError(f"{args.config}: model.pipeline is '{cfg.model.pipeline}'; tools/train_rcnn.py trains "
                          "'rcnn' (use tools/train.py for the others)")
    device = resolve_device(args.device)
    out = args.out or Path("runs") / args.config.stem
    with lock_run_dir(out, log=log):   # a second run into the same folder is refused
        return _stages(args, cfg, stages, device, out)


def _stages(args: argparse.Namespace, cfg, stages: list[str], device, out: Path) -> dict:
    from detect import build_model
    from detect.checkpoint import load_model_weights, model_from_checkpoint, save_checkpoint
    from detect.config import config_to_dict, dump_config
    from detect.data.loader import build_dataset, load_records
    from detect.engine import fit
    from detect.evaluation import evaluate
    from detect.fast_rcnn import predict_split
    from detect.feature_cache import FeatureCache
    from detect.proposal_sources import ensure_stored_proposals
    from detect.rcnn_training import cache_fingerprint, extract_features, fit_regression_stage, fit_svm_stage

    dump_config(cfg, out / "config.yaml")
    split, test_split = cfg.data.train_split, cfg.test.split or cfg.data.test_split
    if cfg.rcnn.proposal_source == "stored":
        for s in dict.fromkeys([split] + ([] if args.no_test else [test_split])):
            rate = ensure_stored_proposals(cfg, s, workers=args.proposal_workers, progress=not args.no_progress, log=log)
            if rate:
                log(f"proposals: computed the missing boxes of '{s}' ({rate:.2f} s/image)")
    train_set = build_dataset(cfg, split, train=True)
    names = train_set.class_names

    if "finetune" in stages:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, class_names=names)
        log(f"stage 1/4: fine-tuning on {len(train_set)} images of '{split}'")
        fit(model, train_set, cfg, out_dir=out / "finetune", device=device, log=log, progress=not args.no_progress)
    else:
        if args.checkpoint is None:
            raise ConfigError("--checkpoint is needed when the 'finetune' stage is skipped (the fine-tuned R-CNN)")
        model, _, ckpt = model_from_checkpoint(args.checkpoint, device=device)
        fresh = build_model(cfg, class_names=list(ckpt["class_names"]))   # this config's proposal source and settings
        load_model_weights(fresh, ckpt)
        model = fresh.to(device)

    records, _, _ = load_records(cfg, split)
    ids = [r.image_id for r in records]
    cache = FeatureCache(cfg.rcnn.feature_cache or out / "features", fingerprint=cache_fingerprint(model, cfg))
    if "features" in stages:
        log(f"stage 2/4: features of {len(records)} images into {cache.root}")
        done = extract_features(model, records, cache, device=device, use_difficult=cfg.data.use_difficult,
                                min_overlap=cfg.rcnn.bbox_reg.min_overlap, max_pixels=cfg.data.max_image_pixels, log=log)
        log(f"features: {done['computed']} computed, {done['skipped']} already cached, {len(done['failed'])} failed "
            f"({done['seconds'] / max(done['computed'], 1):.2f} s/image)")
        ids = [i for i in ids if i not in done["failed"]]
    else:
        ids = [i for i in ids if i in cache]
    if "svm" in stages:
        log("stage 3/4: linear SVMs with hard negative mining")
        fit_svm_stage(model, cache, ids, cfg, progress=not args.no_progress, log=log)
    if "bbox" in stages and cfg.rcnn.bbox_reg.enabled:
        log("stage 4/4: bounding-box regression")
        fit_regression_stage(model, cache, ids, cfg, log=log)
    final = save_checkpoint(out / "model_final.pt", model=model, config=config_to_dict(cfg), class_names=names)
    log(f"final weights: {final}")
    test = None
    if not args.no_test:
        test_set = build_dataset(cfg, test_split)
        detections = predict_split(model.to(device), test_set, device=device, log=log)
        test = evaluate(test_set.records, detections, test_set.class_names, "voc07")
        for name, ap in test["per_class"].items():
            log(f"  {name:>20s}  AP {ap:.4f}")
        log(f"VOC07 mAP on '{test_split}' ({len(test_set)} images): {test['mAP']:.4f}")
    return {"out": out, "final_checkpoint": final, "test": test}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
