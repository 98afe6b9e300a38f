"""The run's best model by validation mAP (``<run>/model_best.pt``) and early stopping.

The training loop scores the validation split every ``train.eval_period`` iterations and at the
end; each time the mAP beats every earlier evaluation of the run, the weights are written to
``model_best.pt`` (atomically, in the format of ``model_final.pt``, with the evaluation in its
``extra["best"]``). With ``train.early_stop_patience: N`` the run ends, as if it had reached
``train.max_iter``, after N evaluations in a row without a better mAP.

The best value so far and the count since travel in every periodic checkpoint's ``extra``, so a
resumed run compares against the evaluations made before the interruption and keeps counting
towards the patience where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from detect import checkpoint as ckpt_io
from detect import distributed

BEST_NAME = "model_best.pt"
METRIC_LABELS = {"voc07": "VOC07", "voc10": "VOC10", "coco": "COCO"}


def validation_metric(test_metric: str) -> str:
    """The metric of the periodic validation: ``test.metric``, with ``"all"`` read as VOC07 (the papers' metric)."""
    return "voc07" if test_metric == "all" else test_metric


@dataclass
class BestModel:
    """Keeps the best validation mAP of a run, its iteration, and the evaluations since.

    Args:
        path: where the best weights go (``<run>/model_best.pt``).
        metric: the metric the values are in; a resumed run with another metric starts afresh.
        patience: evaluations without improvement that end the run (0: never).
    """

    path: Path
    metric: str
    patience: int = 0
    value: float | None = None
    iteration: int | None = None
    since: int = 0

    def update(self, value: float, iteration: int) -> bool:
        """Record one evaluation; True when it is the best so far (a NaN mAP never is)."""
        if math.isfinite(value) and (self.value is None or value > self.value):
            self.value, self.iteration, self.since = float(value), iteration, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        """The patience is used up: the run should stop."""
        return self.patience > 0 and self.since >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps (plain values, loadable with ``weights_only=True``)."""
        return {"metric": self.metric, "value": self.value, "iteration": self.iteration, "since": self.since}

    def restore(self, state: dict | None, *, log: Callable[[str], None] = print) -> None:
        """Continue from a checkpoint's :meth:`state` (nothing to restore: a run from before this existed)."""
        if not state:
            return
        if state.get("metric") != self.metric:
            log(f"validation metric changed from {state.get('metric')} to {self.metric}: the best model is "
                f"chosen afresh from here on")
            return
        self.value, self.iteration, self.since = state.get("value"), state.get("iteration"), int(state.get("since", 0))

    def record(self, value: float, iteration: int, *, model: nn.Module, config: dict, class_names: list[str],
               log: Callable[[str], None] = print) -> dict:
        """One evaluation of ``model`` after ``iteration`` steps: saved when it is the best so far, logged.

        Every rank calls it (with the same value); rank 0 writes. Returns the ``metrics.jsonl`` record.
        """
        improved = self.update(value, iteration)
        if improved:
            if distributed.is_main():
                ckpt_io.save_checkpoint(self.path, model=model, config=config, class_names=class_names,
                                        iteration=iteration, extra={"best": self.state()})
            distributed.barrier()
        log(f"iteration {iteration}: {self.describe(value, improved)}")
        return {"iteration": iteration, "split": "val", "metric": self.metric, "mAP": value, "best_mAP": self.value}

    def describe(self, value: float, improved: bool) -> str:
        """The log line of one evaluation."""
        text = f"val {METRIC_LABELS.get(self.metric, self.metric)} mAP {value:.4f}"
        if improved:
            return f"{text} (best so far: {self.path.name})"
        best = "none yet" if self.value is None else f"{self.value:.4f} at iteration {self.iteration}"
        stop = f", {self.since}/{self.patience} without improvement" if self.patience else ""
        return f"{text} (best {best}{stop})"

    def summary(self) -> dict:
        """``fit``'s result keys: ``best`` (:meth:`state`, None before any evaluation) and ``best_checkpoint``."""
        found = self.value is not None
        return {"best": self.state() if found else None,
                "best_checkpoint": self.path if found and distributed.is_main() else None}
