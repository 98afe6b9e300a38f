"""A deterministic synthetic PASCAL-VOC-format dataset of coloured shapes.

It is the toolkit's built-in dataset and the test fixture: small enough that a
tiny Faster R-CNN learns it on a CPU in minutes, hard enough that the model has
to learn *shape* (colour and texture vary freely within a class), scale (about
12 px up to most of the image), aspect ratio, occlusion and truncation, and to
ignore a cluttered background of gradients, noise, lines and soft blobs that
are not objects.

Boxes are exact: each object is a boolean mask drawn without anti-aliasing,
and its box is the tight box of the mask pixels still visible in the image
(after occlusion by later objects and clipping at the borders). Objects that
are very small, low-contrast or mostly hidden are flagged ``difficult``.

Written by hand because no maintained library generates detection datasets
with exact masks; point-in-polygon comes from scikit-image, lines from OpenCV,
box IoU from torchvision. Image ``i`` draws from ``default_rng([seed, i])``, so
images do not depend on each other and the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.measure import points_in_poly
from torchvision.ops import box_iou

from detect.data.records import ImageRecord
from detect.data.voc import write_annotation, write_split
from detect.errors import DatasetError
from detect.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SYNTHETIC_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker", "noise")
# "cluttered": every texture, distractor lines and blobs (the default, and the test fixture);
# "plain": flat or noisy fills and a background without lines or blobs (the CPU demo's budget).
STYLES: tuple[str, ...] = ("cluttered", "plain")
GENERATOR_VERSION = 1

_PARAMS_FILE = "synthetic.json"
_INCOMPLETE_FILE = ".synthetic-incomplete.json"
_ID_PATTERN = re.compile(r"^\d{6}$")

# Minimum 10th-percentile RGB distance between an object's pixels and what lies beneath them.
_CONTRAST = 70.0
_SMALL_SIDE = 16          # visible box longer side below this: "difficult" (too small to recognise)
_MIN_VISIBLE = 0.5        # visible fraction of the whole shape below this: "difficult" (occluded/truncated)


@dataclass
class SyntheticImage:
    """One rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB, the scene.
        background: (H, W, 3) uint8 RGB, the scene before any object was drawn.
        masks: (N, H, W) bool, the visible pixels of each object.
        boxes: (N, 4) float32 xyxy, the tight box of each mask.
        labels: (N,) int64 indices into :data:`SYNTHETIC_CLASSES`.
        difficult, truncated: (N,) bool.
    """

    image: np.ndarray
    background: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray


def _unit_star(inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def shape_mask(kind: str, half_w: float, half_h: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one shape, cropped to its tight box.

    The shape spans ``(-half_w, half_w) x (-half_h, half_h)`` in its own frame,
    is rotated by ``angle`` (radians) and sampled at pixel centres with a random
    sub-pixel offset, so equal parameters still give slightly different masks.
    """
    radius = int(np.ceil(np.hypot(half_w, half_h))) + 2
    offset = rng.uniform(0.0, 1.0, size=2)
    grid = np.arange(-radius, radius) + 0.5
    x, y = np.meshgrid(grid - offset[0], grid - offset[1])
    cos, sin = np.cos(angle), np.sin(angle)
    u = (x * cos + y * sin) / half_w        # normalised shape frame: the shape fits in [-1, 1]^2
    v = (-x * sin + y * cos) / half_h
    if kind == "circle":
        mask = u**2 + v**2 <= 1.0
    elif kind == "ring":
        hole = rng.uniform(0.45, 0.62)
        r2 = u**2 + v**2
        mask = (r2 <= 1.0) & (r2 > hole**2)
    elif kind == "square":
        mask = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif kind in ("triangle", "star"):
        polygon = (np.array([[0.0, -1.0], [1.0, 0.9], [-1.0, 0.9]]) if kind == "triangle"
                   else _unit_star(rng.uniform(0.42, 0.55)))
        points = np.stack([u.ravel(), v.ravel()], axis=1)
        mask = points_in_poly(points, polygon).reshape(u.shape)
    else:
        raise ValueError(f"unknown synthetic shape '{kind}'")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return np.ones((1, 1), bool)
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng: np.random.Generator, height: int, width: int, clutter: bool = True) -> np.ndarray:
    """Gradient + low-frequency and pixel noise (+ distractor lines and soft blobs when ``clutter``), float RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(theta) + y * np.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    start, end = rng.uniform(0, 255, size=(2, 3))
    canvas = start + t[..., None] * (end - start)
    coarse = rng.normal(0.0, rng.uniform(5, 25), size=(5, 5, 3)).astype(np.float32)
    canvas += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas += rng.normal(0.0, rng.uniform(2, 10), size=(height, width, 1))
    if not clutter:
        return np.clip(canvas, 0, 255)
    for _ in range(rng.integers(0, 4)):       # soft blobs: no crisp edge, so never mistaken for a circle
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sx, sy = rng.uniform(8, width / 3), rng.uniform(8, height / 3)
        alpha = rng.uniform(0.3, 0.6) * np.exp(-((x - cx) ** 2 / (2 * sx**2) + (y - cy) ** 2 / (2 * sy**2)))
        canvas += alpha[..., None] * (rng.uniform(0, 255, size=3) - canvas)
    canvas = np.clip(canvas, 0, 255)
    for _ in range(rng.integers(0, 7)):       # thin straight and broken lines
        points = rng.uniform([-0.2 * width, -0.2 * height], [1.2 * width, 1.2 * height], size=(rng.integers(2, 5), 2))
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, colour, int(rng.integers(1, 4)))
    return canvas


def _texture(rng: np.random.Generator, kind: str, height: int, width: int) -> tuple[np.ndarray | None, float]:
    """A binary pattern for two-colour textures (or None) and the pixel-noise strength."""
    y, x = np.mgrid[0:height, 0:width]
    if kind == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        return ((x * np.cos(theta) + y * np.sin(theta)) / period) % 1.0 < 0.5, 0.0
    if kind == "checker":
        cell = int(rng.integers(3, 10))
        return (x // cell + y // cell) % 2 == 1, 0.0
    return None, (rng.uniform(10, 20) if kind == "noise" else 0.0)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, *, low_contrast: bool,
           textures: tuple[str, ...] = TEXTURES) -> tuple[np.ndarray, bool]:
    """Pixel values (M, 3) for the masked pixels of an object; also whether it came out low-contrast."""
    under = canvas[mask]
    if low_contrast:   # deliberately faint: a flat colour just off the local background
        direction = rng.normal(size=3)
        colour = under.mean(axis=0) + direction / np.linalg.norm(direction) * rng.uniform(18, 30)
        return np.clip(np.broadcast_to(colour, under.shape), 0, 255), True
    height, width = canvas.shape[:2]
    pattern, noise_sigma = _texture(rng, textures[rng.integers(len(textures))], height, width)
    pattern = pattern[mask] if pattern is not None else None
    noise = rng.normal(0.0, noise_sigma, size=(len(under), 1)) if noise_sigma else 0.0
    best, best_score = None, -1.0
    for _ in range(40):
        first, second = rng.uniform(0, 255, size=(2, 3))
        if pattern is not None and np.linalg.norm(first - second) < 60:
            continue
        pixels = np.where(pattern[:, None], second, first) if pattern is not None else np.broadcast_to(first, under.shape)
        pixels = np.clip(pixels + noise, 0, 255)
        score = float(np.percentile(np.linalg.norm(pixels - under, axis=1), 10))
        if score > best_score:
            best, best_score = pixels, score
        if score >= _CONTRAST:
            break
    return best, best_score < _CONTRAST / 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(torch.from_numpy(a[None]), torch.from_numpy(b[None]))[0, 0])


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def render_image(rng: np.random.Generator, width: int, height: int, num_objects: int,
                 style: str = "cluttered") -> SyntheticImage:
    """Draw a background and up to ``num_objects`` shapes on it (``style``: see :data:`STYLES`).

    Objects are placed one by one, later ones on top; a placement is rejected
    when it would hide more than 70% of an earlier object or make two boxes
    overlap with IoU > 0.5, so every annotated object stays findable. Most
    images keep objects apart; about a third allow overlaps.
    """
    plain = style == "plain"
    canvas = _background(rng, height, width, clutter=not plain)
    background = np.round(canvas).astype(np.uint8)
    allow_overlap = rng.uniform() < 0.35
    full_masks: list[np.ndarray] = []
    totals, labels, truncated, forced_difficult = [], [], [], []
    for _ in range(num_objects):
        for _attempt in range(30):
            label = int(rng.integers(len(SYNTHETIC_CLASSES)))
            if rng.uniform() < 0.12:      # the ~12 px objects: present, but a minority
                longest = rng.uniform(12, 22)
            else:                         # log-uniform, so every octave of scale is equally common
                longest = float(np.exp(rng.uniform(np.log(26), np.log(0.85 * min(width, height)))))
            aspect = float(np.exp(rng.uniform(np.log(0.65), np.log(1.55))))
            half_w, half_h = (longest / 2, longest / 2 / aspect) if aspect >= 1 else (longest / 2 * aspect, longest / 2)
            kind = SYNTHETIC_CLASSES[label]
            angle = rng.uniform(-0.35, 0.35) if kind == "square" else rng.uniform(0, 2 * np.pi)
            local = shape_mask(kind, half_w, half_h, angle, rng)
            mh, mw = local.shape
            if rng.uniform() < 0.15:      # let it cross a border
                ox, oy = int(rng.integers(-mw // 2, width - mw // 2)), int(rng.integers(-mh // 2, height - mh // 2))
            else:
                ox, oy = int(rng.integers(0, max(width - mw, 0) + 1)), int(rng.integers(0, max(height - mh, 0) + 1))
            full = np.zeros((height, width), bool)
            x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + mw, width), min(oy + mh, height)
            if x1 <= x0 or y1 <= y0:
                continue
            full[y0:y1, x0:x1] = local[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            total = int(local.sum())
            if full.sum() < 0.35 * total:
                continue
            if _placement_ok(full, full_masks, totals, allow_overlap):
                break
        else:
            continue
        pixels, faint = _paint(rng, canvas, full, low_contrast=rng.uniform() < 0.05,
                               textures=("flat", "noise") if plain else TEXTURES)
        canvas[full] = pixels
        full_masks.append(full)
        totals.append(total)
        labels.append(label)
        truncated.append(ox < 0 or oy < 0 or ox + mw > width or oy + mh > height)
        forced_difficult.append(faint)
    masks = _visible_masks(full_masks, height, width)
    boxes = np.array([_tight_box(m) for m in masks], np.float32).reshape(-1, 4)
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    visible = masks.sum(axis=(1, 2)) / np.maximum(np.array(totals, np.float64), 1)
    difficult = (np.array(forced_difficult, bool) | (np.maximum(box_w, box_h) < _SMALL_SIDE)
                 | (np.minimum(box_w, box_h) < 6) | (visible < _MIN_VISIBLE))
    return SyntheticImage(image=np.round(canvas).astype(np.uint8), background=background, masks=masks, boxes=boxes,
                          labels=np.array(labels, np.int64), difficult=difficult.reshape(-1),
                          truncated=np.array(truncated, bool))


def synthetic_scene(seed: int, index: int, *, min_side: int = 192, max_side: int = 320, max_objects: int = 6,
                    empty: bool = False, style: str = "cluttered") -> SyntheticImage:
    """Image ``index`` of the dataset made with ``seed``: its size, object count and scene."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    count = 0 if empty else int(rng.integers(1, max_objects + 1))
    return render_image(rng, width, height, count, style)


def _visible_masks(full_masks: list[np.ndarray], height: int, width: int) -> np.ndarray:
    masks = np.zeros((len(full_masks), height, width), bool)
    above = np.zeros((height, width), bool)
    for i in range(len(full_masks) - 1, -1, -1):
        masks[i] = full_masks[i] & ~above
        above |= full_masks[i]
    return masks


def _placement_ok(new: np.ndarray, earlier: list[np.ndarray], totals: list[int], allow_overlap: bool) -> bool:
    if not earlier:
        return True
    visible = _visible_masks(earlier, *new.shape)
    new_box = _tight_box(new)
    for mask, total in zip(visible, totals):
        overlap = bool((mask & new).any())
        if overlap and not allow_overlap:
            return False
        if overlap:
            left = mask & ~new
            if left.sum() < max(0.3 * total, 20) or _iou(_tight_box(left), new_box) > 0.5:
                return False
    return True


def _params(num_images: int, seed: int, min_side: int, max_side: int, max_objects: int,
            empty_fraction: float, jpeg_quality: int, style: str) -> dict:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 3:
        raise DatasetError(f"synthetic dataset: num_images must be an integer >= 3 (one per split), got {num_images!r}")
    if not 64 <= min_side <= max_side:
        raise DatasetError(f"synthetic dataset: need 64 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if max_objects < 1 or not 0.0 <= empty_fraction < 1.0 or not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"synthetic dataset: need max_objects >= 1, 0 <= empty_fraction < 1, 1 <= jpeg_quality <= 100; "
                           f"got {max_objects}, {empty_fraction}, {jpeg_quality}")
    if style not in STYLES:
        raise DatasetError(f"synthetic dataset: style must be one of {', '.join(STYLES)}, got {style!r}")
    extra = {} if style == "cluttered" else {"style": style}   # datasets written before styles existed stay valid
    return {**extra, "generator": "detect.data.synthetic", "version": GENERATOR_VERSION, "num_images": int(num_images),
            "seed": int(seed), "min_side": int(min_side), "max_side": int(max_side), "max_objects": int(max_objects),
            "empty_fraction": float(empty_fraction), "jpeg_quality": int(jpeg_quality),
            "classes": list(SYNTHETIC_CLASSES)}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _complete(out: Path, params: dict) -> bool:
    """Whether ``out`` holds a finished dataset with these parameters (all listed files present)."""
    if _read_json(out / _PARAMS_FILE) != params:
        return False
    ids = [f"{i:06d}" for i in range(params["num_images"])]
    return all((out / "JPEGImages" / f"{i}.jpg").is_file() and (out / "Annotations" / f"{i}.xml").is_file() for i in ids)


def _clear(out: Path) -> None:
    """Remove what a previous generation wrote (only files it names), so no stale image survives."""
    for name in (_PARAMS_FILE, "classes.txt", "README.txt"):
        (out / name).unlink(missing_ok=True)
    for folder, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        for path in (out / folder).glob(f"*{ext}"):
            if _ID_PATTERN.match(path.stem):
                path.unlink()
    for split in ("train", "val", "trainval", "test"):
        (out / "ImageSets" / "Main" / f"{split}.txt").unlink(missing_ok=True)


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()


def generate_synthetic(out_dir: str | Path, num_images: int = 200, seed: int = 0, *, min_side: int = 192,
                       max_side: int = 320, max_objects: int = 6, empty_fraction: float = 0.08,
                       jpeg_quality: int = 92, style: str = "cluttered", workers: int = 1,
                       overwrite: bool = False) -> Path:
    """Write (or reuse) a synthetic VOC-format dataset and return its root.

    Layout: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``,
    ``ImageSets/Main/{train,val,trainval,test}.txt`` (60/20/20 by a seeded
    shuffle), ``classes.txt``, ``README.txt`` and, written last, ``synthetic.json``
    holding the parameters. A directory that already holds a complete dataset
    with the same parameters is returned untouched.

    Args:
        out_dir: dataset root; created when missing.
        num_images: images in total (>= 3).
        seed: the same seed gives byte-identical files.
        min_side, max_side: each image side is drawn uniformly from this range.
        max_objects: most objects per image.
        empty_fraction: share of images with no object at all.
        jpeg_quality: JPEG quality of the written images.
        style: "cluttered" (every texture, distractor lines and blobs) or "plain" (flat or
            noisy fills on a smooth background); see :data:`STYLES`.
        workers: processes drawing images (each image has its own RNG, so the files do
            not depend on it).
        overwrite: replace a dataset made with other parameters (or a non-empty
            directory that is not a synthetic dataset).

    Raises:
        DatasetError: bad parameters, or ``out_dir`` holds something else and
            ``overwrite`` is false.
    """
    out = Path(out_dir)
    params = _params(num_images, seed, min_side, max_side, max_objects, empty_fraction, jpeg_quality, style)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"synthetic dataset: {out} exists and is not a directory")
    if _complete(out, params):
        return out
    ours = (out / _PARAMS_FILE).is_file() or (out / _INCOMPLETE_FILE).is_file()
    if not overwrite and out.is_dir() and any(out.iterdir()):
        previous = _read_json(out / _PARAMS_FILE)
        if previous is not None and previous != params:
            changed = sorted(k for k in params if previous.get(k) != params[k])
            raise DatasetError(f"{out} holds a synthetic dataset made with other parameters (differs in: "
                               f"{', '.join(changed)}); pass overwrite=True (--overwrite) or choose another directory")
        if not ours:
            raise DatasetError(f"{out} is not empty and is not a synthetic dataset; refusing to write into it "
                               f"(pass overwrite=True (--overwrite) or choose another directory)")
    if ours or overwrite:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / _INCOMPLETE_FILE, params)

    ids = [f"{i:06d}" for i in range(num_images)]
    split_rng = np.random.default_rng([seed, num_images, 0x5EED])
    empty = set(split_rng.permutation(num_images)[:int(round(empty_fraction * num_images))].tolist())
    jobs = [(out, params, i, i in empty) for i in range(num_images)]
    if workers > 1 and num_images > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_image(job)

    order = [ids[i] for i in split_rng.permutation(num_images)]
    n_val = n_test = max(1, int(round(0.2 * num_images)))
    splits = {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test]}
    splits["trainval"] = splits["train"] + splits["val"]
    for split, split_ids in splits.items():
        write_split(out, split, sorted(split_ids))
    atomic_write_text(out / "classes.txt", "".join(f"{name}\n" for name in SYNTHETIC_CLASSES))
    atomic_write_text(out / "README.txt", _readme(params, {k: len(v) for k, v in splits.items()}))
    atomic_write_json(out / _PARAMS_FILE, params)
    (out / _INCOMPLETE_FILE).unlink()
    return out


def _write_image(job: tuple) -> None:
    """Draw image ``index`` and write its JPEG and annotation (a top-level function, so workers can run it)."""
    out, params, index, empty = job
    scene = synthetic_scene(params["seed"], index, min_side=params["min_side"], max_side=params["max_side"],
                            max_objects=params["max_objects"], empty=empty, style=params.get("style", "cluttered"))
    image_id = f"{index:06d}"
    image_path = out / "JPEGImages" / f"{image_id}.jpg"
    atomic_write_bytes(image_path, _encode_jpeg(scene.image, params["jpeg_quality"]))
    height, width = scene.image.shape[:2]
    record = ImageRecord(image_id, image_path, width, height, scene.boxes, scene.labels,
                         scene.difficult, scene.truncated)
    write_annotation(out / "Annotations" / f"{image_id}.xml", record, list(SYNTHETIC_CLASSES))


def _readme(params: dict, counts: dict[str, int]) -> str:
    return (
        "Synthetic shapes dataset (PASCAL VOC layout), written by detect.data.synthetic.generate_synthetic.\n\n"
        f"classes: {', '.join(SYNTHETIC_CLASSES)} (shape identifies the class; colour and texture are random)\n"
        f"images: {params['num_images']}, seed {params['seed']}, sides {params['min_side']}..{params['max_side']} px, "
        f"up to {params['max_objects']} objects, {params['empty_fraction']:.0%} empty, "
        f"style {params.get('style', 'cluttered')}\n"
        f"splits: {', '.join(f'{k} {v}' for k, v in counts.items())}\n\n"
        "Boxes are the tight boxes of each object's visible pixels, clipped at the image border.\n"
        "truncated=1: the shape crosses the border. difficult=1: longer side under 16 px, under half\n"
        "of the shape visible, or drawn with deliberately low contrast.\n"
        "Regenerate with: python tools/make_synthetic.py --out DIR --images N --seed S\n"
    )
