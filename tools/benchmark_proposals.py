#!/usr/bin/env python
"""Our selective search against OpenCV-contrib's, side by side in one run, one process, one thread.

For each VOC-format split, every image is read once and handed to each method in turn (so a busy
machine slows all methods alike); time is measured around the proposal call only, as CPU seconds
(the goal's measure: robust to other load on a shared machine) and wall seconds. Recall@0.5/0.7 and
MABO are reported at the top 2000 boxes and at all boxes. Prints a markdown table and, with --out,
writes it to a file.

    python tools/benchmark_proposals.py --out benchmarks/proposals.md
    python tools/benchmark_proposals.py --data ../shared/data/bccd --limit 5     # a quick look
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"                  # before numpy/torch/cv2 load their thread pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = [REPO.parent / "shared" / "data" / "bccd", REPO.parent / "shared" / "data" / "raccoon"]
DEFAULT_METHODS = "ours:fast,opencv:fast,ours:quality,opencv:quality"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def run_split(root: Path, split: str, methods: list[tuple[str, str]], *, limit: int, top_k: int, max_side: int,
              min_box_size: int, seed: int, progress: bool) -> list[dict]:
    """Time and evaluate every method on one split; one row per method."""
    from tqdm import tqdm

    from detect.data.image import read_image
    from detect.data.voc import VOCDataset
    from proposals import selective_search
    from proposals.recall import evaluate_recall

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = VOCDataset(root, split, classes="auto")
    records = data.records[:limit] if limit > 0 else data.records
    boxes = {m: {} for m in methods}
    cpu = {m: 0.0 for m in methods}
    wall = {m: 0.0 for m in methods}
    for record in tqdm(records, desc=f"{root.name}/{split}", disable=not progress, file=sys.stderr):
        image = read_image(record.path)
        for method in methods:
            backend, mode = method
            c0, w0 = time.process_time(), time.perf_counter()
            found = selective_search(image, mode=mode, backend=backend, top_k=0, max_side=max_side,
                                     min_box_size=min_box_size, seed=seed)
            cpu[method] += time.process_time() - c0
            wall[method] += time.perf_counter() - w0
            boxes[method][record.image_id] = found
    rows = []
    for method in methods:
        at_k = evaluate_recall(records, boxes[method], data.class_names, top_k=top_k)
        at_all = evaluate_recall(records, boxes[method], data.class_names, top_k=None)
        rows.append({"dataset": root.name, "split": split, "backend": method[0], "mode": method[1],
                     "images": len(records), "objects": at_all["num_objects"],
                     "cpu_s": cpu[method] / max(len(records), 1), "wall_s": wall[method] / max(len(records), 1),
                     "boxes": at_all["proposals_per_image"], "k": at_k, "all": at_all})
    return rows


def _table(rows: list[dict], top_k: int) -> str:
    head = ("| dataset | method | CPU s/img | wall s/img | boxes/img | "
            f"R@0.5 top{top_k} | R@0.7 top{top_k} | MABO top{top_k} | R@0.5 all | R@0.7 all | MABO all |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        k, a = r["k"], r["all"]
        lines.append(f"| {r['dataset']} ({r['images']} img, {r['objects']} obj) | {r['backend']} {r['mode']} | "
                     f"{r['cpu_s']:.3f} | {r['wall_s']:.3f} | {r['boxes']:.0f} | {k['recall@0.5']:.3f} | "
                     f"{k['recall@0.7']:.3f} | {k['mabo']:.3f} | {a['recall@0.5']:.3f} | {a['recall@0.7']:.3f} | "
                     f"{a['mabo']:.3f} |")
    return "\n".join(lines)


def _verdicts(rows: list[dict], top_k: int) -> list[str]:
    """The issue's two goals, per dataset: met, or by how much they are missed."""
    out = []
    find = {(r["dataset"], r["backend"], r["mode"]): r for r in rows}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for mode in ("fast", "quality"):
            ours, ref = find.get((dataset, "ours", mode)), find.get((dataset, "opencv", mode))
            if not ours or not ref:
                continue
            ratio = ours["cpu_s"] / max(ref["cpu_s"], 1e-9)
            checks = [("time", ratio <= 1.0 if mode == "fast" else ratio < 1.0,
                       f"{ours['cpu_s']:.3f} vs {ref['cpu_s']:.3f} s/img (x{ratio:.2f})"),
                      (f"recall@0.7 top{top_k}", ours["k"]["recall@0.7"] >= ref["k"]["recall@0.7"],
                       f"{ours['k']['recall@0.7']:.3f} vs {ref['k']['recall@0.7']:.3f} "
                       f"({ours['k']['recall@0.7'] - ref['k']['recall@0.7']:+.3f})")]
            if mode == "fast":
                checks.append((f"MABO top{top_k}", ours["k"]["mabo"] >= ref["k"]["mabo"],
                               f"{ours['k']['mabo']:.3f} vs {ref['k']['mabo']:.3f} "
                               f"({ours['k']['mabo'] - ref['k']['mabo']:+.3f})"))
            met = all(ok for _, ok, _ in checks)
            detail = "; ".join(f"{name} {'ok' if ok else 'MISSED'}: {text}" for name, ok, text in checks)
            out.append(f"- {dataset}, {mode}: **{'met' if met else 'missed'}** -- {detail}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="VOC-format dataset roots")
    parser.add_argument("--split", default="test")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"backend:mode list (default {DEFAULT_METHODS})")
    parser.add_argument("--limit", type=int, default=0, help="first N images of each split (0: all)")
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--max-side", type=int, default=1000)
    parser.add_argument("--min-box-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import cv2

    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    from detect.errors import DetectError

    methods = []
    for item in args.methods.split(","):
        backend, _, mode = item.strip().partition(":")
        if backend not in ("ours", "opencv") or mode not in ("single", "fast", "quality"):
            print(f"error: --methods entry '{item}' must be ours|opencv:single|fast|quality", file=sys.stderr)
            return 2
        methods.append((backend, mode))
    rows = []
    started = time.time()
    try:
        for root in args.data:
            rows += run_split(root, args.split, methods, limit=args.limit, top_k=args.top_k, max_side=args.max_side,
                              min_box_size=args.min_box_size, seed=args.seed, progress=not args.no_progress)
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import numpy
    import skimage

    text = "\n".join([
        f"## Selective search: ours vs OpenCV-contrib ({datetime.date.today().isoformat()})", "",
        f"Machine: {_machine()}. One process, one thread (cv2.setNumThreads(1), OMP/MKL/OPENBLAS=1); "
        f"OpenCV {cv2.__version__}, numpy {numpy.__version__}, scikit-image {skimage.__version__}. "
        f"Split '{args.split}', max side {args.max_side}, min box {args.min_box_size} px, seed {args.seed}; "
        f"difficult objects excluded; MABO = mean over classes of the average best overlap. "
        f"Each image goes through every method in turn; the run took {(time.time() - started) / 60:.1f} min.", "",
        _table(rows, args.top_k), "", "Goals (time in CPU seconds per image):", *_verdicts(rows, args.top_k), ""])
    print(text)
    if args.out:
        from detect.utils.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
