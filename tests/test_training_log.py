"""Reading a run's metrics.jsonl (as MetricsLog writes it) into curves, finding it, and plotting it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detect.analysis.training_log import find_metrics_log, plot_training_curves, read_metrics_log
from detect.runlog import MetricsLog, summarise


def _steps(first: int, count: int, loss: float, lr: float) -> list[dict]:
    return [{"iteration": first + k, "lr": lr, "loss": loss + k, "loss_cls": 0.25 * (loss + k),
             "loss_box": 0.75 * (loss + k), "time": 0.5, "images": 2} for k in range(count)]


def _write_run(run):
    """Two log lines of two steps each, a validation, a final test with a NaN mAP, and a half-written line."""
    log = MetricsLog(run)
    log.write(summarise(_steps(1, 2, 4.0, 0.01), 2, 0.5))      # means: loss 4.5, lr 0.01
    log.write({"iteration": 2, "split": "val", "metric": "voc07", "mAP": 0.25})
    log.write(summarise(_steps(3, 2, 2.0, 0.02), 4, 1.0))      # means: loss 2.5, lr 0.02
    log.close()
    MetricsLog.append(run, {"iteration": 4, "split": "test", "metric": "voc07", "mAP": math.nan,
                            "per_class": {"cat": math.nan}})
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"iteration": 6, "lo')                      # the run was killed mid-write
    return run / "metrics.jsonl"


def test_reads_the_series_and_evaluations_metrics_log_writes(tmp_path):
    path = _write_run(tmp_path / "run")
    log = read_metrics_log(path)
    iterations, loss = log.train["loss"]
    assert iterations.tolist() == [2, 4] and loss.tolist() == pytest.approx([4.5, 2.5])
    assert log.train["loss_cls"][1].tolist() == pytest.approx([1.125, 0.625])
    assert log.train["lr"][1].tolist() == [0.01, 0.02] and log.train["images_per_s"][1].tolist() == [4.0, 4.0]
    assert log.loss_keys == ["loss", "loss_cls", "loss_box"]
    assert log.last("loss_box") == pytest.approx(1.875) and math.isnan(log.last("loss_rpn_cls"))
    assert [(e["iteration"], e["split"], e["metric"]) for e in log.evaluations] == [(2, "val", "voc07"),
                                                                                    (4, "test", "voc07")]
    assert log.evaluations[0]["mAP"] == 0.25 and math.isnan(log.evaluations[1]["mAP"])    # null: NaN
    assert log.bad_lines == 1


def test_finds_the_log_of_a_checkpoint_in_the_run_folder_or_above_checkpoints(tmp_path):
    run = tmp_path / "run"
    path = _write_run(run)
    (run / "checkpoints").mkdir()
    for given in (run / "model_final.pt", run / "checkpoints" / "ckpt_0000004.pt", run, path):
        assert find_metrics_log(given) == path, given
    (tmp_path / "other").mkdir()
    assert find_metrics_log(tmp_path / "other" / "model_final.pt") is None


def test_unreadable_log_is_one_error_naming_it(tmp_path):
    from detect.errors import DetectError

    with pytest.raises(DetectError, match="gone.jsonl: cannot read the training log"):
        read_metrics_log(tmp_path / "gone.jsonl")


def test_plot_shows_each_series_against_its_iterations(tmp_path, monkeypatch):
    """Catches a plot of the wrong data: a loss term missing, lr and loss swapped, evaluations not drawn."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    log = read_metrics_log(_write_run(tmp_path / "run"))
    out = plot_training_curves(log, tmp_path / "curves.png")
    (fig,) = figures
    try:
        loss_ax, lr_ax, map_ax = fig.axes
        assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "evaluation mAP"]
        lines = {line.get_label(): line for line in loss_ax.get_lines()}
        assert set(lines) == {"loss", "loss_cls", "loss_box"} and loss_ax.get_yscale() == "log"
        assert lines["loss_cls"].get_xdata().tolist() == [2, 4]
        assert np.allclose(lines["loss_cls"].get_ydata(), [1.125, 0.625])
        assert lr_ax.get_lines()[0].get_ydata().tolist() == [0.01, 0.02]
        series = {line.get_label(): line for line in map_ax.get_lines()}
        assert series["val voc07"].get_xdata().tolist() == [2] and series["val voc07"].get_ydata().tolist() == [0.25]
    finally:
        close(fig)
    assert out.is_file() and out.stat().st_size > 1000
