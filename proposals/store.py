"""The proposal store: selective-search boxes computed once per dataset split, read back by image id.

Layout::

    <root>/<split>/<version>/params.json          the parameters that produced the boxes
    <root>/<split>/<version>/part-IIIII-of-NNNNN.bin   records appended by shard I of N
    <root>/<split>/<version>/proposals.bin        the parts merged into one file
    <root>/<split>/<version>/index.json           image id -> (file, offset, count, crc32)

``version`` is a hash of every parameter (and of the algorithm's version), so a changed parameter
lands in another folder instead of reusing old boxes. A ``.bin`` file is a sequence of records::

    header "<4sB3xIII": magic b"PRP1", status (0 ok, 1 failed), id length, box count, payload length
    crc32 of id + payload ("<I"), then the utf-8 id, then the payload
    (float32 (count, 4) boxes, or the utf-8 error message of a failed image)

Records are only ever appended, so a killed run leaves at worst a truncated last record, which the
length check finds; every payload is checked against its crc32 when read, so a corrupt record is
reported and recomputed, never returned. When an id has several records the last valid one wins,
which is how failed images are retried. Reads seek straight to one record through the index.
The first write of a process (compute, merge) removes the temp files that killed writers left (a
half-written merge, index or params file; :func:`detect.utils.io.remove_stale_temp_files`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from detect.errors import DetectError
from detect.utils.io import atomic_open, atomic_write_json, remove_stale_temp_files

MAGIC = b"PRP1"
HEADER = struct.Struct("<4sB3xIIII")     # magic, status, id length, box count, payload length, crc32
OK, FAILED = 0, 1
MERGED_NAME = "proposals.bin"


class ProposalStoreError(DetectError):
    """A store is missing an image, holds a corrupt record, or is being written by another process."""


def params_version(params: dict) -> str:
    """A short hash of the parameters (canonical JSON), naming the folder that holds their boxes."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def part_name(shard: int, num_shards: int) -> str:
    return f"part-{shard:05d}-of-{num_shards:05d}.bin"


@dataclass
class Entry:
    """Where an image's record lies: file name, payload offset, box count, payload length, crc, status."""

    file: str
    offset: int
    count: int
    length: int
    crc: int
    status: int
    id_bytes: bytes


def _scan(path: Path, *, verify: bool) -> tuple[dict[str, Entry], int, list[str]]:
    """Read a .bin file's record headers (and, if ``verify``, check every crc).

    Returns:
        (last valid entry per id, byte length of the valid prefix, problems found).
    """
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    size = path.stat().st_size
    end = 0
    with open(path, "rb") as handle:
        while end < size:
            header = handle.read(HEADER.size)
            if len(header) < HEADER.size:
                problems.append(f"{path}: truncated record header at byte {end}")
                break
            magic, status, id_len, count, length, crc = HEADER.unpack(header)
            record_end = end + HEADER.size + id_len + length
            if magic != MAGIC or status not in (OK, FAILED) or record_end > size or \
                    (status == OK and length != count * 16):
                problems.append(f"{path}: {'truncated' if record_end > size else 'corrupt'} record at byte {end}")
                break
            id_bytes = handle.read(id_len)
            if verify:
                payload = handle.read(length)
                if zlib.crc32(payload, zlib.crc32(id_bytes)) != crc:
                    problems.append(f"{path}: checksum mismatch in the record at byte {end}")
                    end = record_end
                    continue
            else:
                handle.seek(length, os.SEEK_CUR)
            try:
                image_id = id_bytes.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{path}: corrupt image id in the record at byte {end}")
                break
            entries[image_id] = Entry(path.name, end + HEADER.size + id_len, count, length, crc, status, id_bytes)
            end = record_end
    return entries, end, problems


class ProposalStore:
    """Proposals of one dataset split under one set of parameters.

    Args:
        root: the store directory (``proposals.store`` in the config).
        split: the split's name, e.g. ``"voc2007-test"``; any string safe as a folder name.
        params: every parameter that changes the boxes (see :func:`proposals.compute.search_params`).
    """

    def __init__(self, root: str | Path, split: str, params: dict) -> None:
        if not split or "/" in split or split.startswith("."):
            raise ProposalStoreError(f"bad split name for the proposal store: '{split}'")
        self.params = dict(params)
        self.version = params_version(self.params)
        self.directory = Path(root) / split / self.version
        self._entries: dict[str, Entry] | None = None
        self._handles: dict[str, IO[bytes]] = {}
        self._cleaned = False                 # stale temp files removed by the first prepare()

    # ------------------------------------------------------------------ index
    def _data_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        merged = [self.directory / MERGED_NAME] if (self.directory / MERGED_NAME).is_file() else []
        return merged + sorted(self.directory.glob("part-*.bin"))   # parts after merged: newer records win

    def _check_params(self) -> None:
        path = self.directory / "params.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ProposalStoreError(f"{path}: unreadable ({exc}); delete the folder to recompute") from None
            if stored.get("params") != json.loads(json.dumps(self.params, default=str)):
                raise ProposalStoreError(f"{path}: parameters differ from the requested ones under the same version "
                                         f"hash; delete {self.directory} to recompute")

    def refresh(self, *, verify: bool = False) -> list[str]:
        """Rebuild the id index from the data files (``verify`` also checks every crc). Returns problems."""
        self._check_params()
        entries: dict[str, Entry] = {}
        problems: list[str] = []
        sizes = {}
        for path in self._data_files():
            found, valid, issues = _scan(path, verify=verify)
            problems += issues
            sizes[path.name] = valid
            for image_id, entry in found.items():
                if entry.status == OK or image_id not in entries or entries[image_id].status != OK:
                    entries[image_id] = entry                 # a failure never hides boxes found earlier
        self._entries = entries
        if self.directory.is_dir() and not problems:
            self._write_index(sizes)
        return problems

    def _write_index(self, sizes: dict[str, int]) -> None:
        table = {i: [e.file, e.offset, e.count, e.length, e.crc, e.status] for i, e in (self._entries or {}).items()}
        try:
            atomic_write_json(self.directory / "index.json", {"files": sizes, "entries": table}, indent=None)
        except OSError:
            pass                          # a read-only store still works, it is only rescanned on open

    def _load_index(self) -> dict[str, Entry]:
        if self._entries is not None:
            return self._entries
        path = self.directory / "index.json"
        files = {p.name: p.stat().st_size for p in self._data_files()}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if index["files"] != files:
                raise ValueError("stale")
            self._check_params()
            self._entries = {i: Entry(f, o, c, n, crc, s, i.encode("utf-8"))
                             for i, (f, o, c, n, crc, s) in index["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            self.refresh()          # no index yet, stale (a run appended since) or unreadable
        return self._entries

    # ------------------------------------------------------------------ reading
    def __contains__(self, image_id: str) -> bool:
        entry = self._load_index().get(image_id)
        return entry is not None and entry.status == OK

    def __len__(self) -> int:
        return sum(e.status == OK for e in self._load_index().values())

    def ids(self) -> list[str]:
        """Ids with boxes."""
        return [i for i, e in self._load_index().items() if e.status == OK]

    def failed(self) -> dict[str, str]:
        """Ids whose last attempt failed, with the error message."""
        return {i: self._read(e).decode("utf-8", "replace") for i, e in self._load_index().items() if e.status == FAILED}

    def _read(self, entry: Entry) -> bytes:
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(self.directory / entry.file, "rb")
        handle.seek(entry.offset)
        payload = handle.read(entry.length)
        if len(payload) != entry.length or zlib.crc32(payload, zlib.crc32(entry.id_bytes)) != entry.crc:
            raise ProposalStoreError(f"{self.directory / entry.file}: record of image '{entry.id_bytes.decode()}' is "
                                     f"truncated or corrupt (checksum mismatch); rerun compute to recompute it")
        return payload

    def get(self, image_id: str) -> np.ndarray:
        """The boxes of one image: (N, 4) float32 xyxy, best first.

        Raises:
            ProposalStoreError: the image has no boxes in this store (never computed, or failed), or its
                record is corrupt.
        """
        entry = self._load_index().get(image_id)
        if entry is None or entry.status != OK:
            why = "its computation failed" if entry is not None else "it was never computed"
            raise ProposalStoreError(f"no proposals for image '{image_id}' in {self.directory} ({why}); run "
                                     f"'detect-proposals compute' for this split with the same parameters")
        return np.frombuffer(self._read(entry), dtype="<f4").reshape(entry.count, 4).copy()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    # ------------------------------------------------------------------ writing
    def prepare(self) -> list[str]:
        """Create the folder, write params.json and verify every record's length and crc.

        Returns:
            Problems found. Bad records are left out of the index, so their images count as not done and
            are recomputed; a part's truncated tail is cut off when its writer next opens it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._cleaned:
            remove_stale_temp_files(self.directory)   # those of killed writers; live writers' are kept
            self._cleaned = True
        self._check_params()
        if not (self.directory / "params.json").is_file():
            atomic_write_json(self.directory / "params.json", {"version": self.version, "params": self.params})
        return self.refresh(verify=True)

    def done(self) -> set[str]:
        """Ids that already have boxes (verified by :meth:`prepare`)."""
        return set(self.ids())

    def writer(self, shard: int = 0, num_shards: int = 1) -> "ShardWriter":
        return ShardWriter(self.directory / part_name(shard, num_shards))

    def merge(self) -> Path:
        """Rewrite all parts as one ``proposals.bin`` (newest valid record per id) and delete the parts."""
        self.prepare()
        parts = sorted(self.directory.glob("part-*.bin"))
        locks = []
        try:
            for part in parts:
                locks.append(_lock(part))
            target = self.directory / MERGED_NAME
            with atomic_open(target, "wb", encoding=None) as out:
                for image_id, entry in sorted(self._entries.items()):
                    payload = self._read(entry)
                    out.write(HEADER.pack(MAGIC, entry.status, len(entry.id_bytes), entry.count, len(payload),
                                          entry.crc) + entry.id_bytes + payload)
            self.close()
            for part in parts:
                part.unlink()
        finally:
            for handle in locks:
                handle.close()
        self._entries = None
        issues = self.refresh(verify=True)
        if issues:
            raise ProposalStoreError(f"{target}: the merged file failed its own check: {issues[0]}")
        return target


def _lock(path: Path) -> IO[bytes]:
    handle = open(path, "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ProposalStoreError(f"{path} is being written by another process (same shard running twice?)") from None
    return handle


class ShardWriter:
    """Appends records to one part file; holds an exclusive lock on it while open."""

    def __init__(self, path: Path, *, sync_every: int = 50) -> None:
        self.path = Path(path)
        self.sync_every = sync_every
        self._handle: IO[bytes] | None = None
        self._pending = 0

    def __enter__(self) -> "ShardWriter":
        self._handle = _lock(self.path)
        _, valid, _ = _scan(self.path, verify=False)
        if valid < self.path.stat().st_size:
            self._handle.truncate(valid)      # a killed run's half record; appending after it would hide the rest
        return self

    def __exit__(self, exc_type, *exc) -> None:
        handle = self._handle
        try:
            if exc_type is None:
                self.sync()
        finally:
            self._handle = None
            try:
                handle.close()                # also releases the lock
            except OSError as error:          # unflushed bytes of a failed write: the first error is the one
                if exc_type is None:
                    raise OSError(error.errno, error.strerror, str(self.path)) from error

    def _append(self, image_id: str, status: int, count: int, payload: bytes) -> None:
        id_bytes = image_id.encode("utf-8")
        crc = zlib.crc32(payload, zlib.crc32(id_bytes))
        try:
            self._handle.write(HEADER.pack(MAGIC, status, len(id_bytes), count, len(payload), crc) + id_bytes + payload)
            self._handle.flush()              # whole records reach the OS, so a killed process loses at most one
        except OSError as exc:                # a full disk names no file; the next run truncates the half record
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._pending += 1
        if self._pending >= self.sync_every:
            self.sync()

    def add(self, image_id: str, boxes: np.ndarray) -> None:
        boxes = np.ascontiguousarray(boxes, dtype="<f4").reshape(-1, 4)
        self._append(image_id, OK, len(boxes), boxes.tobytes())

    def fail(self, image_id: str, message: str) -> None:
        self._append(image_id, FAILED, 0, message.encode("utf-8"))

    def sync(self) -> None:
        if self._handle is not None and self._pending:
            try:
                os.fsync(self._handle.fileno())
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            self._pending = 0


def iter_records(path: str | Path) -> Iterator[tuple[str, int, bytes]]:
    """Every valid record of one .bin file as ``(image_id, status, payload)`` (for inspection and tests)."""
    path = Path(path)
    entries, _, _ = _scan(path, verify=True)
    with open(path, "rb") as handle:
        for image_id, entry in entries.items():
            handle.seek(entry.offset)
            yield image_id, entry.status, handle.read(entry.length)
