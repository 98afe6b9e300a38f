"""R-CNN's stage-2 feature cache: per-image region features on disk, float16, memory-mapped, resumable.

R-CNN trains its SVMs and box regressors on features of every proposal of every
training image (Sec. 2.3) -- far more than memory holds, and too slow to recompute
per pass. Each image gets its own files, written atomically, the small info file
last, so a killed run resumes at the first image without one::

    <root>/meta.json                the fingerprint: model weights, proposal set, layer, classes
    <root>/<key>.feat.npy           (P, D) float16 SVM features (fc7) of gt boxes + proposals
    <root>/<key>.pool5.npy          (K, D5) float16 pool5 features of the rows with IoU > 0.6 (box regression)
    <root>/<key>.info.npz           boxes (P, 4), gt_classes (P,), overlaps (P, C), pool5_rows (K,),
                                    and the blake2b digest of each of the two .npy shards

Every shard is checked against its digest when first read (the info file's own arrays are covered
by the zip format's crc32), so a truncated or bit-flipped shard is never used: :meth:`FeatureCache.get`
raises an error naming it, and the feature stage (:meth:`FeatureCache.valid`) recomputes it. Temp
files of killed writers are removed when the next writer opens the cache
(:func:`detect.utils.io.remove_stale_temp_files`).

Keeping pool5 only for the rows box regression trains on is what keeps the cache
small (fc7 in float16 is 16 MB per image at 2000 boxes; pool5 for all would be 37 MB).
A cache whose fingerprint differs from the model's is refused: its features belong
to other weights or another proposal set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detect.errors import DetectError
from detect.utils.io import atomic_write_bytes, atomic_write_json, remove_stale_temp_files

FORMAT = "rcnn-feature-cache"
VERSION = 1


class FeatureCacheError(DetectError):
    """The cache belongs to another model or proposal set, or an image's files are missing or corrupt."""


def weights_digest(*modules: torch.nn.Module) -> str:
    """A short hash of the modules' parameters and buffers (which weights produced the features)."""
    digest = hashlib.blake2b(digest_size=12)
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CachedImage:
    """One image's cached rows (the arrays are memory-mapped where large)."""

    image_id: str
    boxes: np.ndarray          # (P, 4) float32: ground-truth boxes first, then proposals
    gt_classes: np.ndarray     # (P,) int64: class of a ground-truth row, -1 for proposals
    overlaps: np.ndarray       # (P, C) float32: IoU with the closest box of each class
    features: np.ndarray       # (P, D) float16
    pool5_rows: np.ndarray     # (K,) int64 rows that have pool5 features
    pool5: np.ndarray          # (K, D5) float16


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


SHARDS = ("feat", "pool5")
_INFO_ARRAYS = ("boxes", "gt_classes", "overlaps", "pool5_rows")


class FeatureCache:
    """A directory of per-image feature files for one (model weights, proposal set, layer) fingerprint.

    Args:
        root: the cache directory.
        fingerprint: JSON-able dict naming what produced the features; a different one is refused.
    """

    def __init__(self, root: str | Path, *, fingerprint: dict) -> None:
        self.root = Path(root)
        self._verified: set[tuple] = set()       # (path, inode, size, mtime) of shards whose digest matched
        self._cleaned = False                    # stale temp files removed by the first put()
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        meta = self.root / "meta.json"
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FeatureCacheError(f"{meta}: unreadable ({exc}); delete {self.root} to rebuild it") from None
            if stored.get("format") != FORMAT:
                raise FeatureCacheError(f"{meta}: not an R-CNN feature cache")
            theirs = stored.get("fingerprint", {})
            differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            if differ:
                key = differ[0]
                raise FeatureCacheError(f"feature cache {self.root} was made by another {key.replace('_', ' ')} "
                                        f"({theirs.get(key)!r}, now {self.fingerprint.get(key)!r}); refusing to mix "
                                        "features: delete it or point rcnn.feature_cache elsewhere")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint})

    def _key(self, image_id: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", image_id)[:80]
        return f"{safe}-{hashlib.blake2b(image_id.encode(), digest_size=4).hexdigest()}"

    def __contains__(self, image_id: str) -> bool:
        return (self.root / f"{self._key(image_id)}.info.npz").is_file()

    def put(self, image_id: str, *, boxes: np.ndarray, gt_classes: np.ndarray, overlaps: np.ndarray,
            features: np.ndarray, pool5_rows: np.ndarray, pool5: np.ndarray) -> None:
        """Write one image's rows (features stored as float16); the info file goes last and marks completion."""
        key = self._key(image_id)
        if len(features) != len(boxes) or len(pool5) != len(pool5_rows):
            raise ValueError(f"{image_id}: {len(features)} feature rows for {len(boxes)} boxes, "
                             f"{len(pool5)} pool5 rows for {len(pool5_rows)} indices")
        if not self._cleaned:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.root)   # those of killed writers; live writers' are kept
            self._cleaned = True
        digests = {}
        for name, array in (("feat", features), ("pool5", pool5)):
            data = _array_bytes(np.asarray(array, dtype=np.float16))
            digests[f"{name}_digest"] = np.array(_digest(data))
            atomic_write_bytes(self.root / f"{key}.{name}.npy", data)
        buffer = io.BytesIO()
        np.savez(buffer, image_id=np.array(image_id), boxes=np.asarray(boxes, np.float32),
                 gt_classes=np.asarray(gt_classes, np.int64), overlaps=np.asarray(overlaps, np.float32),
                 pool5_rows=np.asarray(pool5_rows, np.int64), **digests)
        atomic_write_bytes(self.root / f"{key}.info.npz", buffer.getvalue())

    def valid(self, image_id: str) -> bool:
        """Whether the image's files are all there and pass their checks (what the feature stage may skip)."""
        if image_id not in self:
            return False
        try:
            self.get(image_id)
        except FeatureCacheError:
            return False
        return True

    def _check_shard(self, path: Path, expected: str) -> None:
        """Raise naming ``path`` unless its bytes match ``expected`` (checked once per file version)."""
        try:
            st = os.stat(path)
            stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp in self._verified:
                return
            actual = _digest(path.read_bytes())
        except OSError as exc:
            raise FeatureCacheError(f"feature shard {path} is unreadable ({exc.strerror}); rerun the feature "
                                    "stage to recompute it") from None
        if actual != expected:
            raise FeatureCacheError(f"feature shard {path} is corrupt (checksum mismatch: truncated or altered); "
                                    "rerun the feature stage to recompute it")
        self._verified.add(stamp)

    def get(self, image_id: str) -> CachedImage:
        """One image's cached rows, after checking every shard against its digest.

        Raises:
            FeatureCacheError: naming the file, when the image is not cached or a file is unreadable or corrupt.
        """
        key = self._key(image_id)
        info_path = self.root / f"{key}.info.npz"
        if not info_path.is_file():
            raise FeatureCacheError(f"feature cache {self.root} has no features for image '{image_id}'; "
                                    "rerun the feature stage (it resumes)")
        try:
            with np.load(info_path, allow_pickle=False) as info:
                arrays = {k: info[k] for k in _INFO_ARRAYS}
                digests = {name: str(info[f"{name}_digest"]) for name in SHARDS}
        except KeyError as exc:
            raise FeatureCacheError(f"feature shard {info_path} lacks {exc} (written by an older version, or "
                                    "corrupt); rerun the feature stage to recompute it") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise FeatureCacheError(f"feature shard {info_path} is corrupt ({exc}); rerun the feature stage to "
                                    "recompute it") from None
        loaded = {}
        for name in SHARDS:
            path = self.root / f"{key}.{name}.npy"
            self._check_shard(path, digests[name])
            try:
                loaded[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise FeatureCacheError(f"feature shard {path} is unreadable ({exc}); rerun the feature stage "
                                        "to recompute it") from None
        features, pool5 = loaded["feat"], loaded["pool5"]
        if len(features) != len(arrays["boxes"]) or len(pool5) != len(arrays["pool5_rows"]):
            raise FeatureCacheError(f"feature cache {self.root}: files of image '{image_id}' disagree in length; "
                                    f"rerun the feature stage to recompute them")
        return CachedImage(image_id, features=features, pool5=pool5, **arrays)


class CachedImages:
    """The cached images of a list of ids as a sequence (what the SVM and regression stages iterate)."""

    def __init__(self, cache: FeatureCache, image_ids: list[str]) -> None:
        self.cache = cache
        self.image_ids = list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> CachedImage:
        return self.cache.get(self.image_ids[index])
