"""Timing training per pipeline, stage by stage: the training-time ladder (``tools/benchmark.py training``).

Fast R-CNN's case against R-CNN was training time as much as test time (Fast R-CNN Sec. 1 and
Table 4: 84 h for R-CNN's stages against 9.5 h, VGG16 on VOC07). Each pipeline here is built from
its config and trained for the same iterations on the same first images of the training split:

* R-CNN: ``proposals`` (filling the selective-search store), ``train`` (stage 1, fine-tuning),
  ``features`` (stage 2 into the feature cache), ``svm`` (stage 3), ``bbox`` (stage 4); in the
  streaming mode ``features`` holds stages 2 and 3 together and ``svm`` is empty;
* Fast R-CNN: ``proposals`` (the same store when the parameters agree: filled once, the time
  counted for both, as the papers count it) and ``train``;
* Faster R-CNN: ``train`` (its RPN proposes; pre-training, a separate recipe, is not timed).

Every stage runs in this process (data-loading and selective-search workers would hide their CPU
time from ``time.process_time``); the caller sets the thread count.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
from detect import build_model, load_config
from detect.data.loader import DetectionDataset, load_records
from detect.engine import fit
from detect.errors import ConfigError
from detect.feature_cache import FeatureCache
from detect.proposal_sources import open_store
from detect.rcnn_streaming import fit_svms_streaming
from proposals.compute import compute_store

STAGES = ("proposals", "train", "features", "svm", "bbox")
LABELS = {"rcnn": "R-CNN", "fast": "Fast R-CNN", "faster": "Faster R-CNN"}
PIPELINE_KEYS = {"rcnn": "rcnn", "fast_rcnn": "fast", "faster_rcnn": "faster"}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), with the logical core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def load_training_configs(paths: list, overrides: list[str], *, iters: int = 0) -> list:
    """The configs, alike: ``overrides`` on each, ``iters`` iterations (steps at 3/4, warm-up at most 1/5), no
    data-loading workers (their CPU time would not be counted), no checkpoints or evaluations between.

    Raises:
        ConfigError: a pipeline given twice, or ``iters`` < 0.
    """
    if iters < 0:
        raise ConfigError(f"--iters {iters}: must be >= 0")
    schedule = [f"train.max_iter={iters}", f"train.steps=[{max(1, 3 * iters // 4)}]"] if iters else []
    configs, seen = [], set()
    for path in paths:
        cfg = load_config(path, [*overrides, *schedule, "train.workers=0", "train.checkpoint_period=0",
                                 "train.eval_period=0"])
        key = PIPELINE_KEYS[cfg.model.pipeline]
        if key in seen:
            raise ConfigError(f"{path}: a second '{cfg.model.pipeline}' config; give at most one of each pipeline")
        seen.add(key)
        cfg.train.warmup_iters = min(cfg.train.warmup_iters, cfg.train.max_iter // 5)
        configs.append(cfg)
    return configs


class _Stopwatch:
    """Adds each ``with watch(stage):`` block's seconds on ``clock`` and on the wall clock to the stage."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.seconds, self.wall = clock, {}, {}
        self._stage = ""

    def __call__(self, stage: str) -> "_Stopwatch":
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start, self._wall = self.clock(), time.perf_counter()

    def __exit__(self, *exc) -> None:
        stage = self._stage
        self.seconds[stage] = self.seconds.get(stage, 0.0) + self.clock() - self._start
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - self._wall


def time_training(configs: list, *, out_dir: str | Path, limit: int = 0, device: torch.device | str = "cpu",
                  clock: Callable[[], float] = time.process_time, progress: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Train each config's pipeline once, timing its stages.

    Args:
        configs: loaded configs, at most one each of ``rcnn``, ``fast_rcnn``, ``faster_rcnn``; their
            ``train`` sections set the iterations (the caller makes them agree).
        out_dir: a fresh folder for the runs, the proposal store and the feature cache.
        limit: train on the first ``limit`` images of the training split (0: all).
        clock: the stage clock (``time.process_time`` on a shared machine).

    Returns:
        ``{key: {"label", "seconds": {stage: s}, "wall": {stage: s}, "images", "iterations", "model"}}``
        for the keys ``rcnn``, ``fast``, ``faster``, in the ladder's order; ``seconds["proposals"]`` of a
        pipeline whose store another filled is that fill's time (``"shared_proposals": True``).
    """
    out_dir = Path(out_dir)
    runs, filled = {}, {}
    by_key = {PIPELINE_KEYS[cfg.model.pipeline]: cfg for cfg in configs}
    for key in ("rcnn", "fast", "faster"):
        if key not in by_key:
            continue
        cfg = by_key[key]
        cfg.proposals.store = str(out_dir / "proposals")    # a fresh store, so that filling it is timed
        watch = _Stopwatch(clock)
        records, train_set = _training_set(cfg, limit)
        shared = False
        if key != "faster":
            shared = _fill_store(cfg, records, watch, filled, progress, log)
        log(f"{LABELS[key]}: training on {len(train_set)} images for {cfg.train.max_iter} iterations")
        model = _train(cfg, train_set, out_dir / key, watch, device, progress, log)
        if key == "rcnn":
            _rcnn_stages(model, cfg, records, out_dir / key, watch, device, progress, log)
        runs[key] = {"label": LABELS[key], "seconds": watch.seconds, "wall": watch.wall, "model": model,
                     "images": len(train_set), "iterations": cfg.train.max_iter,
                     "batch": cfg.train.images_per_batch, "shared_proposals": shared}
    return runs


def _training_set(cfg, limit: int):
    records, names, coco_ids = load_records(cfg, cfg.data.train_split)
    records = records[:limit] if limit > 0 else records
    return records, DetectionDataset(records, names, train=True, use_difficult=cfg.data.use_difficult,
                                     coco_ids=coco_ids, max_pixels=cfg.data.max_image_pixels)


def _fill_store(cfg, records, watch: _Stopwatch, filled: dict, progress: bool, log) -> bool:
    """Selective search of the images into the store (in this process); True if another pipeline filled it."""
    store = open_store(cfg, cfg.data.train_split)
    if store.directory in filled:
        watch.seconds["proposals"], watch.wall["proposals"] = filled[store.directory]
        return True
    with watch("proposals"):
        compute_store([(r.image_id, r.path) for r in records], store, workers=1, progress=progress, log=log)
    store.close()
    filled[store.directory] = watch.seconds["proposals"], watch.wall["proposals"]
    return False


def _train(cfg, train_set, out_dir: Path, watch: _Stopwatch, device, progress: bool, log):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, class_names=train_set.class_names)
    with watch("train"):
        fit(model, train_set, cfg, out_dir=out_dir / "train", device=device, log=log, progress=progress)
    return model


def _rcnn_stages(model, cfg, records, out_dir: Path, watch: _Stopwatch, device, progress: bool, log) -> None:
    """R-CNN's stages 2-4 in the configured feature mode."""
    from detect.rcnn_training import (cache_fingerprint, extract_features, fit_regression_rows,
                                      fit_regression_stage, fit_svm_stage)

    if cfg.rcnn.feature_cache_mode == "streaming":
        with watch("features"):
            streamed = fit_svms_streaming(model, records, cfg, device=device, progress=progress, log=log)
        watch.seconds["svm"] = watch.wall["svm"] = 0.0
        with watch("bbox"):
            fit_regression_rows(model, streamed.regression, cfg, log=log)
        return
    cache = FeatureCache(out_dir / "features", fingerprint=cache_fingerprint(model, cfg))
    with watch("features"):
        done = extract_features(model, records, cache, device=device, use_difficult=cfg.data.use_difficult,
                                min_overlap=cfg.rcnn.bbox_reg.min_overlap, max_pixels=cfg.data.max_image_pixels,
                                progress=progress, log=log)
    ids = [r.image_id for r in records if r.image_id not in done["failed"]]
    with watch("svm"):
        fit_svm_stage(model, cache, ids, cfg, progress=progress, log=log)
    with watch("bbox"):
        fit_regression_stage(model, cache, ids, cfg, log=log)


def format_training_table(runs: dict, *, cpu: str, threads: int, clock: str, note: str = "") -> str:
    """The training ladder as markdown: seconds per stage and in all, and Fast R-CNN's speed-up over R-CNN."""
    unit = "CPU seconds (this process)" if clock == "cpu" else "wall seconds"
    first = next(iter(runs.values()))
    lines = [f"{cpu}; {threads} thread(s); {unit}. {first['images']} training images, {first['iterations']} "
             f"iterations of {first['batch']} images{'; ' + note if note else ''}.", "",
             "| pipeline | proposals | fine-tune / train | features | SVMs | box regression | total | wall total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, run in runs.items():
        s = run["seconds"]
        cells = [f"{s[stage]:.1f}{'*' if stage == 'proposals' and run['shared_proposals'] else ''}"
                 if stage in s else "-" for stage in STAGES]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + f" | {sum(s.values()):.1f} | "
                     f"{sum(run['wall'].values()):.1f} |")
    lines.append("")
    if any(run["shared_proposals"] for run in runs.values()):
        lines.append("- \\* the same selective-search store, filled once (by R-CNN's run) and counted for both")
    if "rcnn" in runs and "fast" in runs:
        r, f = (sum(runs[k]["seconds"].values()) for k in ("rcnn", "fast"))
        r0, f0 = (sum(runs[k]["seconds"].values()) - runs[k]["seconds"].get("proposals", 0.0) for k in ("rcnn", "fast"))
        lines.append(f"- Fast R-CNN trains {r / max(f, 1e-12):.1f}x faster than R-CNN ({r0 / max(f0, 1e-12):.1f}x "
                     "without proposals; the paper: 9x, 84 h vs 9.5 h, VGG16 on VOC07, Table 4)")
    if "fast" in runs and "faster" in runs:
        f, fr = (sum(runs[k]["seconds"].values()) for k in ("fast", "faster"))
        lines.append(f"- Faster R-CNN trains {f / max(fr, 1e-12):.1f}x faster than Fast R-CNN with proposal time "
                     "counted")
    return "\n".join(lines)
