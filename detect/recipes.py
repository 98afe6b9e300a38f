"""Training recipes: what ``tools/train.py`` runs, as library functions.

:func:`train` is the whole run for any pipeline: the output folder, the datasets, the
selective-search store (Fast R-CNN and R-CNN read stored boxes), trunk pre-training on object
crops (:mod:`detect.pretrain`), then

* Faster R-CNN: approximate joint training (:func:`detect.engine.fit`) or the paper's 4-step
  alternating training (:func:`detect.alternating.fit_alternating`);
* Fast R-CNN: :func:`detect.engine.fit` on the RoI head's multi-task loss;
* R-CNN: the four stages of :func:`train_rcnn_stages` (fine-tuning, feature cache, SVMs, box
  regression; each resumable);

and at the end the test split scored with ``test.metric``. The command-line tools only parse
their arguments, call one of these and print.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from detect import distributed
from detect.alternating import fit_alternating
from detect.build import build_model, model_from_checkpoint
from detect.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights, save_checkpoint
from detect.config import Config, config_to_dict, dump_config
from detect.data.loader import build_dataset, load_records
from detect.detector import Detector
from detect.engine import evaluate_split, fit
from detect.errors import ConfigError, DetectError
from detect.evaluation import METRIC_NAMES, format_ap
from detect.feature_cache import FeatureCache
from detect.input_size import apply_auto_sizes
from detect.pretrain import pretrain_trunk
from detect.proposal_sources import ensure_stored_proposals
from detect.rcnn_streaming import fit_svms_streaming
from detect.rcnn_training import (cache_fingerprint, extract_features, fit_regression_rows, fit_regression_stage,
                                  fit_svm_stage)
from detect.runlog import MetricsLog, lock_run_dir
from detect.utils.io import atomic_write_json

RCNN_STAGES = ("finetune", "features", "svm", "bbox")


@dataclass
class RunOptions:
    """How a training run treats its output folder and what it prints.

    Attributes:
        out: the run folder.
        device: where to train.
        resume: None (a fresh run), "auto" (the newest usable checkpoint in ``out``) or a checkpoint path.
        overwrite: a fresh run may delete an earlier run's checkpoints in ``out``.
        strict: stop at the first unreadable image instead of skipping it.
        test: score the final model on the test split.
        progress: progress bars.
        log: where messages go (rank 0 prints).
        stages: R-CNN's stages to run (:data:`RCNN_STAGES`); checkpoint: the fine-tuned R-CNN when
            "finetune" is not among them.
        proposal_workers: processes filling the selective-search store (0: ``train.workers``).
    """

    out: Path
    device: torch.device | str = "cpu"
    resume: str | None = None
    overwrite: bool = False
    strict: bool = False
    test: bool = True
    progress: bool = True
    log: Callable[[str], None] = print
    stages: Sequence[str] = RCNN_STAGES
    checkpoint: Path | None = None
    proposal_workers: int = 0


# --------------------------------------------------------------------------- the run folder


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out`` and prove it writable; refuse to mix a fresh run into an earlier run's checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DetectError(f"output folder {out} is not writable ({exc.strerror or exc})") from None
    run_dirs = [out, *sorted(out.glob("step[1-4]")), out / "finetune"]   # alternating steps, R-CNN stage 1
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


def resolve_resume(value: str | None, out: Path, log: Callable[[str], None] = print) -> Path | None:
    """``resume=CKPT``: that file; ``"auto"``: the run folder (its newest usable checkpoint), or None."""
    if value is None:
        return None
    if value != "auto":
        return Path(value)
    if latest_checkpoint(out) is None:
        log(f"--resume: no checkpoint in {out}/checkpoints yet; starting from scratch")
        return None
    return out


# --------------------------------------------------------------------------- the whole run


def train(cfg: Config, opt: RunOptions) -> dict:
    """Train the detector ``cfg`` describes as ``opt`` says (see the module docstring).

    Returns:
        ``{"out", "final_checkpoint", "model", "test": metrics (``test.metric``; VOC07 for "all") or None}``.
    """
    out = Path(opt.out)
    with lock_run_dir(out, log=opt.log):   # before anything is written or deleted there
        if distributed.is_main():   # R-CNN's later stages alone reuse the folder's fine-tuned CNN
            later_stages = cfg.model.pipeline == "rcnn" and "finetune" not in opt.stages
            prepare_out_dir(out, resume=opt.resume is not None or later_stages, overwrite=opt.overwrite)
        distributed.barrier()
        train_set = build_dataset(cfg, cfg.data.train_split, train=True, strict=opt.strict)
        # model.input.auto / model.anchors.auto: sizes from the training boxes, saved resolved in the config
        cfg = apply_auto_sizes(cfg, train_set.records, log=opt.log if distributed.is_main() else None)
        if distributed.is_main():
            dump_config(cfg, out / "config.yaml")
            atomic_write_json(out / "class_names.json", train_set.class_names)
            opt.log(f"training on {len(train_set)} images of '{cfg.data.train_split}' "
                    f"({len(train_set.class_names)} classes), {distributed.get_world_size()} process(es) on "
                    f"{opt.device}, output in {out}")
        fill_stores(cfg, opt)
        if cfg.model.pipeline == "rcnn":
            model, final = train_rcnn_stages(cfg, train_set, opt, stages=opt.stages, checkpoint=opt.checkpoint)
            iteration = 0
        else:
            model, result = _train_network(cfg, train_set, opt)
            final, iteration = result["final_checkpoint"], result["iteration"]
        test = score_test_split(model, cfg, opt, iteration=iteration) if opt.test else None
        if distributed.is_main():
            opt.log(f"final weights: {final}")
        return {"out": out, "final_checkpoint": final, "model": model, "test": test}


def fill_stores(cfg: Config, opt: RunOptions) -> None:
    """Fast R-CNN and R-CNN read selective-search boxes from the store: fill it first (resumable, rank 0)."""
    section = {"fast_rcnn": cfg.fast_rcnn, "rcnn": cfg.rcnn}.get(cfg.model.pipeline)
    if section is None or section.proposal_source != "stored":
        return
    splits = [cfg.data.train_split] + ([cfg.test.split or cfg.data.test_split] if opt.test else [])
    if distributed.is_main():
        for split in dict.fromkeys(splits):
            opt.log(f"selective-search proposals for '{split}' (computed once, then read from "
                    f"{cfg.proposals.store or 'the store'})")
            ensure_stored_proposals(cfg, split, workers=max(opt.proposal_workers or cfg.train.workers, 1),
                                    progress=opt.progress, log=opt.log)
    distributed.barrier()


def _train_network(cfg: Config, train_set, opt: RunOptions) -> tuple[Detector, dict]:
    """Faster / Fast R-CNN: pre-training (fresh runs), then joint or alternating training."""
    val_set = build_dataset(cfg, cfg.data.val_split, strict=opt.strict) if cfg.train.eval_period > 0 else None

    def build() -> Detector:
        torch.manual_seed(cfg.train.seed)   # same initial weights on every rank and every run
        return build_model(cfg, class_names=train_set.class_names)

    if cfg.train.training_mode == "alternating":
        if cfg.model.pipeline != "faster_rcnn":
            raise ConfigError(f"{cfg.source or 'config'}: train.training_mode 'alternating' is the 4-step training "
                              f"of Faster R-CNN; model.pipeline is '{cfg.model.pipeline}'")
        if cfg.pretrain.steps:
            raise ConfigError(f"{cfg.source or 'config'}: pretrain.steps is not combined with train.training_mode "
                              "'alternating' (set pretrain.steps=0, or train jointly)")
        result = fit_alternating(build, train_set, cfg, out_dir=opt.out, device=opt.device, val_set=val_set,
                                 resume=opt.resume is not None, log=opt.log, progress=opt.progress)
        return result["model"], result
    resume = resolve_resume(opt.resume, Path(opt.out), opt.log)
    model = build()
    if resume is None and cfg.pretrain.steps:
        pretrain(model, train_set, cfg, opt)
    return model, fit(model, train_set, cfg, out_dir=opt.out, device=opt.device, val_set=val_set, resume=resume,
                      log=opt.log, progress=opt.progress)


def pretrain(model: Detector, train_set, cfg: Config, opt: RunOptions) -> None:
    """Trunk pre-training on object crops (:func:`detect.pretrain.pretrain_trunk`), on rank 0.

    Rank 0 pre-trains alone, with the threads of every process on its node (the others wait);
    DistributedDataParallel then starts every rank from rank 0's weights and buffers.
    """
    if distributed.is_main():
        threads = torch.get_num_threads()
        torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        try:
            pretrain_trunk(model.backbone, train_set.records, len(train_set.class_names), cfg.pretrain,
                           device=opt.device, log=opt.log, progress=opt.progress)
        finally:
            torch.set_num_threads(threads)
    distributed.barrier()


def score_test_split(model: Detector, cfg: Config, opt: RunOptions, *, iteration: int) -> dict:
    """Score the final model on the test split with ``test.metric``, print and log it; VOC07's result for "all"."""
    split = cfg.test.split or cfg.data.test_split
    test_set = build_dataset(cfg, split, strict=opt.strict)
    metric = cfg.test.metric
    scored, _ = evaluate_split(model, test_set, device=torch.device(opt.device), metric=metric, log=opt.log,
                               batch_size=cfg.test.images_per_batch, workers=cfg.train.workers, progress=opt.progress)
    by_metric = scored if metric == "all" else {metric: scored}
    if distributed.is_main():
        for name_of_metric, res in by_metric.items():
            MetricsLog.append(opt.out, {"iteration": iteration, "split": split, "metric": name_of_metric,
                                        "mAP": res["mAP"], "per_class": res["per_class"]})
            for name, ap in res["per_class"].items():
                opt.log(f"  {name:>20s}  AP {format_ap(ap)}")
            opt.log(f"{METRIC_NAMES[name_of_metric]} mAP on '{split}' ({len(test_set)} images): "
                    f"{format_ap(res['mAP'])}")
    return by_metric["voc07"] if metric == "all" else scored


# --------------------------------------------------------------------------- R-CNN's four stages


def train_rcnn_stages(cfg: Config, train_set, opt: RunOptions, *, stages: Sequence[str] = RCNN_STAGES,
                      checkpoint: str | Path | None = None) -> tuple[Detector, Path]:
    """R-CNN's training (Sec. 2.3, Appendix C); writes ``<out>/model_final.pt`` and returns (model, that path).

    1. ``finetune``: the CNN with a (C+1)-way classifier on warped proposals (:func:`detect.engine.fit`),
       into ``<out>/finetune`` (resumed from there with ``opt.resume``; skipped when it finished);
       without this stage ``checkpoint`` is the fine-tuned CNN;
    2. ``features``: fc7 (and pool5 where IoU > 0.6) of every training proposal into the feature cache
       (``rcnn.feature_cache``, default ``<out>/features``); resumable, refuses another model's cache;
    3. ``svm``: one-vs-rest linear SVMs with hard negative mining;
    4. ``bbox``: class-specific ridge box regression on pool5.
    """
    unknown = [s for s in stages if s not in RCNN_STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown} (choose from {', '.join(RCNN_STAGES)})")
    out, log, names = Path(opt.out), opt.log, train_set.class_names
    model = _finetuned(cfg, train_set, opt, stages, checkpoint)
    records, _, _ = load_records(cfg, cfg.data.train_split)
    if cfg.rcnn.feature_cache_mode == "streaming":
        _streamed_stages(model, records, cfg, opt, stages)
        return model, save_checkpoint(out / "model_final.pt", model=model, config=config_to_dict(cfg),
                                      class_names=names)
    ids = [r.image_id for r in records]
    cache = FeatureCache(cfg.rcnn.feature_cache or out / "features", fingerprint=cache_fingerprint(model, cfg))
    if "features" in stages:
        log(f"stage 2/4: features of {len(records)} images into {cache.root}")
        done = extract_features(model, records, cache, device=opt.device, use_difficult=cfg.data.use_difficult,
                                progress=opt.progress,
                                min_overlap=cfg.rcnn.bbox_reg.min_overlap, max_pixels=cfg.data.max_image_pixels, log=log)
        log(f"features: {done['computed']} computed, {done['skipped']} already cached, {len(done['failed'])} failed "
            f"({done['seconds'] / max(done['computed'], 1):.2f} s/image)")
        ids = [i for i in ids if i not in done["failed"]]
    else:
        ids = [i for i in ids if i in cache]
    if "svm" in stages:
        log("stage 3/4: linear SVMs with hard negative mining")
        fit_svm_stage(model, cache, ids, cfg, progress=opt.progress, log=log)
    if "bbox" in stages and cfg.rcnn.bbox_reg.enabled:
        log("stage 4/4: bounding-box regression")
        fit_regression_stage(model, cache, ids, cfg, log=log)
    final = save_checkpoint(out / "model_final.pt", model=model, config=config_to_dict(cfg), class_names=names)
    return model, final


def _streamed_stages(model: Detector, records, cfg: Config, opt: RunOptions, stages: Sequence[str]) -> None:
    """Stages 2-4 with ``rcnn.feature_cache_mode: streaming``: features mined image by image, nothing on disk."""
    if not {"features", "svm"} <= set(stages):
        raise ConfigError("rcnn.feature_cache_mode=streaming computes features and SVMs together: run the "
                          "'features' and 'svm' stages in one run (or use feature_cache_mode=full)")
    opt.log(f"stages 2-3/4 (streamed): features of {len(records)} images mined for the SVMs, nothing cached")
    result = fit_svms_streaming(model, records, cfg, device=opt.device, progress=opt.progress, log=opt.log)
    if result.failed:
        opt.log(f"features: skipped {len(result.failed)} unreadable images: {sorted(result.failed)[:5]}")
    if "bbox" in stages and cfg.rcnn.bbox_reg.enabled:
        opt.log("stage 4/4: bounding-box regression")
        fit_regression_rows(model, result.regression, cfg, log=opt.log)


def _finetuned(cfg: Config, train_set, opt: RunOptions, stages: Sequence[str], checkpoint) -> Detector:
    """Stage 1, or the fine-tuned R-CNN from ``checkpoint`` (rebuilt with this config's proposals and settings)."""
    stage_dir = Path(opt.out) / "finetune"
    if "finetune" in stages and not (opt.resume is not None and (stage_dir / "model_final.pt").is_file()):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, class_names=train_set.class_names)
        opt.log(f"stage 1/4: fine-tuning on {len(train_set)} images of '{cfg.data.train_split}'")
        fit(model, train_set, cfg, out_dir=stage_dir, device=opt.device, log=opt.log, progress=opt.progress,
            resume=resolve_resume(opt.resume, stage_dir, opt.log))
        return model
    if "finetune" in stages:
        opt.log(f"stage 1/4 already finished ({stage_dir / 'model_final.pt'})")
        checkpoint = stage_dir / "model_final.pt"
    if checkpoint is None:
        raise ConfigError("--checkpoint is needed when the 'finetune' stage is skipped (the fine-tuned R-CNN)")
    _, _, ckpt = model_from_checkpoint(checkpoint, device=opt.device)
    model = build_model(cfg, class_names=list(ckpt["class_names"]))
    load_model_weights(model, ckpt)
    return model.to(opt.device)
