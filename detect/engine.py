"""The training and evaluation loop: ``fit`` -> ``train_one_epoch`` -> ``model.loss``.

SGD with momentum and weight decay (Faster R-CNN Sec. 3.1.3: lr 0.001, momentum 0.9,
decay 0.0005), linear warm-up, then a step or cosine schedule, counted in iterations
or epochs (``train.schedule_unit``). Everything a resumed run needs is in the
checkpoint and the iteration count: the batch order is a pure function of
``(seed, epoch)``, so a run killed at any moment and resumed from its last checkpoint
ends with the same weights as one that was never interrupted (CPU, deterministic).

A bad step (a NaN/inf or exploded loss, NaN/inf gradients or BatchNorm statistics: the rules are
in :mod:`detect.divergence`) is skipped and logged with the batch's image ids;
``train.max_nonfinite`` bad steps in a row, or NaN/inf weights after a step, stop the run with
:class:`TrainingDiverged` (one line naming the iteration and the images; the tools exit 2). The
periodic checkpoints written from the state that started the bad steps are then renamed
``*.pt.diverged``, so ``--resume`` continues from the last healthy one; no checkpoint is ever
written with a NaN or inf in it.

The run folder is locked while ``fit`` runs (:func:`detect.runlog.lock_run_dir`): a second training
into it is refused, and temp files that a killed run left there are deleted.
"""

from __future__ import annotations

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
from detect.best_checkpoint import BEST_NAME, BestModel, validation_metric
from detect.config import Config, TrainConfig, config_to_dict
from detect.data.loader import Batch, DetectionDataset, GroupedBatchSampler, eval_loader, train_loader
from detect.divergence import StepGuard
from detect.errors import DetectError
from detect.evaluation.results import detection_to_numpy
from detect.optim import Schedule, build_optimizer, build_scheduler, lr_factor, resolve_schedule  # noqa: F401
from detect.runlog import LOSS_NAMES, MetricsLog, ProgressBar, clean_run_dir, lock_run_dir, summarise  # noqa: F401
from detect.utils.runtime import autocast_dtype

class TrainingDiverged(DetectError):
    """``train.max_nonfinite`` bad steps in a row, or NaN/inf weights after a step (see :mod:`detect.divergence`)."""


# --------------------------------------------------------------------------- one epoch


@dataclass
class TrainState:
    iteration: int = 0
    nonfinite_in_row: int = 0                    # bad steps in a row (the name predates the other rules)
    bad_since: int | None = None                 # iterations done when the current run of bad steps began
    last_ids: list = field(default_factory=list)  # this rank's images of the last batch (for messages)
    reported: set = field(default_factory=set)   # bad images already reported


def _to_device(batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    images = [img.to(device, non_blocking=True) for img in batch.images]
    targets = [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in batch.targets]
    return images, targets


def train_one_epoch(loss_fn: Callable, loader, optimizer, scheduler, state: TrainState, *, cfg: TrainConfig,
                    device: torch.device, end_iter: int, params: list[nn.Parameter], guard: StepGuard,
                    scaler=None, on_step: Callable[[TrainState, dict], bool] | None = None,
                    log: Callable[[str], None] = print,
                    loss_kwargs: dict | Callable[[list[torch.Tensor]], dict] | None = None,
                    autocast: torch.dtype | None = None) -> bool:
    """Run the loader's batches until it ends or ``state.iteration`` reaches ``end_iter``.

    ``loss_fn(images, targets)`` is ``model.loss`` (or its DDP wrapper) and returns the
    four named losses; their sum is minimised. ``guard`` judges each step (:mod:`detect.divergence`).
    ``on_step`` runs after every iteration and returns True to stop. Returns True when stopped by
    ``on_step``. ``loss_kwargs`` are extra arguments of the loss (alternating training: ``stage``,
    ``proposals``), or a function of the images that returns them. ``autocast``: the dtype of mixed
    precision (:func:`detect.utils.runtime.autocast_dtype`; an enabled ``scaler`` alone means float16).
    """
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
        state.last_ids = batch.image_ids()
        # Every rank must take the same branch: DDP's backward is a collective.
        if distributed.all_true(len(batch) > 0):
            _step(loss_fn, batch, optimizer, state, record, cfg=cfg, device=device, params=params, guard=guard,
                  scaler=scaler, log=log, loss_kwargs=loss_kwargs, autocast=autocast)
        else:
            record["skipped_step"] = "no readable image"
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.iteration += 1
        record["time"] = time.perf_counter() - start
        if on_step is not None and on_step(state, record):
            return True
    return False


def _step(loss_fn: Callable, batch: Batch, optimizer, state: TrainState, record: dict, *, cfg: TrainConfig,
          device: torch.device, params: list[nn.Parameter], guard: StepGuard, scaler, log, loss_kwargs,
          autocast: torch.dtype | None = None) -> None:
    """One optimizer step on ``batch``, or a skipped one that leaves the model as it was."""
    amp = scaler is not None and scaler.is_enabled()   # float16 loss scaling (CUDA); bfloat16 needs none
    dtype = autocast if autocast is not None else (torch.float16 if amp else None)
    images, targets = _to_device(batch, device)
    extra = loss_kwargs(images) if callable(loss_kwargs) else (loss_kwargs or {})
    saved = guard.snapshot()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        losses = loss_fn(images, targets, **extra)
    total = sum(losses.values())
    value = float(total.detach())
    problem = guard.forward_problem(value)
    if distributed.all_true(problem is None):
        scaler.scale(total).backward() if amp else total.backward()
        norm = None
        if cfg.clip_grad_norm > 0:
            if amp:
                scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            record["grad_norm"] = float(norm)
        problem = None if amp else guard.gradient_problem(norm)   # AMP: the scaler skips inf gradients itself
        if distributed.all_true(problem is None):
            if amp:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            record.update({k: float(v.detach()) for k, v in losses.items()}, loss=value)
            guard.accept(value)
            state.nonfinite_in_row, state.bad_since = 0, None
            _check_weights(guard, state, state.iteration + 1)
            return
    elif distributed.is_distributed():
        (total * 0.0).backward()   # completes DDP's pending reduction; the gradients are dropped
    guard.restore(saved)
    _bad_step(state, cfg, problem, losses, batch, log)
    record["skipped_step"] = problem or "bad step on another process"


def _check_weights(guard: StepGuard, state: TrainState, iteration: int, optimizer=None) -> None:
    """Stop the run when the weights (or ``optimizer``'s state) hold NaN or inf after ``iteration`` steps."""
    problem = guard.weights_problem(optimizer)
    if not distributed.all_true(problem is None):
        state.bad_since = iteration   # the state after this step is the first bad one
        where = "after the optimizer step" if optimizer is None else "before the checkpoint"
        ids = [i for ids in distributed.all_gather_object(state.last_ids) for i in ids]
        raise TrainingDiverged(f"training diverged at iteration {iteration} on images {ids}: "
                               f"{problem or 'non-finite values on another process'} {where}; lower train.lr "
                               f"or set train.clip_grad_norm")


def _bad_step(state: TrainState, cfg: TrainConfig, problem: str | None, losses: dict, batch: Batch, log) -> None:
    state.nonfinite_in_row += 1
    if state.bad_since is None:
        state.bad_since = state.iteration
    ids = [i for ids in distributed.all_gather_object(batch.image_ids()) for i in ids]
    problem = next((p for p in distributed.all_gather_object(problem) if p), "bad step")
    values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    log(f"iteration {state.iteration + 1}: {problem} ({values}) on images {ids}; step skipped")
    if state.nonfinite_in_row >= cfg.max_nonfinite:
        raise TrainingDiverged(f"training diverged at iteration {state.iteration + 1} on images {ids}: {problem} "
                               f"for {state.nonfinite_in_row} iterations in a row; lower train.lr, set "
                               f"train.clip_grad_norm or check those images' annotations")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, timings: dict | None = None,
             log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Detections of every image, gathered from all ranks.

    Returns:
        ``{image_id: {"boxes": (N, 4) float32 xyxy, "scores": (N,), "labels": (N,) int64}}`` (numpy),
        complete on every rank. ``timings`` (if given) accumulates the model's seconds per stage
        (:data:`detect.detector.TIMING_KEYS`) plus ``"total"`` and ``"images"``.
    """
    was_training = model.training
    model.eval()
    detections: dict = {}
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
            # The ids let stored-proposal pipelines find each image's boxes.
            outputs = model.predict(images, image_ids=[t["image_id"] for t in batch.targets], timings=timings)
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
                   timings: dict | None = None, limit: int = 0) -> tuple[dict, dict]:
    """Predict on a split (sharded over ranks; its first ``limit`` images when > 0) and score it.

    Returns:
        ``(metrics, detections)``.
    """
    from detect.evaluation import evaluate as score

    loader = eval_loader(dataset, batch_size=batch_size, workers=workers, rank=distributed.get_rank(),
                         world_size=distributed.get_world_size(), limit=limit)
    detections = evaluate(model, loader, device=device, log=log, progress=progress, timings=timings)
    # An unreadable image stays in the ground truth: its objects count as missed.
    records = dataset.records[:limit] if limit > 0 else dataset.records
    return score(records, detections, dataset.class_names, metric), detections


# --------------------------------------------------------------------------- the whole run


def fit(model: nn.Module, train_set: DetectionDataset, cfg: Config, *, out_dir: str | Path,
        device: torch.device | str = "cpu", val_set: DetectionDataset | None = None, resume: str | Path | None = None,
        stop_after: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
        loss_kwargs: dict | Callable | None = None) -> dict:
    """Train ``model`` on ``train_set`` as ``cfg.train`` says; checkpoints and logs go to ``out_dir``.

    Args:
        resume: a checkpoint file, or a run folder whose newest usable checkpoint is used
            (:func:`detect.checkpoint.load_for_resume`: a damaged newest one is skipped, with a message).
        stop_after: stop (as if killed, without saving) once this many iterations are done.
        loss_kwargs: extra arguments of ``model.loss`` (see :func:`train_one_epoch`).

    With ``val_set`` and ``train.eval_period``, the validation split is scored every period and at the
    end; the best weights go to ``model_best.pt`` (:mod:`detect.best_checkpoint`, early stopping too).

    Returns:
        ``{"iteration", "stopped", "final_checkpoint", "history": [eval records], "early_stopped",
        "best": {"metric", "value", "iteration", "since"} or None, "best_checkpoint": path or None}``.

    Raises:
        TrainingDiverged: the run diverged (see :mod:`detect.divergence`).
        RunDirBusy: another process trains into ``out_dir``.
    """
    out_dir = Path(out_dir)
    with lock_run_dir(out_dir, log=log):
        if distributed.is_main():
            clean_run_dir(out_dir, log=log)
        return _fit(model, train_set, cfg, out_dir=out_dir, device=torch.device(device), val_set=val_set,
                    resume=resume, stop_after=stop_after, log=log, progress=progress, loss_kwargs=loss_kwargs)


def _seed(seed: int) -> None:
    """Seed a fresh run: every rank draws its own RoI/anchor samples; rank 0 (plain seed) matches 1 process."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _restore(ckpt: dict, model, optimizer, scheduler, scaler, state: TrainState, *, amp: bool) -> list[float]:
    """Load a training state into the run; returns this rank's recent good losses."""
    rank = distributed.get_rank()
    ckpt_io.load_model_weights(model, ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if amp and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.iteration = ckpt["iteration"]
    extra = ckpt.get("extra", {})
    state.nonfinite_in_row = extra.get("nonfinite_in_row", 0)
    state.bad_since = extra.get("bad_since")
    rngs = ckpt["rng"]
    ckpt_io.set_rng_state(rngs[rank] if isinstance(rngs, list) and rank < len(rngs) else rngs)
    recent = extra.get("recent_losses") or []   # one list per rank
    return list(recent[rank]) if rank < len(recent) else []


def _fit(model: nn.Module, train_set: DetectionDataset, cfg: Config, *, out_dir: Path, device: torch.device,
         val_set, resume, stop_after, log, progress, loss_kwargs) -> dict:
    tcfg = cfg.train
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
    precision = autocast_dtype(tcfg.amp, device, log=log)
    amp = precision == torch.float16
    scaler, config_dict = torch.amp.GradScaler(device.type, enabled=amp), config_to_dict(cfg)
    best = BestModel(out_dir / BEST_NAME, metric=validation_metric(cfg.test.metric), patience=tcfg.early_stop_patience)
    if best.patience and (val_set is None or schedule.eval_period == 0):
        log("train.early_stop_patience ignored: it counts validations (train.eval_period > 0 and a val split)")
    state = TrainState()
    if resume is not None:
        ckpt = ckpt_io.load_for_resume(resume, log=log)
        ckpt_io.check_compatible(ckpt, config=config_dict, class_names=train_set.class_names)
        guard = StepGuard(model, recent=_restore(ckpt, model, optimizer, scheduler, scaler, state, amp=amp))
        best.restore(ckpt.get("extra", {}).get("best"), log=log)
        log(f"resumed from {ckpt['path']} at iteration {state.iteration}")
    else:
        _seed(tcfg.seed + rank)
        guard = StepGuard(model)
        if distributed.is_main():
            best.path.unlink(missing_ok=True)   # an earlier run's best is not this run's
    loss_fn = distributed.wrap_for_training(model, device)
    metrics = MetricsLog(out_dir, resume_at=state.iteration if resume is not None else 0,
                         enabled=distributed.is_main())
    bar = ProgressBar(total=schedule.max_iter, initial=state.iteration, desc="train",
                      enabled=progress and distributed.is_main())
    history: list[dict] = []   # evaluation records
    window: list[dict] = []    # step records since the last log line
    ended: list[int] = []      # the iteration of an early stop: a normal end, unlike stop_after

    def save(iteration: int) -> Path | None:
        _check_weights(guard, state, iteration, optimizer)
        # One RNG state and one loss history per rank.
        rng, recent_losses = zip(*distributed.all_gather_object((ckpt_io.rng_state(), guard.recent)))
        path = None
        if distributed.is_main():
            extra = {"nonfinite_in_row": state.nonfinite_in_row, "bad_since": state.bad_since,
                     "recent_losses": [list(r) for r in recent_losses], "best": best.state()}
            path = ckpt_io.save_periodic(out_dir / "checkpoints", iteration, tcfg.keep_checkpoints, model=model,
                                         config=config_dict, class_names=train_set.class_names,
                                         optimizer=optimizer, scheduler=scheduler, scaler=scaler if amp else None,
                                         rng=list(rng), extra=extra)
        distributed.barrier()
        return path

    def on_step(st: TrainState, record: dict) -> bool:
        window.append(record)
        bar.update(1, record)
        it = st.iteration
        if it % tcfg.log_period == 0 or it == schedule.max_iter:
            metrics.write(summarise(window, it, it / schedule.iters_per_epoch))
            window.clear()
        if val_set is not None and schedule.eval_period > 0 and (it % schedule.eval_period == 0
                                                                 or it == schedule.max_iter):
            validate(it)
        if schedule.checkpoint_period > 0 and it % schedule.checkpoint_period == 0 and it < schedule.max_iter:
            save(it)
        if best.exhausted and it < schedule.max_iter and not ended:
            ended.append(it)
            log(f"iteration {it}: early stop: {best.since} evaluations without a better val mAP")
        return (stop_after is not None and it >= stop_after) or bool(ended)

    def validate(it: int) -> None:
        result, _ = evaluate_split(model, val_set, device=device, metric=best.metric, log=log,
                                   batch_size=cfg.test.images_per_batch, workers=tcfg.workers)
        history.append(best.record(result["mAP"], it, model=model, config=config_dict,
                                   class_names=train_set.class_names, log=log))
        metrics.write(history[-1])

    stopped = False
    try:
        while state.iteration < schedule.max_iter and not stopped and not best.exhausted:
            epoch, position = divmod(state.iteration, schedule.iters_per_epoch)
            sampler.set_epoch(epoch, position)
            loader = train_loader(train_set, sampler, workers=tcfg.workers)
            stopped = train_one_epoch(loss_fn, loader, optimizer, scheduler, state, cfg=tcfg, device=device,
                                      end_iter=schedule.max_iter, params=params, guard=guard, scaler=scaler,
                                      on_step=on_step, log=log, loss_kwargs=loss_kwargs, autocast=precision)
            stopped = stopped and not ended
    except TrainingDiverged as exc:
        raise TrainingDiverged(_set_aside_diverged(str(exc), out_dir / "checkpoints", state)) from None
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
    return {"iteration": state.iteration, "stopped": stopped, "final_checkpoint": final, "history": history,
            "early_stopped": bool(ended), **best.summary()}


def _set_aside_diverged(message: str, directory: Path, state: TrainState) -> str:
    """Rank 0 renames the checkpoints of the diverged stretch; the error message says what is left."""
    first = state.bad_since if state.bad_since is not None else state.iteration
    moved = ckpt_io.set_aside(directory, first) if distributed.is_main() else []
    distributed.barrier()
    if moved:
        message += f"; set aside {len(moved)} checkpoint(s) from iteration {first} on as *.pt.diverged"
    latest = ckpt_io.latest_checkpoint(directory.parent)
    if latest is not None:
        message += f"; --resume would continue from {latest.name}"
    return message
