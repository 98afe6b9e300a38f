"""Multi-process training: process-group setup from torchrun, DDP wrapping, collectives.

``torchrun --nproc_per_node N tools/train.py ...`` (or a multi-node torchrun) sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; we join the
group with NCCL when training on CUDA and gloo on CPU. Every helper here also works
in a single process without a group, so the engine never branches on "am I distributed".

``train.images_per_batch`` is the *global* batch: each of the N ranks loads
``images_per_batch / N`` images of every global batch, DDP averages the gradients,
and the result equals one process with the whole batch (when the model's loss is a
mean over images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from detect.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes files (checkpoints, logs, results)."""
    return get_rank() == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device must be auto, cpu or cuda, got '{name}'")


def init_from_env(device: str = "auto", *, timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes, or stay single-process when it describes none."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not is_distributed():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(get_rank(), get_world_size(), local_rank, target)


def cleanup() -> None:
    if is_distributed():
        dist.barrier()   # tearing gloo down while a peer still talks to it aborts that peer
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (ranks must take the same branch around a collective)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_object(obj) -> list:
    """``[obj from rank 0, obj from rank 1, ...]``; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class LossForward(nn.Module):
    """Gives a detector a ``forward`` that computes its training losses.

    DDP hooks gradient synchronisation into ``forward``; our detectors keep
    ``loss()`` and ``predict()`` separate instead of a mode-dependent forward,
    so this wrapper is the forward DDP calls. It holds the detector as
    ``.detector`` and adds no parameters of its own.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images, targets, **kwargs):
        return self.detector.loss(images, targets, **kwargs)


def wrap_for_training(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
    """A callable ``(images, targets, **kw) -> losses``: DDP-wrapped when distributed, else ``model.loss``.

    Frozen parameters (``requires_grad=False``, e.g. the other half of an alternating-training
    step) are outside DDP's view; a detector whose loss leaves a *trainable* parameter out of
    the graph (even for an image without objects) needs ``find_unused_parameters=True``.
    """
    if not is_distributed():
        return model.loss
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(LossForward(model), device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)
