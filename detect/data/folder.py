"""Every image under a directory, recursively, for inference."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from detect.data.voc import IMAGE_EXTENSIONS
from detect.errors import DatasetError


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` (named like an image) cannot be read as one, or None for a regular file (or a folder).

    Only ``stat`` is called: a FIFO is never opened, so a folder holding one cannot hang the scan.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"broken symlink ({exc.strerror})" if path.is_symlink() else f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO, not an image file" if stat.S_ISFIFO(mode) else "not a regular file (socket or device)"


def scan_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` (recursively, by extension, case-insensitive), sorted by path, and the
    image-named entries that are not readable files: ``(path, reason)`` for broken symlinks, symlink loops,
    FIFOs, sockets and devices. Hidden files and folders are left out.

    Raises:
        DatasetError: naming the folder when it does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    images, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(part.startswith(".") for part in
                                                              path.relative_to(folder).parts):
            continue
        reason = _not_a_file(path)
        if reason is not None:
            skipped.append((path, reason))
        elif path.is_file():
            images.append(path)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return images, skipped


def list_images(folder: str | Path) -> list[Path]:
    """The image files of :func:`scan_images` (entries that are not readable files are left out)."""
    return scan_images(folder)[0]
