"""Reading images into uint8 RGB arrays, whatever mode the file is stored in.

Pillow does the decoding (it handles palette, CMYK, 16-bit and EXIF); this module
only normalises the result: EXIF orientation applied, then grayscale, RGBA (on
black), palette and CMYK become RGB, and 16-bit images are scaled to 8 bits.

A pixel limit guards against decompression bombs (a 76 KB PNG can declare
20000 x 20000 pixels, 1.2 GB decoded and several GB once a float tensor): the
size is read from the header, which ``Image.open`` parses without decoding, and an
image above ``max_pixels`` is refused before any pixel is decoded. The default is
Pillow's own warning threshold (~89 Mpx, a 10k x 9k photograph). Pillow's global
``MAX_IMAGE_PIXELS`` is left alone; only a caller asking for more than Pillow's hard
limit (twice that) has it lifted, for the one ``open`` call, under a lock.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detect.errors import ImageReadError

DEFAULT_MAX_PIXELS = 89_478_485   # Pillow's default Image.MAX_IMAGE_PIXELS (where it starts warning)
_PIL_LIMIT_LOCK = threading.Lock()


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) uint8 RGB (16-bit and float grey rescaled, alpha over black)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        gray = np.clip(np.round((arr - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


@contextmanager
def _pillow_allows(max_pixels: int | None) -> Iterator[None]:
    """Let ``Image.open`` accept up to ``max_pixels`` (None: any size); our own check comes right after it."""
    hard_limit = Image.MAX_IMAGE_PIXELS
    if hard_limit is None or (max_pixels is not None and max_pixels <= 2 * hard_limit):
        yield
        return
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = hard_limit


def _declared_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the header of an image Pillow refused to open as a bomb (nothing is decoded)."""
    try:
        with _pillow_allows(None), Image.open(path) as img:
            return img.size
    except Exception:        # noqa: BLE001 -- only for the message; the image is refused either way
        return None


def _check_regular_file(path: Path) -> None:
    """Missing files, broken symlinks and FIFOs/devices are errors here, never opened (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if path.is_symlink():     # dangling, or a loop (ELOOP)
            raise ImageReadError(f"{path}: broken symlink ({exc.strerror})") from None
        raise ImageReadError(f"image not found: {path}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ImageReadError(f"{path}: {kind}, not an image file")


def _too_many_pixels(path: Path, width: int, height: int, max_pixels: int) -> ImageReadError:
    return ImageReadError(f"{path}: {width}x{height} = {width * height / 1e6:.0f} Mpx is above the limit of "
                          f"{max_pixels / 1e6:.0f} Mpx (data.max_image_pixels); not decoded")


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as a ``(H, W, 3)`` uint8 RGB array.

    Args:
        path: the image file.
        max_pixels: refuse an image whose header declares more pixels than this, before decoding it.

    Raises:
        ImageReadError: naming the file, when it is missing, not a regular file, truncated, not an image,
            or above ``max_pixels``.
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # Pillow's bomb warning: the limit below is the one that counts
            with _pillow_allows(max_pixels), Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise _too_many_pixels(path, width, height, max_pixels)
                img.load()
                img = ImageOps.exif_transpose(img)
                array = pil_to_rgb(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file") from None
    except Image.DecompressionBombError as exc:       # above Pillow's hard limit, refused by Image.open
        size = _declared_size(path)
        if size is not None:
            raise _too_many_pixels(path, *size, max_pixels) from None
        raise ImageReadError(f"{path}: above the pixel limit, not decoded ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"{path}: image has no pixels")
    return np.array(array, copy=True, order="C")   # writable: augmentations work in place


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, read from the header only."""
    path = Path(path)
    _check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
