"""``tools/compress.py``: truncated SVD of a Fast R-CNN's fc layers, with its effect on speed and mAP (Sec. 3.1).

    tools/compress.py --checkpoint runs/fast/model_final.pt --rank-fc6 1024 --rank-fc7 256 [--out small.pt]
                      [--split test] [--limit 100] [--no-eval]

Writes the compressed model as a checkpoint whose config records the ranks
(``fast_rcnn.svd_rank_fc6`` / ``svd_rank_fc7``), so ``tools/test.py`` and
``tools/demo.py`` rebuild it. Unless ``--no-eval``, both models are evaluated on
the same images and a table reports weights, seconds per image (head / total) and VOC07 mAP
(the paper: VGG16 fc6 1024 / fc7 256, detection -30% time, -0.3 mAP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a Fast R-CNN checkpoint (or run folder)")
    parser.add_argument("--rank-fc6", type=int, default=1024, help="rank of fc6 (0: keep dense)")
    parser.add_argument("--rank-fc7", type=int, default=256, help="rank of fc7 (0: keep dense)")
    parser.add_argument("--out", type=Path, default=None, help="output checkpoint (default: next to the input)")
    parser.add_argument("--split", default=None, help="evaluation split (default: the config's test split)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N images only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-eval", action="store_true", help="only write the compressed model")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def _evaluate(model, dataset, device, limit: int) -> dict:
    from detect.engine import evaluate_split

    timings: dict = {}
    result, _ = evaluate_split(model, dataset, device=device, timings=timings, limit=limit,
                               log=lambda m: print(m, file=sys.stderr))
    images = max(timings.get("images", 0), 1)
    return {"mAP": result["mAP"], "seconds": timings.get("total", 0.0) / images,
            "heads": timings.get("head", 0.0) / images}


def run(args: argparse.Namespace) -> dict:
    from detect.build import model_from_checkpoint
    from detect.checkpoint import save_checkpoint
    from detect.config import config_to_dict
    from detect.data.loader import build_dataset
    from detect.distributed import resolve_device
    from detect.svd import compress_fc, fc_layers

    apply_runtime(args)
    device = resolve_device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, overrides=args.overrides, device=device)
    if cfg.model.pipeline != "fast_rcnn":
        raise ConfigError(f"{ckpt['path']}: model.pipeline is '{cfg.model.pipeline}'; truncated SVD is applied "
                          "to Fast R-CNN checkpoints")
    head = model.head.box_head
    ranks = [args.rank_fc6, args.rank_fc7]
    layers = fc_layers(head)
    if any(r > 0 for r in ranks[len(layers):]):
        raise ConfigError(f"the {cfg.model.backbone.name} head has {len(layers)} fc layer(s); "
                          f"set --rank-fc{6 + len(layers)} 0")
    dense_weights = sum(p.numel() for _, _, layer in layers for p in layer.parameters())
    dataset = None
    dense = None
    if not args.no_eval:
        dataset = build_dataset(cfg, args.split or cfg.test.split or cfg.data.test_split)
        dense = _evaluate(model, dataset, device, args.limit)
    try:
        report = compress_fc(head, ranks)
    except ValueError as exc:
        raise ConfigError(f"--rank-fc6/--rank-fc7: {exc}") from None
    cfg.fast_rcnn.svd_rank_fc6, cfg.fast_rcnn.svd_rank_fc7 = (r if r > 0 else 0 for r in ranks)
    small_weights = sum(p.numel() for _, _, layer in fc_layers(head) for p in layer.parameters())
    out = args.out or Path(ckpt["path"]).with_name(f"{Path(ckpt['path']).stem}_svd{ranks[0]}_{ranks[1]}.pt")
    save_checkpoint(out, model=model, config=config_to_dict(cfg), class_names=list(ckpt["class_names"]),
                    iteration=int(ckpt.get("iteration", 0)))
    model_from_checkpoint(out)                       # the written file rebuilds as it should
    for line in report:
        print(line)
    print(f"fc weights {dense_weights / 1e6:.2f}M -> {small_weights / 1e6:.2f}M; compressed model: {out}")
    result = {"out": str(out), "fc_weights": [dense_weights, small_weights]}
    if dense is not None:
        small = _evaluate(model, dataset, device, args.limit)
        print("| model | fc weights | heads s/img | total s/img | VOC07 mAP |\n|---|---|---|---|---|")
        for name, weights, r in (("dense", dense_weights, dense), (f"SVD {ranks[0]}/{ranks[1]}", small_weights, small)):
            print(f"| {name} | {weights / 1e6:.2f}M | {r['heads']:.4f} | {r['seconds']:.4f} | {r['mAP']:.4f} |")
        print(f"change: heads time {100 * (small['heads'] / max(dense['heads'], 1e-12) - 1):+.1f}%, "
              f"total time {100 * (small['seconds'] / max(dense['seconds'], 1e-12) - 1):+.1f}%, "
              f"mAP {100 * (small['mAP'] - dense['mAP']):+.2f} points")
        result.update(dense=dense, compressed=small)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: (run(args), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
