"""``detect-train`` / ``tools/train.py``: train a detector from a config.

    tools/train.py --config configs/faster_rcnn/tiny_synthetic.yaml [--set train.lr=0.01 ...] [--out DIR] [--resume]
    torchrun --nproc_per_node 2 tools/train.py --config ...      # DistributedDataParallel, same global batch

Any pipeline: Faster R-CNN (joint or 4-step alternating training), Fast R-CNN, and R-CNN's four
stages (fine-tuning, feature cache, SVMs, box regression; ``tools/train_rcnn.py`` runs a subset).
The output folder receives ``config.yaml`` (the resolved config), ``class_names.json``,
``metrics.jsonl`` (and TensorBoard events when installed), ``checkpoints/ckpt_*.pt``
(the newest ``train.keep_checkpoints``) and ``model_final.pt``. At the end the model
is evaluated on the test split and its mAP printed (the config's ``test.metric``).
The recipe is :func:`detect.recipes.train`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect import distributed
from detect.cli.common import add_runtime_args, apply_runtime, run_distributed_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                        help="continue from CKPT, or (without a value) from the newest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out folder that holds checkpoints of an earlier run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA float16; CPU bfloat16, fast only with AVX512-BF16/AMX); same as --set train.amp=true")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-test", action="store_true", help="skip the final evaluation on the test split")
    parser.add_argument("--print-config", nargs="?", const="text", choices=("text", "markdown"), default=None,
                        help="print every config key (type, value after --set, meaning) and exit; 'markdown': as a table")
    parser.add_argument("--proposals-limit", type=int, default=None, metavar="N",
                        help="selective-search boxes kept per image in the store (same as --set proposals.top_k=N)")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Print on rank 0 without breaking the progress bar."""
    if distributed.is_main():
        from tqdm import tqdm   # tqdm.write keeps the bar intact

        tqdm.write(message, file=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    from detect import load_config
    from detect.recipes import RunOptions, train   # torch and the whole library: not needed for --help

    args = parse_args(argv)

    def body() -> dict:
        overrides = list(args.overrides) + (["train.amp=true"] if args.amp else [])
        overrides += [f"proposals.top_k={args.proposals_limit}"] if args.proposals_limit is not None else []
        cfg = load_config(args.config, overrides)
        if args.print_config:
            from detect.config_doc import print_config

            print_config(cfg, args.print_config)
            return {}
        apply_runtime(args, cfg.train)     # first: threads and denormals before any work
        info = distributed.init_from_env(args.device)
        return train(cfg, RunOptions(out=args.out or Path("runs") / args.config.stem, device=info.device,
                                     resume=args.resume, overwrite=args.overwrite, strict=args.strict,
                                     test=not args.no_test, progress=not args.no_progress, log=log))

    return run_distributed_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
