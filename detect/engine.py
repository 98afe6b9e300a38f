"""The training and evaluation loop: ``fit`` -> ``train_one_epoch`` -> ``model.loss``.

SGD with momentum and weight decay (Faster R-CNN Sec. 3.1.3: lr 0.001, momentum 0.9,
decay 0.0005), linear warm-up, then a step or cosine schedule, counted in iterations
or epochs (``train.schedule_unit``). Everything a resumed run needs is in the
checkpoint and the iteration count: the batch order is a pure function of
``(seed, epoch)``, so a run killed at any moment and resumed from its last checkpoint
ends with the same weights as one that was never interrupted (CPU, deterministic).

A step whose loss is not finite is skipped and logged with the batch's image ids;
``train.max_nonfinite`` such steps in a row stop the run.
"""

from __future__ import annotations

import bisect
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from detect import checkpoint as ckpt_io
from detect import distributed
from detect.config import Config, TrainConfig, config_to_dict
from detect.data.loader import Batch, DetectionDataset, GroupedBatchSampler, eval_loader, train_loader
from detect.errors import DetectError
from detect.evaluation.results import detection_to_numpy
from detect.runlog import MetricsLog, ProgressBar

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


class TrainingDiverged(DetectError):
    """The loss stayed non-finite for ``train.max_nonfinite`` iterations in a row."""


# --------------------------------------------------------------------------- optimiser and schedule


@dataclass
class Schedule:
    """The schedule in iterations (epochs already converted)."""

    max_iter: int
    steps: list[int]
    checkpoint_period: int
    eval_period: int
    iters_per_epoch: int


def resolve_schedule(cfg: TrainConfig, iters_per_epoch: int) -> Schedule:
    unit = iters_per_epoch if cfg.schedule_unit == "epoch" else 1
    return Schedule(max_iter=cfg.max_iter * unit, steps=[s * unit for s in cfg.steps],
                    checkpoint_period=cfg.checkpoint_period * unit, eval_period=cfg.eval_period * unit,
                    iters_per_epoch=iters_per_epoch)


def lr_factor(iteration: int, cfg: TrainConfig, schedule: Schedule) -> float:
    """Multiplier of the base LR at ``iteration``: warm-up times step decay or cosine."""
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(iteration, schedule.max_iter) / max(schedule.max_iter, 1)))
    else:
        factor = cfg.gamma ** bisect.bisect_right(sorted(schedule.steps), iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters; biases get ``bias_lr_factor`` x LR (py-faster-rcnn: 2x, no decay).

    AdamW (Loshchilov & Hutter, ICLR 2019) is not in the papers; it is here because the
    from-scratch tiny trunk of the CPU demo leaves its class-agnostic plateau several times
    sooner with it than with SGD. ``momentum`` is its beta1.
    """
    weights, biases = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (biases if name.endswith(".bias") else weights).append(param)
    groups = [{"params": weights}]
    if biases:
        groups.append({"params": biases, "lr": cfg.lr * cfg.bias_lr_factor,
                       "weight_decay": cfg.weight_decay if cfg.bias_weight_decay else 0.0})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg, schedule))


# --------------------------------------------------------------------------- one epoch


@dataclass
class TrainState:
    iteration: int = 0
    nonfinite_in_row: int = 0
    reported: set = field(default_factory=set)   # bad images already reported


def _to_device(batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    images = [img.to(device, non_blocking=True) for img in batch.images]
    targets = [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in batch.targets]
    return images, targets


def train_one_epoch(loss_fn: Callable, loader, optimizer, scheduler, state: TrainState, *, cfg: TrainConfig,
                    device: torch.device, end_iter: int, params: list[nn.Parameter], scaler=None,
                    on_step: Callable[[TrainState, dict], bool] | None = None, log: Callable[[str], None] = print,
                    loss_kwargs: dict | Callable[[list[torch.Tensor]], dict] | None = None) -> bool:
    """Run the loader's batches until it ends or ``state.iteration`` reaches ``end_iter``.

    ``loss_fn(images, targets)`` is ``model.loss`` (or its DDP wrapper) and returns the
    four named losses; their sum is minimised. ``on_step`` runs after every iteration
    and returns True to stop. Returns True when stopped by ``on_step``. ``loss_kwargs`` are extra
    arguments of the loss (alternating training: ``stage``, ``proposals``), or a function of the images
    that returns them.
    """
    amp = scaler is not None and scaler.is_enabled()
    for batch in loader:
        if state.iteration >= end_iter:
            break
        start = time.perf_counter()
        for bad in batch.skipped:
            if bad.image_id not in state.reported:
                state.reported.add(bad.image_id)
                log(f"skipped image {bad.image_id}: {bad.reason}")
        record: dict = {"iteration": state.iteration + 1, "lr": optimizer.param_groups[0]["lr"],
                        "images": len(batch) * distributed.get_world_size()}
        # Every rank must take the same branch: DDP's backward is a collective.
        if distributed.all_true(len(batch) > 0):
            images, targets = _to_device(batch, device)
            extra = loss_kwargs(images) if callable(loss_kwargs) else (loss_kwargs or {})
            with torch.autocast(device.type, enabled=amp):
                losses = loss_fn(images, targets, **extra)
            total = sum(losses.values())
            if distributed.all_true(bool(torch.isfinite(total))):
                state.nonfinite_in_row = 0
                scaler.scale(total).backward() if amp else total.backward()
                if cfg.clip_grad_norm > 0:
                    if amp:
                        scaler.unscale_(optimizer)
                    record["grad_norm"] = float(nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm))
                if amp:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                record.update({k: float(v.detach()) for k, v in losses.items()}, loss=float(total.detach()))
            else:
                if distributed.is_distributed():
                    (total * 0.0).backward()   # completes DDP's pending reduction; the gradients are dropped
                _non_finite(state, cfg, losses, batch, log)
                record["skipped_step"] = "non-finite loss"
        else:
            record["skipped_step"] = "no readable image"
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.iteration += 1
        record["time"] = time.perf_counter() - start
        if on_step is not None and on_step(state, record):
            return True
    return False


def _non_finite(state: TrainState, cfg: TrainConfig, losses: dict, batch: Batch, log) -> None:
    state.nonfinite_in_row += 1
    ids = [i for ids in distributed.all_gather_object(batch.image_ids()) for i in ids]
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    log(f"iteration {state.iteration + 1}: non-finite loss ({values}) on images {ids}; step skipped")
    if state.nonfinite_in_row >= cfg.max_nonfinite:
        raise TrainingDiverged(f"the loss was not finite for {state.nonfinite_in_row} iterations in a row "
                               f"(last at iteration {state.iteration + 1}, images {ids}); lower train.lr, "
                               f"set train.clip_grad_norm or check those images' annotations")


# --------------------------------------------------------------------------- evaluation


def _predict_accepts(model: nn.Module, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(model.predict).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, timings: dict | None = None,
             log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Detections of every image, gathered from all ranks.

    Returns:
        ``{image_id: {"boxes": (N, 4) float32 xyxy, "scores": (N,), "labels": (N,) int64}}`` (numpy),
        complete on every rank. ``timings`` (if given) accumulates seconds per stage when
        the model's ``predict`` reports them, plus ``"total"`` and ``"images"``.
    """
    was_training = model.training
    model.eval()
    detections: dict = {}
    kwargs_ok = timings is not None and _predict_accepts(model, "timings")
    ids_ok = _predict_accepts(model, "image_ids")
    # Evaluation must not move the training RNG, or a resumed run would diverge from an uninterrupted one.
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        bar = ProgressBar(total=len(loader), desc="predict", enabled=progress and distributed.is_main())
        for batch in loader:
            for bad in batch.skipped:
                log(f"skipped image {bad.image_id}: {bad.reason}")
            if not len(batch):
                bar.update(1)
                continue
            images = [img.to(device) for img in batch.images]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            kwargs = {"timings": timings} if kwargs_ok else {}
            if ids_ok:   # stored-proposal pipelines find each image's boxes by id
                kwargs["image_ids"] = [t["image_id"] for t in batch.targets]
            outputs = model.predict(images, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if timings is not None:
                timings["total"] = timings.get("total", 0.0) + time.perf_counter() - start
                timings["images"] = timings.get("images", 0) + len(images)
            for target, out in zip(batch.targets, outputs):
                detections[target["image_id"]] = detection_to_numpy(out)
            bar.update(1)
        bar.close()
    model.train(was_training)
    merged: dict = {}
    for part in distributed.all_gather_object(detections):
        merged.update(part)
    return merged


def evaluate_split(model: nn.Module, dataset: DetectionDataset, *, device: torch.device, metric: str = "voc07",
                   batch_size: int = 1, workers: int = 0, log=print, progress: bool = False,
                   timings: dict | None = None) -> tuple[dict, dict]:
    """Predict on a whole split (sharded over ranks) and score it: ``(metrics, detections)``."""
    from detect.evaluation import evaluate as score

    loader = eval_loader(dataset, batch_size=batch_size, workers=workers, rank=distributed.get_rank(),
                         world_size=distributed.get_world_size())
    detections = evaluate(model, loader, device=device, log=log, progress=progress, timings=timings)
    # An unreadable image stays in the ground truth: its objects count as missed.
    return score(dataset.records, detections, dataset.class_names, metric), detections


# --------------------------------------------------------------------------- the whole run


def fit(model: nn.Module, train_set: DetectionDataset, cfg: Config, *, out_dir: str | Path,
        device: torch.device | str = "cpu", val_set: DetectionDataset | None = None, resume: str | Path | None = None,
        stop_after: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
        loss_kwargs: dict | Callable | None = None) -> dict:
    """Train ``model`` on ``train_set`` as ``cfg.train`` says; checkpoints and logs go to ``out_dir``.

    Args:
        resume: a checkpoint file, or a run folder whose newest checkpoint is used.
        stop_after: stop (as if killed, without saving) once this many iterations are done.
        loss_kwargs: extra arguments of ``model.loss`` (see :func:`train_one_epoch`).

    Returns:
        ``{"iteration", "stopped", "final_checkpoint", "history": [eval records]}``.
    """
    tcfg, device = cfg.train, torch.device(device)
    out_dir = Path(out_dir)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    rank, world = distributed.get_rank(), distributed.get_world_size()
    sampler = GroupedBatchSampler(train_set.aspect_ratios(), tcfg.images_per_batch, rank=rank, world_size=world,
                                  seed=tcfg.seed, flip=cfg.model.input.flip)
    schedule = resolve_schedule(tcfg, sampler.batches_per_epoch())
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, schedule)
    amp = tcfg.amp and device.type == "cuda"
    if tcfg.amp and not amp:
        log("train.amp ignored: mixed precision needs CUDA")
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    config_dict = config_to_dict(cfg)
    state = TrainState()
    if resume is not None:
        ckpt = ckpt_io.load_checkpoint(resume)
        ckpt_io.check_compatible(ckpt, config=config_dict, class_names=train_set.class_names)
        if "optimizer" not in ckpt or "rng" not in ckpt:
            raise ckpt_io.CheckpointError(f"{ckpt['path']}: holds weights only, not a training state to resume")
        ckpt_io.load_model_weights(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if amp and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.iteration = ckpt["iteration"]
        state.nonfinite_in_row = ckpt.get("extra", {}).get("nonfinite_in_row", 0)
        rngs = ckpt["rng"]
        ckpt_io.set_rng_state(rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else rngs)
        log(f"resumed from {ckpt['path']} at iteration {state.iteration}")
    else:
        # Every rank draws its own RoI/anchor samples; rank 0 with the plain seed matches a 1-process run.
        torch.manual_seed(tcfg.seed + rank)
        np.random.seed(tcfg.seed + rank)
        random.seed(tcfg.seed + rank)
    loss_fn = distributed.wrap_for_training(model, device)
    metrics = MetricsLog(out_dir, resume_at=state.iteration if resume is not None else 0,
                         enabled=distributed.is_main())
    bar = ProgressBar(total=schedule.max_iter, initial=state.iteration, desc="train",
                      enabled=progress and distributed.is_main())
    history: list[dict] = []
    window: list[dict] = []

    def save(iteration: int) -> Path | None:
        rng = distributed.all_gather_object(ckpt_io.rng_state())   # one RNG state per rank
        path = None
        if distributed.is_main():
            path = ckpt_io.save_periodic(out_dir / "checkpoints", iteration, tcfg.keep_checkpoints, model=model,
                                         config=config_dict, class_names=train_set.class_names,
                                         optimizer=optimizer, scheduler=scheduler, scaler=scaler if amp else None,
                                         rng=rng, extra={"nonfinite_in_row": state.nonfinite_in_row})
        distributed.barrier()
        return path

    def on_step(st: TrainState, record: dict) -> bool:
        window.append(record)
        bar.update(1, record)
        it = st.iteration
        if it % tcfg.log_period == 0 or it == schedule.max_iter:
            metrics.write(_summarise(window, it, it / schedule.iters_per_epoch))
            window.clear()
        if val_set is not None and schedule.eval_period > 0 and it % schedule.eval_period == 0 \
                and it < schedule.max_iter:
            result, _ = evaluate_split(model, val_set, device=device, metric="voc07", log=log,
                                       batch_size=cfg.test.images_per_batch, workers=tcfg.workers)
            entry = {"iteration": it, "split": "val", "metric": "voc07", "mAP": result["mAP"]}
            history.append(entry)
            metrics.write(entry)
            log(f"iteration {it}: val VOC07 mAP {result['mAP']:.4f}")
        if schedule.checkpoint_period > 0 and it % schedule.checkpoint_period == 0 and it < schedule.max_iter:
            save(it)
        return stop_after is not None and it >= stop_after

    stopped = False
    try:
        while state.iteration < schedule.max_iter and not stopped:
            epoch, position = divmod(state.iteration, schedule.iters_per_epoch)
            sampler.set_epoch(epoch, position)
            loader = train_loader(train_set, sampler, workers=tcfg.workers)
            stopped = train_one_epoch(loss_fn, loader, optimizer, scheduler, state, cfg=tcfg, device=device,
                                      end_iter=schedule.max_iter, params=params, scaler=scaler, on_step=on_step,
                                      log=log, loss_kwargs=loss_kwargs)
    finally:
        bar.close()
        metrics.close()
    final = None
    if not stopped:
        save(state.iteration)
        if distributed.is_main():
            final = ckpt_io.save_checkpoint(out_dir / "model_final.pt", model=model, config=config_dict,
                                            class_names=train_set.class_names, iteration=state.iteration)
        distributed.barrier()
    return {"iteration": state.iteration, "stopped": stopped, "final_checkpoint": final, "history": history}


def _summarise(window: list[dict], iteration: int, epoch: float) -> dict:
    """Mean losses, last LR and images/s over the iterations since the last log line."""
    out = {"iteration": iteration, "epoch": round(epoch, 4), "lr": window[-1]["lr"] if window else 0.0}
    done = [r for r in window if "loss" in r]
    for key in ("loss", *LOSS_NAMES, "grad_norm"):
        values = [r[key] for r in done if key in r]
        if values:
            out[key] = float(np.mean(values))
    seconds = sum(r["time"] for r in window)
    out["images_per_s"] = sum(r["images"] for r in window) / seconds if seconds > 0 else 0.0
    skipped = sum(1 for r in window if "skipped_step" in r)
    if skipped:
        out["skipped_steps"] = skipped
    return out
