"""``detect-demo`` / ``tools/demo.py``: detect objects in every image of a folder and draw them.

    tools/demo.py --checkpoint runs/x/model_final.pt --images DIR --out DIR [--score-thresh 0.5] [--device cpu|cuda]

Every image under ``--images`` (recursively) is written to ``--out`` at the same relative
path with its detections drawn; ``detections.json`` (one entry per input image) and
``detections.csv`` (one row per detection) list file, class, score and box
(``x1, y1, x2, y2`` in pixels). Unreadable files (truncated, not an image, above the pixel
limit, broken symlinks, FIFOs) are listed under ``unreadable`` and skipped; the others are still drawn.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch

from detect.cli.common import add_runtime_args, apply_runtime, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a training output folder")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the drawn images and detections.json/csv")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections with at least this score")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images whose header declares more pixels (default: data.max_image_pixels)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the stored config, e.g. --set model.roi_heads.nms_thresh=0.4")
    parser.add_argument("--labels", default="auto", choices=("auto", "score", "class", "none"),
                        help="tag text: class and score, leaving out tags with no free place (auto), class and "
                             "score on every box (score), class only (class), or none")
    parser.add_argument("--legend", action="store_true", help="also draw a class -> colour legend in a corner")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def _save_image(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    from detect.utils.io import atomic_write_bytes

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
           ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buffer.getvalue())


def run(args: argparse.Namespace) -> dict:
    """Run the demo; returns the content of ``detections.json``."""
    apply_runtime(args)
    from tqdm import tqdm

    from detect.build import model_from_checkpoint
    from detect.runtime import is_exported, model_from_exported
    from detect.recipes import prepare_out_dir
    from detect.data.folder import scan_images
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor
    from detect.distributed import resolve_device
    from detect.errors import ConfigError, ImageReadError
    from detect.utils.io import atomic_open, atomic_write_json
    from detect.visualize import draw_detections

    device = resolve_device(args.device)
    out_abs = args.out.resolve()
    # an --out inside --images must not feed a rerun its own drawings
    found, not_files = scan_images(args.images)
    paths = [p for p in found if out_abs not in p.resolve().parents]
    if is_exported(args.checkpoint):       # an .onnx / .pt2 from tools/export.py runs on the CPU
        model, cfg, ckpt = model_from_exported(args.checkpoint, overrides=args.overrides)
    else:
        model, cfg, ckpt = model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=device)
    max_pixels = cfg.data.max_image_pixels if args.max_pixels is None else args.max_pixels
    if max_pixels <= 0:
        raise ConfigError(f"--max-pixels must be positive, got {max_pixels}")
    names = list(ckpt["class_names"])
    prepare_out_dir(args.out, resume=True, overwrite=False)
    entries = []
    unreadable = [{"file": p.relative_to(args.images).as_posix(), "reason": f"{p}: {why}"} for p, why in not_files]
    for path in tqdm(paths, desc="demo", disable=args.no_progress, dynamic_ncols=True):
        rel = path.relative_to(args.images)
        try:
            image = read_image(path, max_pixels=max_pixels)
        except ImageReadError as exc:
            unreadable.append({"file": rel.as_posix(), "reason": str(exc)})
            continue
        with torch.no_grad():
            det = model.predict([image_to_tensor(image).to(device)])[0]
        keep = det["scores"] >= args.score_thresh
        boxes = det["boxes"][keep].float().cpu().numpy()
        scores = det["scores"][keep].float().cpu().numpy()
        labels = det["labels"][keep].cpu().numpy()
        _save_image(draw_detections(image, boxes, scores, labels, names, label_mode=args.labels,
                                    legend=args.legend), args.out / rel)
        entries.append({"file": rel.as_posix(), "width": int(image.shape[1]), "height": int(image.shape[0]),
                        "detections": [{"class": names[int(c)], "score": float(s), "box": [float(v) for v in b]}
                                       for b, s, c in zip(boxes, scores, labels)]})
    unreadable.sort(key=lambda item: item["file"])
    report = {"checkpoint": str(ckpt["path"]), "score_thresh": args.score_thresh, "images": entries,
              "unreadable": unreadable}
    atomic_write_json(args.out / "detections.json", report)
    with atomic_open(args.out / "detections.csv", "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "class", "score", "x1", "y1", "x2", "y2"])
        for entry in entries:
            for d in entry["detections"]:
                writer.writerow([entry["file"], d["class"], f"{d['score']:.6f}", *(f"{v:.2f}" for v in d["box"])])
    found = sum(len(e["detections"]) for e in entries)
    print(f"{found} detections (score >= {args.score_thresh}) in {len(entries)} images; drawn images in {args.out}")
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable file(s):")
        for item in unreadable:
            print(f"  {item['file']}: {item['reason']}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
