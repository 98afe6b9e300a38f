"""Reading images into uint8 RGB arrays, whatever mode the file is stored in.

Pillow does the decoding (it handles palette, CMYK, 16-bit and EXIF); this module
only normalises the result: EXIF orientation applied, then grayscale, RGBA (on
black), palette and CMYK become RGB, and 16-bit images are scaled to 8 bits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detect.errors import ImageReadError

Image.MAX_IMAGE_PIXELS = 1_000_000_000   # PIL's default warns at 89 MP; above 2x this it refuses (reported below)


def _to_rgb(img: Image.Image) -> np.ndarray:
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


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as a ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ImageReadError: naming the file, when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                array = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"{path}: image has no pixels")
    return np.array(array, copy=True, order="C")   # writable: augmentations work in place


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, read from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
