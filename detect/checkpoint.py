"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` can read it and a file holding arbitrary
pickled objects is refused instead of executed. It carries everything needed to
resume bit-for-bit: model, optimizer, LR scheduler, AMP scaler, the RNG states of
torch / numpy / Python (as tensors and lists) and the iteration count, which fixes
the position inside the epoch (the batch order is a pure function of seed and epoch).
The resolved config and the class names travel with it.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detect.errors import CheckpointError
from detect.utils.io import atomic_write_bytes, atomic_write_text

FORMAT = "detect-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Every RNG the training step may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | Path, *, model: nn.Module, config: dict, class_names: list[str],
                    iteration: int = 0, optimizer=None, scheduler=None, scaler=None,
                    rng: dict | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (a killed writer leaves the previous file intact)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "iteration": int(iteration),
        "config": config,
        "class_names": list(class_names),
        "model": model.state_dict(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if rng is not None:
        payload["rng"] = rng
    if extra:
        payload["extra"] = extra
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint file.

    Raises:
        CheckpointError: naming the file when it is missing, not a checkpoint of this
            toolkit, or holds pickled objects other than tensors and plain containers.
    """
    path = Path(path)
    if path.is_dir():
        found = path / "model_final.pt" if (path / "model_final.pt").is_file() else latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in directory {path} (expected model_final.pt or checkpoints/ckpt_*.pt)")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: it contains pickled objects other than tensors "
                              f"and plain containers ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (no '{FORMAT}' marker); "
                              f"a bare state dict cannot say which model or classes it belongs to")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this toolkit ({VERSION})")
    for key in ("model", "config", "class_names"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' entry")
    payload["path"] = str(path)
    return payload


def check_compatible(ckpt: dict, *, config: dict, class_names: list[str]) -> None:
    """Refuse a checkpoint made for another detector or another class list."""
    where = ckpt.get("path", "checkpoint")
    if list(ckpt["class_names"]) != list(class_names):
        raise CheckpointError(f"{where}: trained for classes {ckpt['class_names']}, "
                              f"but this run uses {list(class_names)}")
    mine, theirs = config.get("model", {}), ckpt["config"].get("model", {})
    for key in ("pipeline", "num_classes"):
        if mine.get(key) != theirs.get(key):
            raise CheckpointError(f"{where}: model.{key} is {theirs.get(key)!r} in the checkpoint "
                                  f"but {mine.get(key)!r} in this config")
    if mine.get("backbone", {}).get("name") != theirs.get("backbone", {}).get("name"):
        raise CheckpointError(f"{where}: model.backbone.name is {theirs.get('backbone', {}).get('name')!r} in the "
                              f"checkpoint but {mine.get('backbone', {}).get('name')!r} in this config")


def load_model_weights(model: nn.Module, ckpt: dict) -> None:
    """``model.load_state_dict`` with a one-line error naming the mismatched keys."""
    where = ckpt.get("path", "checkpoint")
    state = ckpt["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})")
        raise CheckpointError(f"{where}: weights belong to another model: {'; '.join(parts)}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- periodic checkpoints


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt_{iteration:07d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the periodic checkpoints in a folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest resumable checkpoint of a run folder (``<run>/checkpoints/ckpt_*.pt``), or None."""
    run_dir = Path(run_dir)
    for directory in (run_dir / "checkpoints", run_dir):
        found = list_checkpoints(directory)
        if found:
            return found[-1][1]
    return None


def save_periodic(directory: str | Path, iteration: int, keep: int, **kwargs) -> Path:
    """Save ``ckpt_<iteration>.pt`` and delete all but the newest ``keep`` (0 keeps all)."""
    path = save_checkpoint(checkpoint_path(directory, iteration), iteration=iteration, **kwargs)
    atomic_write_text(Path(directory) / "last_checkpoint", path.name + "\n")
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def model_from_checkpoint(path: str | Path, *, overrides: list[str] | None = None,
                          device: str | torch.device = "cpu"):
    """Rebuild the detector a checkpoint was trained as and load its weights.

    Returns:
        ``(model in eval mode, Config, checkpoint dict)``; ``overrides`` (``key=value``) change the
        stored config, e.g. ``data.root`` when the data moved.
    """
    from detect import build_model
    from detect.config import config_from_dict

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(dict(ckpt["config"]), where=f"config stored in {ckpt['path']}", overrides=overrides)
    # ImageNet weights are replaced by the checkpoint's anyway; never fetch them here.
    cfg.model.backbone.weights = "none"
    model = build_model(cfg, class_names=list(ckpt["class_names"]))
    load_model_weights(model, ckpt)
    return model.to(device).eval(), cfg, ckpt
