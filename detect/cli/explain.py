"""``tools/explain.py``: what one detection looks at, or what one trunk unit responds to, in one image.

    tools/explain.py --checkpoint C --image I [--detection k]          # occlusion map of the k-th detection
    tools/explain.py --checkpoint C --image I --box 10,20,120,200 --label dog
    tools/explain.py --checkpoint C --image I --layer conv5 [--channel c]   # deconvnet projections

The occlusion map (Zeiler & Fergus 2013, Sec. 4.2) slides a grey square over the
image and records the class probability of the fixed detection box, scored by the
backbone and RoI head only. The deconvnet (Sec. 2.1) projects the 9 strongest
peaks of a channel in this image back to pixels (default channel: the one with
the strongest activation). Figures go to ``--out`` (PNG) with a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import DetectError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a training output folder")
    parser.add_argument("--image", required=True, type=Path, help="image file")
    parser.add_argument("--out", type=Path, default=Path("explain"), help="output folder (default: ./explain)")
    parser.add_argument("--detection", type=int, default=0, help="which detection, by rank (0: the best)")
    parser.add_argument("--box", type=_floats, default=None, metavar="X1,Y1,X2,Y2",
                        help="explain this box instead of a detection (image pixels; needs --label)")
    parser.add_argument("--label", default=None, help="class name for --box")
    parser.add_argument("--patch", type=int, default=32, help="occluder side in image pixels")
    parser.add_argument("--stride", type=int, default=16, help="occluder step in image pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="occluded images per forward pass")
    parser.add_argument("--layer", default=None, help="trunk layer for the deconvnet, e.g. conv5 (switches mode)")
    parser.add_argument("--channel", type=int, default=None, help="channel of --layer (default: strongest)")
    parser.add_argument("--top", type=int, default=9, help="peaks projected by the deconvnet")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the stored config")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_runtime_args(parser)
    return parser.parse_args(argv)


def occlusion(args, model, image, rgb) -> dict:
    """Occlusion map of one detection (or of ``--box``); returns the summary written to JSON."""
    from detect.analysis.occlusion import DetectorBoxScorer, occlusion_map, plot_occlusion

    names = model.class_names
    if args.box is not None:
        if len(args.box) != 4 or not (args.box[2] > args.box[0] and args.box[3] > args.box[1]):
            raise DetectError(f"--box must be x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {args.box}")
        if args.label not in names:
            raise DetectError(f"--box needs --label, one of {', '.join(names)} (got {args.label!r})")
        box, label, score, what = args.box, names.index(args.label), None, "box"
    else:
        det = model.predict([image])[0]
        count = len(det["scores"])
        if not 0 <= args.detection < count:
            raise DetectError(f"{args.image}: the model made {count} detections; --detection {args.detection} does "
                              "not exist (pass --box and --label to explain any box)")
        box = det["boxes"][args.detection].tolist()
        label, score = int(det["labels"][args.detection]), float(det["scores"][args.detection])
        what = f"det{args.detection}"
    start = time.perf_counter()
    scorer = DetectorBoxScorer(model, image, box, label)
    omap = occlusion_map(scorer, patch=args.patch, stride=args.stride, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    path = args.out / f"occlusion_{args.image.stem}_{what}.png"
    title = f"{names[label]}" + (f" {score:.3f}" if score is not None else "") + f" at {[round(v, 1) for v in box]}"
    plot_occlusion(rgb, omap, box, path, title=title)
    return {"figure": str(path), "label": names[label], "score": score, "box": box, "baseline": omap.baseline,
            "lowest": float(omap.scores.min()), "most_sensitive_yx": list(omap.peak()),
            "positions": int(omap.scores.size), "evaluated": omap.evaluated, "seconds": seconds}


def deconvnet(args, model, image) -> dict:
    """Deconvnet projections of the strongest peaks of one channel in the image."""
    from detect.analysis.deconvnet import DeconvNet, plot_projections, resize_like_model

    net = DeconvNet.from_backbone(model.backbone)
    resized = resize_like_model(model, image)
    channel = args.channel
    values, _, _ = net.channel_maxima([resized], args.layer)
    if channel is None:
        channel = int(values[0].argmax())
    elif not 0 <= channel < values.shape[1]:
        raise DetectError(f"--channel {channel} is out of range: layer {args.layer} has {values.shape[1]} channels")
    projections = net.top_units_in_image(resized, args.layer, channel, k=args.top)
    path = args.out / f"deconv_{args.image.stem}_{args.layer}_c{channel}.png"
    plot_projections(projections, path, title=f"{args.layer} channel {channel}")
    return {"figure": str(path), "layer": args.layer, "channel": channel,
            "units": [{"cell_yx": list(p.cell), "activation": p.activation, "field_y1x1y2x2": list(p.field)}
                      for p in projections]}


def run(args: argparse.Namespace) -> dict:
    apply_runtime(args)
    from detect.build import model_from_checkpoint
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor
    from detect.distributed import resolve_device
    from detect.utils.io import atomic_write_json

    if args.patch < 1 or args.stride < 1 or args.batch_size < 1 or args.top < 1:
        raise DetectError("--patch, --stride, --batch-size and --top must be positive")
    device = resolve_device(args.device)
    rgb = read_image(args.image)
    model, _, _ = model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=device)
    image = image_to_tensor(rgb).to(device)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DetectError(f"output folder {args.out} cannot be created ({exc.strerror or exc})") from None
    summary = deconvnet(args, model, image) if args.layer is not None else occlusion(args, model, image, rgb)
    atomic_write_json(Path(summary["figure"]).with_suffix(".json"), {"image": str(args.image), **summary})
    for key, value in summary.items():
        if key != "units":
            print(f"{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
