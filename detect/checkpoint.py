"""Checkpoints: written atomically with a checksum, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` can read it and a file holding arbitrary
pickled objects is refused instead of executed. It carries everything needed to
resume bit-for-bit: model, optimizer, LR scheduler, AMP scaler, the RNG states of
torch / numpy / Python (as tensors and lists) and the iteration count, which fixes
the position inside the epoch (the batch order is a pure function of seed and epoch).
The resolved config and the class names travel with it.

Integrity: ``torch.load`` does not check the zip's CRCs, so a flipped bit in a weight would load
silently. Each file therefore ends with a seal, 16 marker bytes and the sha256 of everything
before them, checked before the file is unpickled (zip readers ignore bytes after the archive,
so ``torch.load`` still reads a sealed file directly). A file without the seal (written before
it existed) loads unchecked. A checkpoint is never written, nor loaded, with a NaN or inf in
its weights, buffers or optimizer state.
"""

from __future__ import annotations

import errno
import hashlib
import io
import pickle
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from detect.errors import CheckpointError
from detect.utils.io import atomic_open, atomic_write_text, remove_stale_temp_files

FORMAT = "detect-checkpoint"
VERSION = 1   # the seal changed the file, not the payload: older readers still load sealed files
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
SEAL = b"detect-sha256:v1"   # followed by the 32-byte sha256 of the bytes before it
_ZIP_MAGIC = b"PK\x03\x04"


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
    path = Path(path)
    bad = non_finite_entry(payload)
    if bad is not None:
        raise CheckpointError(f"{path}: not written: {bad} holds NaN or inf (the training diverged)")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    try:
        with atomic_open(path, "wb", encoding=None) as handle:
            handle.write(data)
            handle.write(SEAL + hashlib.sha256(data).digest())
    except OSError as exc:   # disk full, file too large, folder gone: the temp file is already removed
        raise CheckpointError(f"{path}: could not be written ({_reason(exc)}); the files written before it "
                              f"are intact") from None
    finally:
        data.release()
    return path


def _reason(exc: OSError) -> str:
    """``"ENOSPC: No space left on device"``."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    text = exc.strerror or str(exc)
    return f"{code}: {text}" if code else text


def non_finite_entry(payload: dict) -> str | None:
    """The first weight, buffer or optimizer-state tensor of ``payload`` holding NaN or inf, or None."""
    for key, value in payload.get("model", {}).items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"model weight '{key}'"
    for index, entry in payload.get("optimizer", {}).get("state", {}).items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"optimizer state '{key}' of parameter {index}"
    return None


def verify_file(path: Path) -> None:
    """Refuse a file that is not a PyTorch archive, or whose seal does not match its content."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC:
            raise CheckpointError(f"{path}: not a checkpoint (not a PyTorch archive: {size} bytes starting "
                                  f"{head!r})")
        tail = len(SEAL) + hashlib.sha256().digest_size
        if size < tail + len(_ZIP_MAGIC):
            return
        handle.seek(size - tail)
        seal = handle.read(tail)
        if not seal.startswith(SEAL):
            return   # written before seals existed (or cut short: the zip reader reports that)
        digest, remaining = hashlib.sha256(), size - tail
        handle.seek(0)
        while remaining > 0:
            chunk = handle.read(min(remaining, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    if digest.digest() != seal[len(SEAL):]:
        raise CheckpointError(f"{path}: damaged: its content does not match the sha256 sealed in when it was "
                              f"written (a flipped bit or a partial copy); not used")


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
    verify_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: it contains pickled objects other than tensors "
                              f"and plain containers ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint: truncated or damaged ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (no '{FORMAT}' marker); "
                              f"a bare state dict cannot say which model or classes it belongs to")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this toolkit ({VERSION})")
    for key in ("model", "config", "class_names"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' entry")
    bad = non_finite_entry(payload)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} holds NaN or inf (written by a training that diverged); not used")
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


# State-dict prefixes of the three classes before the One Detector refactor (FasterRCNN's "rpn" / "roi_head",
# RCNN's head parts at the top level) and their names in today's Detector.
_OLD_PREFIXES = {"rpn.": "proposals.", "roi_head.": "head.", "box_head.": "head.box_head.",
                 "classifier.": "head.classifier.", "svm.": "head.svm.", "box_regressor.": "head.box_regressor."}


def upgrade_state_dict(state: dict, own_keys) -> dict:
    """A state dict in the layout written before the One Detector refactor, renamed to today's keys.

    Only keys that are not today's and whose renamed form is are renamed; anything else is left for
    :func:`load_model_weights` to report.
    """
    own_keys = set(own_keys)
    out = {}
    for key, value in state.items():
        if key not in own_keys:
            for old, new in _OLD_PREFIXES.items():
                if key.startswith(old) and new + key[len(old):] in own_keys:
                    key = new + key[len(old):]
                    break
        out[key] = value
    return out


def load_model_weights(model: nn.Module, ckpt: dict) -> None:
    """``model.load_state_dict`` with a one-line error naming the mismatched keys (old layouts are renamed)."""
    where = ckpt.get("path", "checkpoint")
    own = model.state_dict()
    state = upgrade_state_dict(ckpt["model"], own)
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
    """Save ``ckpt_<iteration>.pt`` and delete all but the newest ``keep`` (0 keeps all).

    Pruning also deletes the temp files that killed writers left in ``directory``.
    """
    path = save_checkpoint(checkpoint_path(directory, iteration), iteration=iteration, **kwargs)
    _write_pointer(Path(directory), path.name)
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    remove_stale_temp_files(directory)
    return path


def _write_pointer(directory: Path, name: str | None) -> None:
    """``last_checkpoint`` names the newest periodic checkpoint (for people and scripts)."""
    pointer = directory / "last_checkpoint"
    try:
        if name is None:
            pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(pointer, name + "\n")
    except OSError as exc:
        raise CheckpointError(f"{pointer}: could not be written ({_reason(exc)})") from None


def load_for_resume(source: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """The training state to resume from.

    Args:
        source: a checkpoint file (used as it is, or refused), or a run folder: its newest periodic
            checkpoint that loads, passes its checksum and holds finite values; a damaged newer one
            is skipped with a message, so a run killed while its newest file was mangled resumes
            from the one before.

    Raises:
        CheckpointError: nothing usable, or the checkpoint holds weights only.
    """
    source = Path(source)
    if not source.is_dir():
        return _training_state(load_checkpoint(source))
    candidates = list_checkpoints(source / "checkpoints") or list_checkpoints(source)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in {source} (expected checkpoints/ckpt_*.pt)")
    problems = []
    for index, (_, path) in enumerate(reversed(candidates)):
        try:
            return _training_state(load_checkpoint(path))
        except CheckpointError as exc:
            problems.append(str(exc))
            if index + 1 < len(candidates):
                log(f"{exc}; falling back to the previous checkpoint")
    raise CheckpointError(f"no usable checkpoint in {source}: " + (
        problems[0] if len(problems) == 1 else f"none of its {len(problems)} is (the newest: {problems[0]})"))


def _training_state(ckpt: dict) -> dict:
    if "optimizer" not in ckpt or "rng" not in ckpt:
        raise CheckpointError(f"{ckpt['path']}: holds weights only, not a training state to resume")
    return ckpt


def set_aside(directory: str | Path, first_iteration: int) -> list[Path]:
    """Rename the periodic checkpoints from ``first_iteration`` on to ``*.pt.diverged``.

    A run that diverged has finite but useless weights from the iteration its loss took off; this
    keeps ``--resume`` from choosing them while leaving them for inspection.
    """
    directory = Path(directory)
    moved = []
    for iteration, path in list_checkpoints(directory):
        if iteration >= first_iteration:
            target = path.with_name(path.name + ".diverged")
            path.replace(target)
            moved.append(target)
    if moved:
        remaining = list_checkpoints(directory)
        _write_pointer(directory, remaining[-1][1].name if remaining else None)
    return moved
