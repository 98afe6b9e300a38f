"""``detect-export`` / ``tools/export.py``: a trained detector as an ONNX file or a torch.export program.

    tools/export.py --checkpoint runs/x/model_final.pt --format onnx --out model.onnx
    tools/export.py --checkpoint runs/x/model_final.pt --format torch-export --out model.pt2 [--input-dtype uint8]
    tools/export.py --checkpoint runs/x/model_final.pt --out model.onnx --out model.pt2     (one trace, both files)

The file holds the whole test-time path of one image of any size (Faster R-CNN: image in;
Fast R-CNN: image and proposals in; R-CNN: the region scorer) with the class names and the
config in its metadata. Before it is written, the export is run on image sizes it was not
traced with and compared with the checkpoint's own detections; a difference is an error.
``detect.runtime.load_exported(path).predict(images)`` runs the file as the checkpoint's model runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ExportError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a training output folder")
    parser.add_argument("--format", choices=("onnx", "torch-export"), default=None,
                        help="default: from the --out suffix (.onnx / .pt2), else onnx")
    parser.add_argument("--out", type=Path, action="append", default=None,
                        help="output file (default: next to the checkpoint); repeat it for several formats")
    parser.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32",
                        help="the graph's image input: float in [0, 1] or uint8 0-255 (converted inside)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the stored config, e.g. --set model.roi_heads.score_thresh=0.3")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the eager model")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from detect.export import export_checkpoint   # torch and onnx: not needed for --help

    apply_runtime(args)
    out = args.out[0] if args.out and len(args.out) == 1 else args.out
    if isinstance(out, list) and args.format:
        raise ExportError("--format names the format of one --out; with several, each suffix says it")
    report = export_checkpoint(args.checkpoint, out, fmt=args.format, overrides=args.overrides,
                               input_dtype=args.input_dtype, check=not args.no_check)
    for r in report.get("files", [report]):
        print(f"exported {r['kind']} ({r['format']}): inputs {', '.join(r['inputs'])} -> outputs "
              f"{', '.join(r['outputs'])}; {r['bytes'] / 1e6:.1f} MB in {r['export_s']:.1f} s")
        if r["check"]:
            print(f"matches the eager model on {len(r['check'])} sizes not seen at export (boxes within "
                  f"{max(c['max_box_diff'] for c in r['check']):.1e} px, scores within "
                  f"{max(c['max_score_diff'] for c in r['check']):.1e})")
        print(f"written to {r['out']}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
