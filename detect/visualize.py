"""Drawing detections: one colour per class, a box outline, a label tag and an optional legend.

Pillow's ImageDraw does the drawing; this module picks colours, line widths and where each
label goes. Labels are placed greedily, best score first: above the box, inside its top,
below it, inside its bottom (left- or right-aligned), then next to whichever placed tags
block those places. Every tag is clamped into the frame, so none is ever cut at an edge;
with ``labels="auto"`` a tag that finds no free place is left out rather than drawn over
another. The tag's text is black or white, whichever contrasts more with the class colour by
WCAG 2's relative luminance (https://www.w3.org/TR/WCAG21/#dfn-relative-luminance).
No library does collision-free label placement for Pillow, hence the code here.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_MODES = ("auto", "score", "class", "none")
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
Rect = tuple[int, int, int, int]     # left, top, right, bottom in pixels; right and bottom exclusive


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated colour per class, spread around the hue circle by the golden ratio."""
    hue = (0.08 + label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def relative_luminance(rgb: Sequence[int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0-255 channels): 0 for black, 1 for white."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a: Sequence[int], b: Sequence[int]) -> float:
    """WCAG 2 contrast ratio of two colours, from 1 (same) to 21 (black on white)."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color_for(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white text, whichever has the higher contrast ratio on ``background``."""
    return BLACK if contrast_ratio(background, BLACK) >= contrast_ratio(background, WHITE) else WHITE


@dataclass(frozen=True)
class LegendEntry:
    """One class of a legend: its index, name and tag colour."""

    label: int
    name: str
    color: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#%02x%02x%02x" % self.color

    @property
    def text_hex(self) -> str:
        return "#%02x%02x%02x" % text_color_for(self.color)


@dataclass(frozen=True)
class Tag:
    """A label to place next to a box (xyxy pixels).

    ``texts`` are the wordings from longest to shortest (e.g. "cat 0.93", "cat"): the first that fits
    the frame (and, when tags may be left out, a free place) is drawn. ``index`` is the detection's,
    -1 for extra tags.
    """

    box: tuple[float, float, float, float]
    texts: tuple[str, ...]
    color: tuple[int, int, int]
    index: int = -1


@dataclass(frozen=True)
class PlacedLabel:
    """A drawn tag: the detection it belongs to, its text and its rectangle (inside the frame)."""

    index: int
    text: str
    rect: Rect


@dataclass
class Drawing:
    """What :func:`render_detections` drew.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        labels: the tags drawn, in placement order (best score first).
        skipped: detection indices whose tag found no free place (``labels="auto"``).
        legend: the classes drawn, each once, in class order.
        legend_rect: the legend panel's rectangle when one was drawn onto the image.
    """

    image: np.ndarray
    labels: list[PlacedLabel] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    legend: list[LegendEntry] = field(default_factory=list)
    legend_rect: Rect | None = None


def legend_entries(labels: np.ndarray, class_names: list[str]) -> list[LegendEntry]:
    """Each class among ``labels`` once, in class order, with its colour."""
    return [LegendEntry(int(c), _name(int(c), class_names), class_color(int(c)))
            for c in np.unique(np.asarray(labels, dtype=np.int64).reshape(-1))]


def _name(label: int, class_names: list[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, font, text: str) -> tuple[int, int]:
    """Advance width and line height, so every tag of one font has the same height whatever its letters."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(np.ceil(font.getlength(text))), ascent + descent
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom


def _fit_text(draw, font, texts: list[str], max_width: int, pad: int) -> str | None:
    """The first of ``texts`` whose tag fits ``max_width``, else the last one cut with an ellipsis."""
    for text in texts:
        if _text_size(draw, font, text)[0] + 2 * pad <= max_width:
            return text
    last = texts[-1]
    for k in range(len(last) - 1, 0, -1):
        if _text_size(draw, font, last[:k] + "…")[0] + 2 * pad <= max_width:
            return last[:k] + "…"
    return None


class LabelPlacer:
    """Greedy placement of tags inside a ``width`` x ``height`` frame, avoiding the rectangles placed so far."""

    def __init__(self, width: int, height: int, obstacles: Sequence[Rect] = ()) -> None:
        self.width, self.height = width, height
        self.taken = np.array(list(obstacles), dtype=np.int64).reshape(-1, 4)

    def _clamp(self, x: float, y: float, tw: int, th: int) -> Rect:
        left = int(min(max(round(x), 0), self.width - tw))
        top = int(min(max(round(y), 0), self.height - th))
        return left, top, left + tw, top + th

    def _colliders(self, rect: Rect) -> np.ndarray:
        t = self.taken
        hit = (t[:, 0] < rect[2]) & (rect[0] < t[:, 2]) & (t[:, 1] < rect[3]) & (rect[1] < t[:, 3])
        return t[hit]

    def place(self, box: Sequence[float], tw: int, th: int, *, force: bool) -> Rect | None:
        """A free rectangle of ``tw`` x ``th`` next to ``box``; the first candidate when ``force`` and none is free."""
        x1, y1, x2, y2 = box
        base = [self._clamp(x, y, tw, th) for y in (y1 - th, y1, y2, y2 - th) for x in (x1, x2 - tw)]
        tried = set()
        for rect in base + self._shifted(base, box, tw, th):
            if rect in tried:
                continue
            tried.add(rect)
            if not len(self._colliders(rect)):
                return self._take(rect)
        return self._take(base[0]) if force else None

    def _shifted(self, base: list[Rect], box: Sequence[float], tw: int, th: int) -> list[Rect]:
        """Beside or above / below the tags that block the first candidates, while still touching the box."""
        x1, y1, x2, y2 = box
        out = []
        for rect in base[:6]:
            for c in self._colliders(rect):
                for x, y in ((c[2], rect[1]), (c[0] - tw, rect[1]), (rect[0], c[1] - th), (rect[0], c[3])):
                    cand = self._clamp(x, y, tw, th)
                    attached = cand[0] < x2 and cand[2] > x1 and cand[1] < y2 + th and cand[3] > y1 - th
                    if attached:
                        out.append(cand)
        return out

    def _take(self, rect: Rect) -> Rect:
        self.taken = np.vstack([self.taken, np.array(rect, dtype=np.int64)[None]])
        return rect


def _place_tag(placer: LabelPlacer, draw, font, tag: Tag, pad: int, *, force: bool) -> PlacedLabel | None:
    """Place the longest wording with a free place; when ``force``, the longest that fits the frame anyway."""
    fitted = _fit_text(draw, font, list(tag.texts), placer.width, pad)    # a wording no wider than the frame
    texts = [fitted] if force else [*tag.texts, *([fitted] if fitted not in tag.texts else [])]
    texts = [t for t in texts if t is not None]
    for text in texts:
        tw, th = _text_size(draw, font, text)
        if tw + 2 * pad > placer.width or th + 2 * pad > placer.height:
            continue
        rect = placer.place(tag.box, tw + 2 * pad, th + 2 * pad, force=force)
        if rect is not None:
            return PlacedLabel(tag.index, text, rect)
    return None


def _fill(draw: ImageDraw.ImageDraw, rect: Rect, color) -> None:
    draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=color)


def _legend_panel(draw, font, entries: list[LegendEntry], width: int, height: int, pad: int,
                  boxes: np.ndarray) -> tuple[Rect, list[tuple[str, tuple[int, int, int], Rect]]] | None:
    """Rows of the legend (one tag per class) in the corner covering the least box area; None when nothing fits."""
    _, row_h = _text_size(draw, font, "Ag")
    row_h += 2 * pad
    fit = max(0, height // row_h)
    if fit == 0 or not entries:
        return None
    shown = [(e.name, e.color) for e in entries]
    if len(shown) > fit:     # the last row says how many classes did not fit
        shown = shown[: fit - 1] + [(f"+{len(entries) - fit + 1} more", (128, 128, 128))]
    texts = [_fit_text(draw, font, [name], width, pad) for name, _ in shown]
    if any(t is None for t in texts):
        return None
    panel_w = max(_text_size(draw, font, t)[0] for t in texts) + 2 * pad
    panel_h = row_h * len(shown)
    corners = [(width - panel_w, 0), (0, 0), (width - panel_w, height - panel_h), (0, height - panel_h)]

    def covered(corner) -> float:
        x, y = corner
        iw = np.clip(np.minimum(boxes[:, 2], x + panel_w) - np.maximum(boxes[:, 0], x), 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], y + panel_h) - np.maximum(boxes[:, 1], y), 0, None)
        return float((iw * ih).sum())

    x, y = min(corners, key=covered)       # min keeps the first corner (top right) on ties
    rows = [(t, color, (x, y + k * row_h, x + panel_w, y + (k + 1) * row_h))
            for k, (t, (_, color)) in enumerate(zip(texts, shown))]
    return (x, y, x + panel_w, y + panel_h), rows


def render_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                      class_names: list[str], *, score_thresh: float = 0.0, label_mode: str = "auto",
                      legend: bool = False, extra_tags: Sequence[Tag] = ()) -> Drawing:
    """Draw labelled boxes on a copy of ``image`` and say where every tag went.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) xyxy in the image's pixels.
        scores: (N,) confidences; detections below ``score_thresh`` are not drawn.
        labels: (N,) 0-based indices into ``class_names``.
        label_mode: "auto" (class and score; a tag with no free place is left out), "score" (class and
            score on every box), "class" (class name on every box) or "none" (outlines only).
        legend: also draw the legend (one tag per class drawn) in the corner that hides the least.
        extra_tags: tags placed before the detections' (e.g. "missed" marks), never left out.

    Returns:
        The :class:`Drawing`; its image has the highest-scoring box and tag on top.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    line = max(1, round(min(height, width) / 200))
    font = _font(max(11, round(min(height, width) / 40)))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    shown = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= score_thresh]   # best first
    out = Drawing(np.empty(0), legend=legend_entries(labels[shown], class_names))
    for i in reversed(shown):                 # low scores first, so the best box is drawn last
        x1, y1, x2, y2 = boxes[i]
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=class_color(int(labels[i])), width=line)
    panel = _legend_panel(draw, font, out.legend, width, height, line, boxes[shown]) if legend else None
    placer = LabelPlacer(width, height, [panel[0]] if panel else [])
    tags = list(extra_tags)
    if label_mode != "none":
        for i in shown:
            name = _name(int(labels[i]), class_names)
            texts = [name] if label_mode == "class" else [f"{name} {scores[i]:.2f}", name]
            tags.append(Tag(tuple(boxes[i]), tuple(texts), class_color(int(labels[i])), i))
    drawn: list[Tag] = []
    for tag in tags:
        force = tag.index < 0 or label_mode != "auto"
        placed = _place_tag(placer, draw, font, tag, line, force=force)
        if placed is None:
            if tag.index >= 0:
                out.skipped.append(tag.index)
            continue
        out.labels.append(placed)
        drawn.append(tag)
    for placed, tag in reversed(list(zip(out.labels, drawn))):     # best tag drawn last, on top
        _fill(draw, placed.rect, tag.color)
        draw.text((placed.rect[0] + line, placed.rect[1] + line), placed.text, fill=text_color_for(tag.color),
                  font=font)
    if panel:
        out.legend_rect = panel[0]
        for text, color, rect in panel[1]:
            _fill(draw, rect, color)
            draw.text((rect[0] + line, rect[1] + line), text, fill=text_color_for(color), font=font)
    out.image = np.asarray(canvas)
    return out


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: list[str], *, score_thresh: float = 0.0, label_mode: str = "auto",
                    legend: bool = False) -> np.ndarray:
    """Draw labelled boxes on a copy of ``image``: :func:`render_detections`'s image.

    Returns:
        (H, W, 3) uint8 RGB with the detections drawn, highest score on top.
    """
    return render_detections(image, boxes, scores, labels, class_names, score_thresh=score_thresh,
                             label_mode=label_mode, legend=legend).image
