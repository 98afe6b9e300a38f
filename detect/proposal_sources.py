"""Where R-CNN and Fast R-CNN get their regions: stored selective search, on-the-fly search, ground truth, an RPN.

A proposal source is called with the batch's images and their ids and returns one
``(P_i, 4)`` float tensor of ``(x1, y1, x2, y2)`` boxes per image, in that image's
pixels, best ranked first (py-faster-rcnn's ``selective_search`` / ``rpn`` / ``gt``
roidb sources, Fast R-CNN Sec. 2). Stored boxes were computed on the unflipped
image, so a flipped training image gets its boxes mirrored.

Images without ids (e.g. the demo's loose files) have nothing to look up: their
boxes are computed with selective search. An id missing from the store is an
error naming the image and the store, unless ``compute_missing`` is set.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import remove_small_boxes

from detect.data.loader import load_records, synthetic_root
from detect.errors import ConfigError, DetectError
from proposals.compute import compute_store, search_kwargs, search_params
from proposals.selective_search import selective_search
from proposals.store import ProposalStore


class ProposalSource(Protocol):
    def __call__(self, images: list[Tensor], image_ids: Sequence[str] | None = None, *,
                 flipped: Sequence[bool] | None = None, targets: Sequence[dict] | None = None) -> list[Tensor]:
        """N images (3, H, W) -> N tensors (P_i, 4) in the images' pixels."""


def _mirror(boxes: Tensor, width: int) -> Tensor:
    """Boxes of an image mirrored left to right (continuous pixels: x -> W - x)."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


def _clean(boxes: Tensor, image: Tensor, top_k: int) -> Tensor:
    boxes = boxes[:top_k] if top_k > 0 else boxes
    boxes = boxes.to(device=image.device, dtype=torch.float32)
    h, w = image.shape[-2:]
    boxes = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1)
    return boxes[remove_small_boxes(boxes, 1.0)]     # a zero-width box has no regression target


class SelectiveSearchProposals:
    """Selective search computed for each image when asked (slow: seconds per image at VOC size).

    Args:
        params: the store parameters (``proposals.compute.search_params``), so boxes match a stored run.
        top_k: keep the best ``top_k`` boxes (0: all).
    """

    def __init__(self, *, params: dict, top_k: int = 2000, memo_size: int = 4096) -> None:
        self.params = dict(params)
        self.top_k = top_k
        self.memo_size = memo_size
        self._memo: OrderedDict[bytes, Tensor] = OrderedDict()

    def one(self, image: Tensor) -> Tensor:
        """Boxes of one (3, H, W) [0, 1] image, remembered by the image's content.

        Selective search is a pure function of the pixels, so an image seen again (the next epoch,
        without ids to look it up by) costs a hash instead of a search.
        """
        pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        pixels = np.ascontiguousarray(pixels)
        key = hashlib.blake2b(pixels.tobytes(), digest_size=16).digest() + bytes(str(pixels.shape), "ascii")
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        boxes = torch.from_numpy(selective_search(pixels, **search_kwargs(self.params)))
        if self.memo_size > 0:
            self._memo[key] = boxes
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return boxes

    def __call__(self, images, image_ids=None, *, flipped=None, targets=None) -> list[Tensor]:
        return [_clean(self.one(image), image, self.top_k) for image in images]


class StoredProposals:
    """Boxes read from proposal stores by image id (one store per dataset split).

    Args:
        stores: :class:`proposals.store.ProposalStore` objects; an id is looked up in each in turn.
        top_k: keep the best ``top_k`` boxes (0: all).
        compute: computes boxes for images without ids, and for missing ids when ``compute_missing``.
        compute_missing: an id in no store is computed instead of raising.
    """

    def __init__(self, *, stores: Sequence, top_k: int = 2000, compute: SelectiveSearchProposals | None = None,
                 compute_missing: bool = False) -> None:
        self.stores = list(stores)
        self.top_k = top_k
        self.compute = compute
        self.compute_missing = compute_missing
        self._refreshed = False

    def lookup(self, image_id: str) -> Tensor | None:
        for attempt in range(2):
            for store in self.stores:
                if image_id in store:
                    return torch.from_numpy(store.get(image_id))
            if attempt or self._refreshed:
                return None
            self._refreshed = True       # the stores may have been filled after this source first read them
            for store in self.stores:
                store.refresh()
        return None

    def __call__(self, images, image_ids=None, *, flipped=None, targets=None) -> list[Tensor]:
        out = []
        for i, image in enumerate(images):
            boxes = None if image_ids is None else self.lookup(str(image_ids[i]))
            if boxes is None:
                if self.compute is None or (image_ids is not None and not self.compute_missing):
                    where = ", ".join(str(s.directory) for s in self.stores) or "(no store configured)"
                    raise DetectError(f"no stored proposals for image '{image_ids[i] if image_ids else i}' in {where}; "
                                      "compute them with 'detect-proposals compute' for this split and the same "
                                      "proposals.* parameters, or set fast_rcnn.compute_missing=true "
                                      "(rcnn.compute_missing) to compute missing ones on the fly")
                out.append(_clean(self.compute.one(image), image, self.top_k))   # computed on the image as given
                continue
            if flipped is not None and flipped[i]:
                boxes = _mirror(boxes, image.shape[-1])
            out.append(_clean(boxes, image, self.top_k))
        return out


class FixedProposals:
    """Boxes given up front, by image id (e.g. computed and timed once by the benchmark)."""

    def __init__(self, *, boxes_by_id: dict[str, np.ndarray] | None = None) -> None:
        self.boxes_by_id = dict(boxes_by_id or {})

    def __call__(self, images, image_ids=None, *, flipped=None, targets=None) -> list[Tensor]:
        out = []
        for i, image in enumerate(images):
            if image_ids is None or str(image_ids[i]) not in self.boxes_by_id:
                raise DetectError(f"{type(self).__name__}: no boxes for image '{image_ids[i] if image_ids else i}'")
            boxes = torch.as_tensor(self.boxes_by_id[str(image_ids[i])]).reshape(-1, 4)
            out.append(_clean(_mirror(boxes, image.shape[-1]) if flipped is not None and flipped[i] else boxes,
                              image, 0))
        return out


class GroundTruthProposals(FixedProposals):
    """The ground-truth boxes themselves (an oracle source for ablations and tests).

    In training the targets' boxes are used; at test time the boxes are looked up by id.
    """

    def __call__(self, images, image_ids=None, *, flipped=None, targets=None) -> list[Tensor]:
        if targets is not None:
            return [_clean(t["boxes"], image, 0) for t, image in zip(targets, images)]
        return super().__call__(images, image_ids, flipped=flipped)


class ExternalProposals(nn.Module):
    """A proposal source as the proposal stage of :class:`detect.detector.Detector` (Fast R-CNN, R-CNN).

    Args:
        source: a :class:`ProposalSource` (boxes in the images' pixels, best first).
        train_top, test_top: the best-ranked boxes used per image in training / testing (0: all).
    """

    loss_names: tuple[str, ...] = ()      # nothing to learn

    def __init__(self, *, source: ProposalSource, train_top: int = 2000, test_top: int = 2000) -> None:
        super().__init__()
        self.source = source
        self.train_top = train_top
        self.test_top = test_top

    def input_boxes(self, inp, *, training: bool) -> list[Tensor]:
        """Each image's boxes in its own pixels; training passes flips and targets (the ground-truth source)."""
        if training:
            boxes = self.source(inp.images, inp.image_ids, flipped=inp.flipped, targets=inp.input_targets)
        else:
            boxes = self.source(inp.images, inp.image_ids)
        top = (self.train_top if training else self.test_top) or None
        return [b[:top] for b in boxes]

    def run(self, inp, *, training: bool, with_loss: bool = False) -> tuple[list[Tensor], None, dict]:
        """(boxes in network-input pixels, no scores, no losses)."""
        dtype = inp.batch.tensor.dtype if inp.features is None else inp.features.dtype
        boxes = [inp.transform.boxes_to_network(b.to(dtype), size, orig) for b, size, orig in
                 zip(self.input_boxes(inp, training=training), inp.batch.image_sizes, inp.batch.original_sizes)]
        return boxes, None, {}

    def extra_repr(self) -> str:
        return f"source={type(self.source).__name__}, train_top={self.train_top}, test_top={self.test_top}"


# --------------------------------------------------------------------------- from config


def search_params_from_config(cfg) -> dict:
    """The store parameters ``cfg.proposals`` describes (the same key ``detect-proposals compute`` uses)."""
    p = cfg.proposals
    return search_params(backend=p.backend, mode=p.mode, max_side=p.max_side, min_box_size=p.min_box_size,
                         top_k=p.top_k, seed=p.seed, colour_spaces=p.colour_spaces or None, ks=p.ks or None,
                         similarities=p.similarities or None, sigma=p.sigma, min_size=p.min_size or None,
                         segmenter=p.segmenter)


def split_store_name(cfg, split: str) -> str:
    """The store's key for a split of ``cfg.data``, as ``detect-proposals compute --voc ROOT --split S`` names it."""
    from proposals.sources import split_key   # the proposals CLI's naming rule; one definition of it

    data = cfg.data
    if data.format == "synthetic":
        return split_key(Path(synthetic_root(data)).resolve().name, split)
    if data.format == "coco":
        return split_key(Path(data.annotations.replace("{split}", split)).stem)
    return split_key(Path(data.root).resolve().name if data.root else "", split)


def open_store(cfg, split: str):
    """The :class:`proposals.store.ProposalStore` holding one split's boxes."""
    if not cfg.proposals.store:
        raise ConfigError(f"{cfg.source or 'config'}: proposals.store is empty: set it to the proposal store "
                          "directory (filled by 'detect-proposals compute')")
    return ProposalStore(cfg.proposals.store, split_store_name(cfg, split), search_params_from_config(cfg))


def build_proposal_source(cfg, kind: str, *, top_k: int, compute_missing: bool):
    """The proposal source ``kind`` ("stored", "selective_search", "ground_truth") for a config.

    Stored proposals are looked up in the stores of the train, val and test splits.
    """
    compute = SelectiveSearchProposals(params=search_params_from_config(cfg), top_k=top_k)
    if kind == "selective_search":
        return compute
    if kind == "ground_truth":
        return GroundTruthProposals()
    if kind != "stored":
        raise ConfigError(f"unknown proposal source '{kind}' (stored, selective_search, ground_truth)")
    if not cfg.proposals.store:
        raise ConfigError(f"{cfg.source or 'config'}: proposals.store is empty: stored proposals need the store "
                          "directory (or use proposal_source: selective_search)")
    splits = dict.fromkeys([cfg.data.train_split, cfg.data.val_split, cfg.data.test_split, cfg.test.split])
    stores = [open_store(cfg, s) for s in splits if s]
    return StoredProposals(stores=stores, top_k=top_k, compute=compute, compute_missing=compute_missing)


def ensure_stored_proposals(cfg, split: str, *, workers: int | None = None, shard: tuple[int, int] = (0, 1),
                            progress: bool = False, log=print) -> float:
    """Fill the store of one split with the images it lacks (resumable); returns seconds spent per new image.

    Says what it computes and, with ``progress``, shows a bar with the rate and the ETA. ``workers``:
    processes (default ``train.workers``, at least 1). ``shard`` (i, n): only images i, i+n, ... (e.g.
    torchrun's RANK/WORLD_SIZE, each rank calling this); a sharded fill leaves its part file unmerged:
    once every shard is done, one process calls ``open_store(cfg, split).merge()``.
    """
    records, _, _ = load_records(cfg, split)
    store = open_store(cfg, split)
    workers = max(1, cfg.train.workers if workers is None else workers)
    summary = compute_store([(r.image_id, r.path) for r in records], store, workers=workers, shard=shard,
                            progress=progress, log=log)
    store.close()
    if summary.failed:
        log(f"proposals: {len(summary.failed)} images failed in {store.directory}: {sorted(summary.failed)[:5]}")
    return summary.seconds / summary.computed if summary.computed else 0.0
