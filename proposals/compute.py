"""Filling a proposal store: many processes on one machine, shards across machines, resumable.

An image list is split into ``num_shards`` interleaved shards (``--shard i/n``, or torchrun's
``RANK``/``WORLD_SIZE``); each shard appends to its own part file of the store, and its images are
computed by a pool of ``workers`` processes. Images the store already holds are skipped, so a killed
run is resumed by running it again; an unreadable image is recorded as failed and retried next time.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from detect.data.image import read_image
from detect.errors import DetectError
from detect.runlog import ProgressBar
from proposals.selective_search import MODES, selective_search, strategies
from proposals.store import ProposalStore

# Bump when a code change alters the boxes for the same parameters: old stores then stop matching.
ALGORITHM_VERSION = 1


def search_params(*, backend: str = "ours", mode: str = "fast", max_side: int = 1000, min_box_size: int = 10,
                  top_k: int | None = 2000, seed: int = 0, colour_spaces: Sequence[str] | None = None,
                  ks: Sequence[float] | None = None, similarities: Sequence[str] | None = None, sigma: float = 0.8,
                  min_size: int | None = None, segmenter: str = "opencv") -> dict:
    """Every parameter that shapes the boxes, resolved to explicit values (the store's version key).

    The keyword arguments are those of :func:`proposals.selective_search`; the result can be passed back
    to it as ``selective_search(image, **search_kwargs(params))``.
    """
    if mode not in MODES:
        raise DetectError(f"unknown selective search mode '{mode}' (choose from {', '.join(MODES)})")
    params = {"backend": backend, "mode": mode, "max_side": int(max_side), "min_box_size": int(min_box_size),
              "top_k": int(top_k) if top_k and top_k > 0 else 0, "seed": int(seed), "sigma": float(sigma),
              "algorithm": ALGORITHM_VERSION}
    if backend == "ours":
        try:
            plan = strategies(mode, colour_spaces=colour_spaces, ks=ks, similarities=similarities)
        except ValueError as exc:
            raise DetectError(str(exc)) from None
        params.update(colour_spaces=list(dict.fromkeys(s.colour_space for s in plan)),
                      ks=list(dict.fromkeys(s.k for s in plan)),
                      similarities=list(dict.fromkeys(s.similarity for s in plan)),
                      min_size=min_size, segmenter=segmenter)
    elif backend == "opencv":
        import cv2

        params["opencv"] = cv2.__version__
    else:
        raise DetectError(f"unknown proposal backend '{backend}' (choose ours or opencv)")
    return params


def search_kwargs(params: dict) -> dict:
    """The keyword arguments of :func:`proposals.selective_search` stored in ``params``."""
    skip = {"algorithm", "opencv"}
    return {k: v for k, v in params.items() if k not in skip}


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); None falls back to torchrun's RANK/WORLD_SIZE, then to 0/1."""
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        text = f"{rank}/{world}"
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise DetectError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise DetectError(f"--shard {text}: need 0 <= i < n")
    return index, count


@dataclass
class ComputeSummary:
    """What one compute run did."""

    total: int = 0          # images in this shard
    skipped: int = 0        # already in the store
    computed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)   # store records found corrupt (and recomputed)


_WORKER_PARAMS: dict = {}


def _init_worker(params: dict) -> None:
    import cv2

    cv2.setNumThreads(1)                      # one core per worker process; parallelism is across images
    _WORKER_PARAMS.clear()
    _WORKER_PARAMS.update(params)


def _work(item: tuple[str, str]) -> tuple[str, np.ndarray | None, str]:
    image_id, path = item
    try:
        image = read_image(path)
        return image_id, selective_search(image, **search_kwargs(_WORKER_PARAMS)), ""
    except DetectError as exc:
        return image_id, None, str(exc)
    except (ValueError, MemoryError, OSError) as exc:    # a bad image must not stop a long run
        return image_id, None, f"{path}: {type(exc).__name__}: {exc}"


def compute_store(items: Sequence[tuple[str, str | Path]], store: ProposalStore, *, workers: int = 1,
                  shard: tuple[int, int] = (0, 1), progress: bool = True, merge: bool | None = None,
                  log: Callable[[str], None] | None = None) -> ComputeSummary:
    """Compute the proposals of this shard's images that the store lacks.

    Args:
        items: (image_id, image path) of the whole split, in a fixed order (shards interleave over it).
        store: the store for the split and parameters; ``store.params`` drive the computation.
        workers: processes computing images (1: in this process).
        shard: (i, n) -- this run handles items i, i+n, i+2n, ...
        progress: a progress bar (images/s, ETA, images computed and failed).
        merge: merge the parts into one file at the end; default: when unsharded and nothing failed.
        log: if given, one line saying what is about to be computed (images, parameters, processes).
    """
    index, count = shard
    ids = [str(i) for i, _ in items]
    if len(set(ids)) != len(ids):
        raise DetectError("image ids must be unique within a split")
    summary = ComputeSummary()
    summary.problems = store.prepare()
    done = store.done()
    mine = [(str(i), str(p)) for i, p in list(items)[index::count]]
    todo = [item for item in mine if item[0] not in done]
    summary.total, summary.skipped = len(mine), len(mine) - len(todo)
    workers = max(1, min(workers, len(todo)))
    if log is not None and todo:
        log(f"proposals: {len(todo)} of {len(mine)} images{f' of shard {index}/{count}' if count > 1 else ''} to "
            f"compute into {store.directory} ({describe_params(store.params)}; {workers} process(es))")
    start = time.perf_counter()
    bar = ProgressBar(total=len(mine), initial=summary.skipped, enabled=progress, unit="img",
                      desc=f"selective search {index}/{count}" if count > 1 else "selective search")
    with store.writer(index, count) as writer:
        if workers == 1:
            _init_worker(store.params)
            results = map(_work, todo)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (store.params,))
            results = pool.imap_unordered(_work, todo, chunksize=1)
        try:
            for image_id, boxes, error in results:
                if boxes is None:
                    writer.fail(image_id, error)
                    summary.failed[image_id] = error
                    bar.write(f"failed: {image_id}: {error}")
                else:
                    writer.add(image_id, boxes)
                    summary.computed += 1
                bar.describe(f"{summary.computed} computed, {len(summary.failed)} failed, {workers} process(es)")
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    summary.seconds = time.perf_counter() - start
    if merge is None:
        merge = count == 1 and not summary.failed
    if merge:
        store.merge()
    else:
        store.refresh()
    return summary


def describe_params(params: dict) -> str:
    """The parameters that set the cost and the boxes, in a few words (for progress messages)."""
    top = f"top {params['top_k']}" if params.get("top_k") else "all boxes"
    return f"{params.get('backend', 'ours')} '{params.get('mode')}' mode, max side {params.get('max_side')}, {top}"
