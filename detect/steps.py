"""One training epoch and its steps: the loss, the backward pass, the guard against bad steps.

A bad step (a NaN/inf or exploded loss, NaN/inf gradients or BatchNorm statistics: the rules are in
:mod:`detect.divergence`) is skipped and logged with the batch's image ids; ``train.max_nonfinite`` bad
steps in a row, or NaN/inf weights after a step, raise :class:`TrainingDiverged`. :func:`detect.engine.fit`
runs the epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from detect import distributed
from detect.config import TrainConfig
from detect.data.loader import Batch
from detect.divergence import StepGuard
from detect.errors import DetectError


class TrainingDiverged(DetectError):
    """``train.max_nonfinite`` bad steps in a row, or NaN/inf weights after a step (see :mod:`detect.divergence`)."""


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
