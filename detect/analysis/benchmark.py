"""Occlusion-map speed: batched receptive-field crops against one whole image per square.

    python -m detect.analysis.benchmark [--config configs/faster_rcnn/tiny_synthetic.yaml] [--size 600x1000]

Times a full occlusion map (32 px square, step 16, by default) of one detection
on a random image with random weights, and the naive way (the whole image through
backbone + RoI head, one occluded copy at a time) on a sample of positions,
extrapolated to all of them. Both are measured in the same run, so the ratio holds
on any machine; the seconds are only this machine's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from detect import build_model, load_config
from detect.analysis.occlusion import DetectorBoxScorer, _positions, occlusion_map

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml")
    parser.add_argument("--size", default="600x1000", help="image HxW")
    parser.add_argument("--box", default="400,200,560,330", help="explained box x1,y1,x2,y2")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--sample", type=int, default=48, help="positions timed the naive way")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = load_config(args.config)
    model = build_model(cfg, class_names=[f"c{i}" for i in range(5)]).to(args.device).eval()
    height, width = (int(v) for v in args.size.lower().split("x"))
    image = torch.rand(3, height, width, device=args.device)
    box = [float(v) for v in args.box.split(",")]

    start = time.perf_counter()
    omap = occlusion_map(DetectorBoxScorer(model, image, box, 0), patch=args.patch, stride=args.stride)
    fast = time.perf_counter() - start

    naive = DetectorBoxScorer(model, image, box, 0, crop=False)
    naive.baseline()
    ys, xs = _positions(height, args.patch, args.stride), _positions(width, args.patch, args.stride)
    total = len(ys) * len(xs)
    picks = torch.randperm(total)[: args.sample]
    rects = torch.tensor([[int(xs[i % len(xs)]), int(ys[i // len(xs)]), int(xs[i % len(xs)]) + args.patch,
                           int(ys[i // len(xs)]) + args.patch] for i in picks.tolist()])
    start = time.perf_counter()
    for rect in rects:
        naive.score(rect[None])
    slow = (time.perf_counter() - start) / len(rects) * total

    print(f"{cfg.model.backbone.name} backbone, {height}x{width} image, {args.patch} px square, step {args.stride}: "
          f"{total} positions, {omap.evaluated} within the box's receptive field")
    print(f"batched + cropped: {fast:.2f} s; one whole image per position: {slow:.1f} s (from {len(rects)} timed); "
          f"speed-up {slow / fast:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
