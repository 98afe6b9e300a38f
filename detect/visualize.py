"""Drawing detections: one colour per class, a box outline and a "name score" label.

Pillow's ImageDraw does the drawing; this module only picks colours, line widths and
where the label goes (above the box, or inside it when the box touches the top edge).
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated colour per class, spread around the hue circle by the golden ratio."""
    hue = (0.08 + label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: list[str], *, score_thresh: float = 0.0) -> np.ndarray:
    """Draw labelled boxes on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) xyxy in the image's pixels.
        scores: (N,) confidences; detections below ``score_thresh`` are not drawn.
        labels: (N,) 0-based indices into ``class_names``.

    Returns:
        (H, W, 3) uint8 RGB with the detections drawn, highest score on top.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    line = max(1, round(min(height, width) / 200))
    font = _font(max(10, round(min(height, width) / 40)))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    for i in np.argsort(scores, kind="stable"):   # low scores first, so the best box is drawn last
        if scores[i] < score_thresh:
            continue
        x1, y1, x2, y2 = boxes[i]
        color = class_color(int(labels[i]))
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=color, width=line)
        name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else str(int(labels[i]))
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        ty = y1 - th if y1 - th >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw, ty + th], fill=color)
        draw.text((x1 + line - left, ty + line - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
