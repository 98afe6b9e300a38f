"""``detect-suggest-anchors``: anchor sizes and ratios from a dataset's boxes after the model's resize.

Anchors that do not cover a dataset's objects leave them without positive
anchors at IoU 0.7 (Faster R-CNN Sec. 3.1.2): small-object datasets suffer
most. This tool resizes every box as the model would (shorter side
``min_size``, longer at most ``max_size``), clusters log sizes and log aspect
ratios with k-means (scikit-learn), and reports how many boxes the configured
and the suggested anchors cover.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.cluster import KMeans

from detect.cli.common import add_runtime_args, apply_runtime
from detect.config import load_config
from detect.data.voc import VOCDataset
from detect.errors import DetectError


def resized_box_shapes(records, min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights of all boxes after resizing their images like the model's input pipeline."""
    widths, heights = [], []
    for r in records:
        if not len(r.boxes) or r.width <= 0 or r.height <= 0:
            continue
        scale = min(min_size / min(r.width, r.height), max_size / max(r.width, r.height))
        widths.append((r.boxes[:, 2] - r.boxes[:, 0]) * scale)
        heights.append((r.boxes[:, 3] - r.boxes[:, 1]) * scale)
    if not widths:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(widths).astype(np.float64), np.concatenate(heights).astype(np.float64)


def anchor_coverage(widths: np.ndarray, heights: np.ndarray, sizes, ratios) -> np.ndarray:
    """Best IoU of each box with an anchor shape of the same centre, (N,).

    Centred IoU is the best an anchor of that shape can reach; the grid stride only lowers it.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    ratios = np.asarray(ratios, dtype=np.float64)
    aw = (sizes[None, :] / np.sqrt(ratios)[:, None]).ravel()
    ah = (sizes[None, :] * np.sqrt(ratios)[:, None]).ravel()
    inter = np.minimum(widths[:, None], aw[None]) * np.minimum(heights[:, None], ah[None])
    union = (widths * heights)[:, None] + (aw * ah)[None] - inter
    return (inter / union).max(axis=1)


def suggest_anchors(widths: np.ndarray, heights: np.ndarray, num_sizes: int = 3, num_ratios: int = 3,
                    seed: int = 0) -> tuple[list[float], list[float]]:
    """Cluster log sqrt(area) into ``num_sizes`` sizes and log(h / w) into ``num_ratios`` ratios."""
    if len(widths) < max(num_sizes, num_ratios):
        raise DetectError(f"only {len(widths)} boxes: too few to suggest {num_sizes} sizes and {num_ratios} ratios")

    def centres(values: np.ndarray, k: int) -> np.ndarray:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(values.reshape(-1, 1))
        return np.sort(np.exp(km.cluster_centers_.ravel()))

    sizes = centres(0.5 * np.log(widths * heights), num_sizes)
    ratios = centres(np.log(heights / widths), num_ratios)
    return [round(float(s), 1) for s in sizes], [round(float(r), 2) for r in ratios]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-suggest-anchors", description=__doc__.splitlines()[0])
    parser.add_argument("--voc", required=True, metavar="ROOT", help="PASCAL VOC-format dataset root")
    parser.add_argument("--split", default="trainval", help="split to read (default: trainval)")
    parser.add_argument("--config", default=None, help="config whose input sizes and anchors to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.input.min_size=[800] (repeatable)")
    parser.add_argument("--sizes", type=int, default=3, help="number of anchor sizes to suggest (default: 3)")
    parser.add_argument("--ratios", type=int, default=3, help="number of aspect ratios to suggest (default: 3)")
    add_runtime_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    apply_runtime(args)
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        data = VOCDataset(args.voc, args.split, classes="auto")
        min_size, max_size = cfg.model.input.min_size[0], cfg.model.input.max_size
        w, h = resized_box_shapes(data.records, min_size, max_size)
        sizes, ratios = suggest_anchors(w, h, args.sizes, args.ratios)
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    side = np.sqrt(w * h)
    print(f"{len(w)} boxes in {args.voc} ({args.split}) after resizing to shorter side {min_size}, longer <= {max_size}")
    print("box size sqrt(w*h) percentiles 5/25/50/75/95: "
          + " / ".join(f"{v:.0f}" for v in np.percentile(side, [5, 25, 50, 75, 95])))
    print("aspect ratio h/w percentiles 5/50/95: " + " / ".join(f"{v:.2f}" for v in np.percentile(h / w, [5, 50, 95])))
    for name, (s, r) in {"configured": (cfg.model.anchors.sizes, cfg.model.anchors.ratios),
                         "suggested": (sizes, ratios)}.items():
        best = anchor_coverage(w, h, s, r)
        print(f"{name:>10}: sizes {list(s)} ratios {list(r)}: boxes with a centred anchor at IoU >= 0.7: "
              f"{(best >= 0.7).mean():.1%}, >= 0.5: {(best >= 0.5).mean():.1%}")
    print("\nmodel:\n  anchors:\n"
          f"    sizes: [{', '.join(f'{s:g}' for s in sizes)}]\n    ratios: [{', '.join(f'{r:g}' for r in ratios)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
