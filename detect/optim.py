"""Optimiser and LR schedule of the training loop (Faster R-CNN Sec. 3.1.3: SGD, lr 0.001, momentum 0.9,
decay 0.0005; linear warm-up, then step or cosine decay), counted in iterations or epochs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch import nn

from detect.config import TrainConfig


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
