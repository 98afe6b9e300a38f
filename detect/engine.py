"""The training and evaluation loop: ``fit`` -> :func:`detect.steps.train_one_epoch` -> ``model.loss``.

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
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from detect import checkpoint as ckpt_io
from detect import distributed
from detect.best_checkpoint import BEST_NAME, BestModel, validation_metric
from detect.config import Config, config_to_dict
from detect.data.loader import DetectionDataset, GroupedBatchSampler, eval_loader, train_loader
from detect.divergence import StepGuard
from detect.evaluation import evaluate as score
from detect.evaluation.results import detection_to_numpy
from detect.optim import build_optimizer, build_scheduler, lr_factor, resolve_schedule  # noqa: F401 (lr_factor: API)
from detect.runlog import MetricsLog, ProgressBar, clean_run_dir, lock_run_dir, summarise
from detect.steps import TrainingDiverged, TrainState, _check_weights, train_one_epoch  # noqa: F401
from detect.utils.runtime import autocast_dtype



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
        return _Run(model, train_set, cfg, out_dir=out_dir, device=torch.device(device), val_set=val_set,
                    resume=resume, stop_after=stop_after, log=log, progress=progress, loss_kwargs=loss_kwargs).train()


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


class _Run:
    """One :func:`fit` run: its optimizer, schedule, guard, logs, best model and the loop around the epochs."""

    def __init__(self, model: nn.Module, train_set: DetectionDataset, cfg: Config, *, out_dir: Path,
                 device: torch.device, val_set, resume, stop_after, log, progress, loss_kwargs) -> None:
        self.model, self.train_set, self.cfg, self.tcfg = model, train_set, cfg, cfg.train
        self.out_dir, self.device, self.val_set, self.stop_after, self.log = out_dir, device, val_set, stop_after, log
        self.loss_kwargs = loss_kwargs
        tcfg = cfg.train
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        rank, world = distributed.get_rank(), distributed.get_world_size()
        self.sampler = GroupedBatchSampler(train_set.aspect_ratios(), tcfg.images_per_batch, rank=rank,
                                           world_size=world, seed=tcfg.seed, flip=cfg.model.input.flip)
        self.schedule = resolve_schedule(tcfg, self.sampler.batches_per_epoch())
        model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg, self.schedule)
        self.precision = autocast_dtype(tcfg.amp, device, log=log)
        self.amp = self.precision == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.config_dict = config_to_dict(cfg)
        self.best = BestModel(out_dir / BEST_NAME, metric=validation_metric(cfg.test.metric),
                              patience=tcfg.early_stop_patience)
        if self.best.patience and (val_set is None or self.schedule.eval_period == 0):
            log("train.early_stop_patience ignored: it counts validations (train.eval_period > 0 and a val split)")
        self.state = TrainState()
        self.guard = self._start(resume, rank)
        self.loss_fn = distributed.wrap_for_training(model, device)
        self.metrics = MetricsLog(out_dir, resume_at=self.state.iteration if resume is not None else 0,
                                  enabled=distributed.is_main())
        self.bar = ProgressBar(total=self.schedule.max_iter, initial=self.state.iteration, desc="train",
                               enabled=progress and distributed.is_main())
        self.history: list[dict] = []   # evaluation records
        self.window: list[dict] = []    # step records since the last log line
        self.ended: int | None = None   # the iteration of an early stop: a normal end, unlike stop_after

    def _start(self, resume, rank: int) -> StepGuard:
        """Restore a resumed run's state, or seed a fresh one; returns the step guard."""
        if resume is None:
            _seed(self.tcfg.seed + rank)
            if distributed.is_main():
                self.best.path.unlink(missing_ok=True)   # an earlier run's best is not this run's
            return StepGuard(self.model)
        ckpt = ckpt_io.load_for_resume(resume, log=self.log)
        ckpt_io.check_compatible(ckpt, config=self.config_dict, class_names=self.train_set.class_names)
        recent = _restore(ckpt, self.model, self.optimizer, self.scheduler, self.scaler, self.state, amp=self.amp)
        self.best.restore(ckpt.get("extra", {}).get("best"), log=self.log)
        self.log(f"resumed from {ckpt['path']} at iteration {self.state.iteration}")
        return StepGuard(self.model, recent=recent)

    def save(self, iteration: int) -> Path | None:
        """A periodic checkpoint (rank 0 writes; one RNG state and one loss history per rank)."""
        state = self.state
        _check_weights(self.guard, state, iteration, self.optimizer)
        rng, recent_losses = zip(*distributed.all_gather_object((ckpt_io.rng_state(), self.guard.recent)))
        path = None
        if distributed.is_main():
            extra = {"nonfinite_in_row": state.nonfinite_in_row, "bad_since": state.bad_since,
                     "recent_losses": [list(r) for r in recent_losses], "best": self.best.state()}
            path = ckpt_io.save_periodic(self.out_dir / "checkpoints", iteration, self.tcfg.keep_checkpoints,
                                         model=self.model, config=self.config_dict,
                                         class_names=self.train_set.class_names, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler if self.amp else None,
                                         rng=list(rng), extra=extra)
        distributed.barrier()
        return path

    def on_step(self, st: TrainState, record: dict) -> bool:
        """After every iteration: log, validate, checkpoint; True stops the run."""
        schedule, it = self.schedule, st.iteration
        self.window.append(record)
        self.bar.update(1, record)
        if it % self.tcfg.log_period == 0 or it == schedule.max_iter:
            self.metrics.write(summarise(self.window, it, it / schedule.iters_per_epoch))
            self.window.clear()
        if self.val_set is not None and schedule.eval_period > 0 and (it % schedule.eval_period == 0
                                                                      or it == schedule.max_iter):
            self.validate(it)
        if schedule.checkpoint_period > 0 and it % schedule.checkpoint_period == 0 and it < schedule.max_iter:
            self.save(it)
        if self.best.exhausted and it < schedule.max_iter and self.ended is None:
            self.ended = it
            self.log(f"iteration {it}: early stop: {self.best.since} evaluations without a better val mAP")
        return (self.stop_after is not None and it >= self.stop_after) or self.ended is not None

    def validate(self, it: int) -> None:
        result, _ = evaluate_split(self.model, self.val_set, device=self.device, metric=self.best.metric,
                                   log=self.log, batch_size=self.cfg.test.images_per_batch, workers=self.tcfg.workers)
        self.history.append(self.best.record(result["mAP"], it, model=self.model, config=self.config_dict,
                                             class_names=self.train_set.class_names, log=self.log))
        self.metrics.write(self.history[-1])

    def train(self) -> dict:
        """Epochs until the schedule ends, an early stop or ``stop_after``; then the final checkpoint."""
        state, stopped = self.state, False
        try:
            while state.iteration < self.schedule.max_iter and not stopped and not self.best.exhausted:
                epoch, position = divmod(state.iteration, self.schedule.iters_per_epoch)
                self.sampler.set_epoch(epoch, position)
                loader = train_loader(self.train_set, self.sampler, workers=self.tcfg.workers)
                stopped = train_one_epoch(self.loss_fn, loader, self.optimizer, self.scheduler, state, cfg=self.tcfg,
                                          device=self.device, end_iter=self.schedule.max_iter, params=self.params,
                                          guard=self.guard, scaler=self.scaler, on_step=self.on_step, log=self.log,
                                          loss_kwargs=self.loss_kwargs, autocast=self.precision)
                stopped = stopped and self.ended is None
        except TrainingDiverged as exc:
            raise TrainingDiverged(_set_aside_diverged(str(exc), self.out_dir / "checkpoints", state)) from None
        finally:
            self.bar.close()
            self.metrics.close()
        final = None
        if not stopped:
            self.save(state.iteration)
            if distributed.is_main():
                final = ckpt_io.save_checkpoint(self.out_dir / "model_final.pt", model=self.model,
                                                config=self.config_dict, class_names=self.train_set.class_names,
                                                iteration=state.iteration)
            distributed.barrier()
        return {"iteration": state.iteration, "stopped": stopped, "final_checkpoint": final, "history": self.history,
                "early_stopped": self.ended is not None, **self.best.summary()}


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
