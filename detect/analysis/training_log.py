"""A training run's curves from its ``metrics.jsonl`` (written by :class:`detect.runlog.MetricsLog`).

Each line is one JSON object. Training lines have ``iteration``, ``epoch``, ``lr``, the mean
losses since the previous line (``loss`` and its terms ``loss_rpn_cls`` ...), ``grad_norm`` and
``images_per_s``; evaluation lines carry a ``split`` with its ``metric`` and ``mAP`` (validation
during training, the test split at the end). A line that does not parse (a run killed
mid-write) is skipped and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detect.errors import DetectError
from detect.utils.io import save_figure

LOG_NAME = "metrics.jsonl"
# numeric keys of a training line that are neither a loss term nor the learning rate
OTHER_KEYS = ("epoch", "grad_norm", "images_per_s", "skipped_steps")


@dataclass
class TrainingLog:
    """The series of one ``metrics.jsonl``.

    Attributes:
        path: the file read.
        train: key -> ((K,) iterations, (K,) values) for every numeric key of the training lines.
        evaluations: ``{"iteration", "split", "metric", "mAP"}`` per evaluation line, in file order.
        bad_lines: lines skipped because they were not JSON objects.
    """

    path: Path
    train: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)
    bad_lines: int = 0

    @property
    def loss_keys(self) -> list[str]:
        return [k for k in self.train if k.startswith("loss")]

    def last(self, key: str) -> float:
        _, values = self.train.get(key, (np.zeros(0), np.zeros(0)))
        return float(values[-1]) if len(values) else math.nan


def find_metrics_log(checkpoint: str | Path) -> Path | None:
    """The ``metrics.jsonl`` of the run a checkpoint belongs to (its folder, or the run folder above
    ``checkpoints/``); a run folder or the file itself is accepted too. None when there is none."""
    path = Path(checkpoint)
    if path.name == LOG_NAME and path.is_file():
        return path
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / LOG_NAME, folder.parent / LOG_NAME):
        if candidate.is_file():
            return candidate
    return None


def read_metrics_log(path: str | Path) -> TrainingLog:
    """Parse a ``metrics.jsonl``.

    Raises:
        DetectError: naming the file when it cannot be read.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DetectError(f"{path}: cannot read the training log ({exc})") from None
    log = TrainingLog(path)
    series: dict[str, tuple[list, list]] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.bad_lines += 1
            continue
        iteration = record.get("iteration", 0)
        if "split" in record:
            if "mAP" in record:      # NaN is written as null
                value = record["mAP"]
                log.evaluations.append({"iteration": iteration, "split": str(record["split"]),
                                        "metric": str(record.get("metric", "")),
                                        "mAP": float(value) if isinstance(value, (int, float)) else math.nan})
            continue
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, ([], []))
                series[key][0].append(iteration)
                series[key][1].append(float(value))
    log.train = {k: (np.asarray(i, np.int64), np.asarray(v, np.float64)) for k, (i, v) in series.items()}
    return log


def plot_training_curves(log: TrainingLog, path: str | Path) -> Path:
    """Loss terms (log scale), learning rate and evaluation mAP against the iteration, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, map_ax) = plt.subplots(1, 3, figsize=(13, 3.4))
    for key in log.loss_keys:
        iterations, values = log.train[key]
        positive = values > 0                       # a log axis cannot show a zero loss
        loss_ax.plot(iterations[positive], values[positive], label=key, lw=2.0 if key == "loss" else 1.2)
    loss_ax.set(title="loss", xlabel="iteration", yscale="log" if log.loss_keys else "linear")
    if "lr" in log.train:
        lr_ax.plot(*log.train["lr"], color="tab:purple")
    lr_ax.set(title="learning rate", xlabel="iteration")
    series: dict[str, list[dict]] = {}
    for entry in log.evaluations:
        series.setdefault(f"{entry['split']} {entry['metric']}".strip(), []).append(entry)
    for name, entries in series.items():
        map_ax.plot([e["iteration"] for e in entries], [e["mAP"] for e in entries], marker="o", label=name)
    map_ax.set(title="evaluation mAP", xlabel="iteration", ylim=(0, 1))
    for ax in (loss_ax, lr_ax, map_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
