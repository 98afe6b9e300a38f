"""Timing detectors image by image, for the speed ladder (``tools/benchmark.py ladder``).

Stage times come from the models' own :class:`~detect.utils.timing.StageClock` laps, read from
the wall clock or from this process's CPU time (a machine shared with other jobs slows the
wall clock, not the CPU time a single-threaded run spends). R-CNN can be timed on the first
K proposals of each image and scaled to the full count N: its warps go through the CNN in
fixed-size batches (R-CNN Sec. 2.2), so features and heads cost time linear in the count,
and with VGG16 on a CPU the full 2,000 warps take over ten minutes per image.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from detect.evaluation.results import detection_to_numpy
from detect.proposal_sources import FixedProposals, SelectiveSearchProposals, search_params_from_config
from detect.utils.timing import use_clock

# The detector's timing keys (detect.detector.TIMING_KEYS) as the ladder's columns.
STAGE_NAMES = {"features": "features", "proposals": "proposals", "head": "heads", "postprocess": "heads"}


def timed_selective_search(cfg, dataset, count: int, clock: Callable[[], float] = time.perf_counter
                           ) -> tuple[dict, float, float]:
    """Selective search on each test image with the config's parameters.

    Returns:
        (boxes by image id, seconds per image on ``clock``, wall seconds per image).
    """
    source = SelectiveSearchProposals(params=search_params_from_config(cfg), top_k=cfg.proposals.top_k, memo_size=0)
    boxes, seconds, wall = {}, 0.0, 0.0
    for index in range(count):
        item = dataset[index]
        if not isinstance(item, tuple):
            continue
        image, target = item
        start, wall_start = clock(), time.perf_counter()
        boxes[target["image_id"]] = source.one(image).numpy()
        seconds += clock() - start
        wall += time.perf_counter() - wall_start
    return boxes, seconds / max(len(boxes), 1), wall / max(len(boxes), 1)


def time_images(model, dataset, indices: Sequence[int], boxes_by_id: dict | None, *, device,
                clock: Callable[[], float] = time.perf_counter, sample: int = 0) -> tuple[dict, dict]:
    """Predict each of the dataset's images at ``indices`` once and time its stages (unreadable ones are skipped).

    Args:
        model: a :class:`~detect.detector.Detector`.
        boxes_by_id: the proposals of R-CNN / Fast R-CNN by image id (None: the model makes its own).
        clock: what stage times are read from (wall or process CPU time).
        sample: with K > 0, only the first K of an image's N proposals are run and the features and heads
            times are multiplied by N / K (N: the proposals the model would use, capped at its
            ``proposals.test_top``).

    Returns:
        (detections by image id in numpy, sums over the images: "proposals", "features", "heads" on ``clock``,
        "wall" (``predict``'s elapsed time, scaled alike), "rois" (N), "sampled" (K run) and "images").
    """
    cuda = torch.device(device).type == "cuda"
    sums = {"proposals": 0.0, "features": 0.0, "heads": 0.0, "wall": 0.0, "rois": 0.0, "sampled": 0.0, "images": 0}
    detections = {}
    for index in indices:
        item = dataset[index]
        if not isinstance(item, tuple):
            continue
        image, target = item
        image_id = target["image_id"]
        kwargs, scale = {}, 1.0
        if boxes_by_id is not None:
            boxes = boxes_by_id[image_id]
            full = min(len(boxes), model.proposals.test_top or len(boxes))
            used = min(sample, full) if sample > 0 else full
            scale = full / used if used else 1.0
            model.proposals.source = FixedProposals(boxes_by_id={image_id: boxes[:used]})
            kwargs["image_ids"] = [image_id]
            sums["rois"] += full
            sums["sampled"] += used
        timings: dict = {}
        start = time.perf_counter()
        with use_clock(clock):
            det = model.predict([image.to(device)], timings=timings, **kwargs)[0]
        if cuda:
            torch.cuda.synchronize()
        sums["wall"] += (time.perf_counter() - start) * scale
        for name, seconds in timings.items():
            stage = STAGE_NAMES.get(name, name)
            sums[stage] = sums.get(stage, 0.0) + seconds * (1.0 if stage == "proposals" else scale)
        sums["images"] += 1
        detections[image_id] = detection_to_numpy(det)
    return detections, sums


def add_sums(total: dict, more: dict) -> dict:
    """``total`` + ``more``, key by key (sums from :func:`time_images` on different images)."""
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total


def per_image(sums: dict) -> dict:
    """Sums from :func:`time_images` divided by their image count."""
    images = max(sums.get("images", 0), 1)
    return {key: value / images for key, value in sums.items() if key != "images"}


def warm_up(model, dataset, count: int, boxes_by_id: dict | None, *, device, sample: int = 0) -> None:
    """One untimed prediction of the first readable image: the first call allocates and picks kernels.

    R-CNN's warps go through the CNN batch after batch, so one window batch of its proposals is enough.
    """
    for index in range(count):
        item = dataset[index]
        if not isinstance(item, tuple):
            continue
        image, target = item
        kwargs = {}
        if boxes_by_id is not None:
            cap = [n for n in (sample, getattr(model.head, "window_batch", 0)) if n > 0]
            boxes = boxes_by_id[target["image_id"]][: min(cap) if cap else None]
            model.proposals.source = FixedProposals(boxes_by_id={target["image_id"]: boxes})
            kwargs["image_ids"] = [target["image_id"]]
        model.predict([image.to(device)], **kwargs)
        return
