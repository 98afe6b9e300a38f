"""Every image under a directory, recursively, for inference."""

from __future__ import annotations

from pathlib import Path

from detect.data.voc import IMAGE_EXTENSIONS
from detect.errors import DatasetError


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension, case-insensitive), sorted by path.

    Raises:
        DatasetError: naming the folder when it does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return images
