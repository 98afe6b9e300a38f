"""``detect-proposals compute|merge|eval|show``: fill a proposal store, check its recall, look at boxes.

Examples::

    detect-proposals compute --voc ../shared/data/bccd --split test --store runs/proposals --workers 2
    detect-proposals compute --voc VOC2007 --split trainval --store S --shard 0/4     # on machine 0 of 4
    detect-proposals merge --voc VOC2007 --split trainval --store S                   # after all shards
    detect-proposals eval --voc ../shared/data/bccd --split test --store S --plot recall.png
    detect-proposals show --image photo.jpg --count 30 --out photo_proposals.png

Defaults come from ``proposals`` in ``--config`` (with ``--set proposals.key=value``); the flags win.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from detect.cli.common import add_runtime_args
from detect.errors import DetectError


def _list(text: str | None, cast=str) -> list | None:
    return [cast(v) for v in text.split(",") if v.strip()] if text else None


def _add_source(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--voc", metavar="ROOT", help="VOC-format dataset root (with --split)")
    group.add_argument("--split", default="test", help="VOC split name (default: test)")
    group.add_argument("--coco", metavar="JSON", help="COCO instances JSON (with --images)")
    group.add_argument("--images", metavar="DIR", help="folder the COCO file names are relative to")
    group.add_argument("--folder", metavar="DIR", help="a folder of images (no ground truth)")
    group.add_argument("--name", help="the split's key in the store (default: dataset folder + split)")
    group.add_argument("--limit", type=int, default=0, help="only the first N images (quick trials)")
    parser.set_defaults(source_required=required)


def _add_params(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selective search (defaults: the config's proposals section)")
    group.add_argument("--config", help="YAML config whose 'proposals' section gives the defaults")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    group.add_argument("--store", help="proposal store directory (default: proposals.store)")
    group.add_argument("--backend", choices=["ours", "opencv"])
    group.add_argument("--mode", choices=["single", "fast", "quality"])
    group.add_argument("--max-side", type=int)
    group.add_argument("--min-box-size", type=int)
    group.add_argument("--top-k", type=int, help="boxes kept per image (0: all)")
    group.add_argument("--seed", type=int)
    group.add_argument("--colour-spaces", help="comma list from rgb,hsv,lab,rgi,i,h (ours)")
    group.add_argument("--ks", help="comma list of segmentation thresholds k (ours)")
    group.add_argument("--similarities", help="comma list such as CTSF,TSF,F,S (ours)")
    group.add_argument("--sigma", type=float, default=0.8)
    group.add_argument("--min-size", type=int, help="smallest initial segment in pixels (ours; default k)")
    group.add_argument("--segmenter", choices=["opencv", "skimage"], default="opencv")


def _params(args) -> dict:
    from detect.config import load_config
    from proposals.compute import search_params

    cfg = load_config(args.config, overrides=args.set).proposals
    pick = lambda flag, default: default if flag is None else flag   # noqa: E731
    args.store = pick(args.store, cfg.store)
    return search_params(backend=pick(args.backend, cfg.backend), mode=pick(args.mode, cfg.mode),
                         max_side=pick(args.max_side, cfg.max_side),
                         min_box_size=pick(args.min_box_size, cfg.min_box_size), top_k=pick(args.top_k, cfg.top_k),
                         seed=pick(args.seed, cfg.seed), colour_spaces=_list(args.colour_spaces),
                         ks=_list(args.ks, float), similarities=_list(args.similarities), sigma=args.sigma,
                         min_size=args.min_size, segmenter=args.segmenter)


def _source(args):
    from proposals.sources import coco_source, folder_source, voc_source

    chosen = [flag for flag in ("voc", "coco", "folder") if getattr(args, flag)]
    if len(chosen) != 1:
        raise DetectError("give exactly one of --voc ROOT, --coco JSON --images DIR, --folder DIR")
    if args.voc:
        source = voc_source(args.voc, args.split, name=args.name)
    elif args.coco:
        if not args.images:
            raise DetectError("--coco needs --images DIR (the folder its file names are relative to)")
        source = coco_source(args.coco, args.images, name=args.name)
    else:
        source = folder_source(args.folder, name=args.name)
    return source.limit(args.limit)


def _store(args, source, params):
    from proposals.store import ProposalStore

    if not args.store:
        raise DetectError("no proposal store: pass --store DIR or set proposals.store in the config")
    return ProposalStore(args.store, source.name, params)


def cmd_compute(args) -> int:
    from proposals.compute import compute_store, parse_shard

    params = _params(args)
    source = _source(args)
    store = _store(args, source, params)
    shard = parse_shard(args.shard)
    summary = compute_store(source.items, store, workers=args.workers, shard=shard, progress=not args.no_progress,
                            merge=False if args.no_merge else None)
    for problem in summary.problems:
        print(f"warning: {problem} (recomputed)", file=sys.stderr)
    rate = summary.seconds / summary.computed if summary.computed else 0.0
    print(f"{store.directory}: {summary.total} images in shard {shard[0]}/{shard[1]}: {summary.skipped} already "
          f"there, {summary.computed} computed ({rate:.2f} s/image with {args.workers} workers), "
          f"{len(summary.failed)} failed")
    if summary.failed:
        print(f"failed images are recorded and retried by the next run: {sorted(summary.failed)[:10]}", file=sys.stderr)
        return 1
    return 0


def cmd_merge(args) -> int:
    params = _params(args)
    store = _store(args, _source(args), params)
    target = store.merge()
    print(f"{target}: {len(store)} images, {len(store.failed())} failed")
    return 0


def _stored_proposals(store, image_ids: list[str]) -> tuple[dict, list[str]]:
    """The boxes of every image the store holds, and the ids it lacks (never computed, or failed).

    A damaged store is an error, not "no proposals": a truncated or corrupt record would otherwise
    count as an image without boxes and lower the recall silently.
    """
    from proposals.store import ProposalStoreError

    problems = store.refresh(verify=True)
    if problems:
        raise ProposalStoreError(f"the proposal store is damaged: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
                                 + "; rerun 'detect-proposals compute' with the same parameters to recompute it")
    proposals, missing = {}, []
    try:
        for image_id in image_ids:
            if image_id in store:
                proposals[image_id] = store.get(image_id)     # a record failing its crc raises, naming it
            else:
                missing.append(image_id)
    finally:
        store.close()
    return proposals, missing


def cmd_eval(args) -> int:
    from proposals.compute import compute_store
    from proposals.recall import evaluate_recall, format_report, plot_recall
    from proposals.store import ProposalStore

    params = _params(args)
    source = _source(args)
    if source.records is None:
        raise DetectError("eval needs ground truth: use --voc or --coco, not --folder")
    with tempfile.TemporaryDirectory() as scratch:
        if args.store:
            store = _store(args, source, params)
        else:                 # no store: compute into a throwaway one
            store = ProposalStore(scratch, source.name, params)
            compute_store(source.items, store, workers=args.workers, progress=not args.no_progress)
        proposals, missing = _stored_proposals(store, [image_id for image_id, _ in source.items])
    if missing:
        print(f"warning: {len(missing)} images have no proposals in {store.directory} (counted as none): "
              f"{missing[:5]}", file=sys.stderr)
    report = evaluate_recall(source.records, proposals, source.class_names, top_k=args.count or None)
    print(format_report(report))
    if args.json:
        from detect.utils.io import atomic_write_json

        atomic_write_json(args.json, {"params": params, **report})
    if args.plot:
        print(f"plot: {plot_recall({params['backend'] + ' ' + params['mode']: report}, args.plot)}")
    return 0


def cmd_show(args) -> int:
    import cv2
    from PIL import Image

    from detect.data.image import read_image
    from detect.utils.io import atomic_open
    from proposals.compute import search_kwargs
    from proposals.selective_search import selective_search

    params = _params(args)
    if args.image:
        image_id, path = Path(args.image).stem, Path(args.image)
        source = None
    else:
        source = _source(args)
        match = [(i, p) for i, p in source.items if i == args.id] if args.id else source.items[:1]
        if not match:
            raise DetectError(f"image id '{args.id}' is not in {source.name}")
        image_id, path = match[0]
    image = read_image(path)
    boxes = None
    if args.store and source is not None:
        store = _store(args, source, params)
        if image_id in store:
            boxes = store.get(image_id)
    if boxes is None:
        boxes = selective_search(image, **search_kwargs(params))
    canvas = image.copy()
    rng = np.random.default_rng(0)
    for box in boxes[: args.count][::-1]:                    # best ranked drawn last, on top
        colour = tuple(int(c) for c in rng.integers(60, 256, 3))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, 1 + max(image.shape[:2]) // 500)
    out = Path(args.out or f"{Path(path).stem}_proposals.png")
    with atomic_open(out, "wb", encoding=None) as handle:
        Image.fromarray(canvas).save(handle, format="PNG")
    print(f"{out}: top {min(args.count, len(boxes))} of {len(boxes)} proposals on {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect-proposals", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compute = sub.add_parser("compute", help="fill the store for a split (resumable, parallel, sharded)")
    _add_source(compute)
    _add_params(compute)
    compute.add_argument("--workers", type=int, default=1, help="processes on this machine")
    compute.add_argument("--shard", help="i/n: this machine's share (default: RANK/WORLD_SIZE, else 0/1)")
    compute.add_argument("--no-merge", action="store_true", help="leave the part file unmerged")
    compute.add_argument("--no-progress", action="store_true")
    compute.set_defaults(func=cmd_compute)
    merge = sub.add_parser("merge", help="merge the shards' part files into one")
    _add_source(merge)
    _add_params(merge)
    merge.set_defaults(func=cmd_merge)
    evaluate = sub.add_parser("eval", help="recall, MABO and AR of the stored proposals")
    _add_source(evaluate)
    _add_params(evaluate)
    evaluate.add_argument("--count", type=int, default=2000, help="headline numbers at the top N proposals (0: all)")
    evaluate.add_argument("--plot", help="write recall curves to this PNG")
    evaluate.add_argument("--json", help="write the full report to this JSON file")
    evaluate.add_argument("--workers", type=int, default=1, help="processes, when computing without --store")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=cmd_eval)
    show = sub.add_parser("show", help="draw the top proposals on an image")
    show.add_argument("--image", help="an image file (or use --voc/--coco/--folder with --id)")
    show.add_argument("--id", help="image id within the split")
    _add_source(show, required=False)
    _add_params(show)
    show.add_argument("--count", type=int, default=20, help="number of boxes drawn")
    show.add_argument("--out", help="output PNG (default: <image>_proposals.png)")
    show.set_defaults(func=cmd_show)
    for command in (compute, merge, evaluate, show):
        add_runtime_args(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from detect.cli.common import apply_runtime, run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: (apply_runtime(args), args.func(args))[1],
                   interrupted="interrupted: rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
