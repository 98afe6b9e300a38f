"""The run folder of a training: its lock, ``metrics.jsonl``, TensorBoard (when installed) and a tqdm bar.

Only rank 0 writes. On resume, ``metrics.jsonl`` is cut back to the resumed iteration
(rewritten atomically) so the file never holds two lines for one iteration. While a training
runs, rank 0 holds ``<run>/.lock`` (:func:`lock_run_dir`): a second training into the same
folder is refused with one line; the lock of a killed run is taken over.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from detect import distributed
from detect.errors import DetectError
from detect.utils.io import FileLock, atomic_write_text, remove_stale_temp_files

LOCK_NAME = ".lock"
LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


class RunDirBusy(DetectError):
    """Another process is training into this run folder."""


@contextmanager
def lock_run_dir(out_dir: str | Path, *, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run folder's lock (rank 0; every rank learns the outcome) for the ``with`` block.

    Re-entrant within a process (the CLI holds it around ``fit``, which takes it again). The lock
    dies with its holder, so a folder whose training was killed is taken over, with a message.

    Raises:
        RunDirBusy: on every rank, when another live process holds the lock.
    """
    out_dir = Path(out_dir)
    lock, error = None, None
    if distributed.is_main():
        try:
            lock = FileLock(out_dir / LOCK_NAME, error=RunDirBusy, what=f"output folder {out_dir}").acquire()
        except RunDirBusy as exc:
            error = (True, f"{exc}; wait for that training to end, or choose another --out")
        except OSError as exc:
            error = (False, f"output folder {out_dir} is not writable ({exc.strerror or exc})")
    error = distributed.broadcast_object(error)
    if error is not None:
        busy, message = error
        raise (RunDirBusy if busy else DetectError)(message)
    if lock is not None and lock.stale_holder:
        log(f"took over {out_dir}: its previous training ({lock.stale_holder}) ended without releasing it")
    if lock is not None and lock.unsupported:
        log(f"warning: cannot lock {out_dir} ({lock.unsupported}); a second training into it would not be refused")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def clean_run_dir(out_dir: str | Path, *, log: Callable[[str], None] = print) -> list[Path]:
    """Delete the temp files interrupted writes left in a run folder and its ``checkpoints/``.

    Call it holding the run folder's lock (see :func:`detect.utils.io.remove_stale_temp_files`).
    """
    out_dir = Path(out_dir)
    removed = [p for d in (out_dir, out_dir / "checkpoints") for p in remove_stale_temp_files(d, locked=True)]
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        log(f"removed {len(removed)} temp file(s) left by an interrupted write: {names}")
    return removed


def json_safe(value):
    """NaN / inf become null (strict JSON has no NaN); containers are cleaned recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    """Append JSON lines to ``<out_dir>/metrics.jsonl`` and scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, *, resume_at: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = []
            if resume_at > 0:
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line).get("iteration", 0) <= resume_at:
                            kept.append(line + "\n")
                    except ValueError:
                        continue
            atomic_write_text(self.path, "".join(kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_at or None)
        except ImportError:   # tensorboard is optional
            self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record.get("iteration", 0))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @staticmethod
    def append(out_dir: str | Path, record: dict) -> None:
        """Add one line to an existing run's ``metrics.jsonl`` (e.g. the final test evaluation)."""
        log = MetricsLog.__new__(MetricsLog)
        log.enabled, log.path, log.writer = True, Path(out_dir) / "metrics.jsonl", None
        log.write(record)


class ProgressBar:
    """A tqdm bar (rate, ETA) showing loss, LR and images/s, or any status text; a no-op when disabled.

    ``unit`` names what is counted ("img" for the R-CNN stages and the proposal store).
    """

    def __init__(self, *, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 unit: str = "it") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5, unit=unit)
        self._images, self._seconds = 0, 0.0

    def update(self, n: int = 1, record: dict | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        if record:
            self._images += record.get("images", 0)
            self._seconds += record.get("time", 0.0)
            postfix = {"lr": f"{record['lr']:.2e}"}
            if "loss" in record:
                postfix["loss"] = f"{record['loss']:.3f}"
            if self._seconds > 0:
                postfix["img/s"] = f"{self._images / self._seconds:.1f}"
            self.bar.set_postfix(postfix, refresh=False)

    def describe(self, text: str) -> None:
        """Show ``text`` after the counts (what the stage is doing: cache sizes, failures, ...)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """Print a line above the bar (to stdout, like the run's log lines)."""
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summarise(window: list[dict], iteration: int, epoch: float) -> dict:
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
