"""``tools/train_rcnn.py``: R-CNN's four training stages, or some of them (R-CNN Sec. 2.3, Appendix C).

    tools/train_rcnn.py --config configs/rcnn/tiny_synthetic.yaml [--out DIR] [--stages finetune,features,svm,bbox]
    tools/train_rcnn.py --config C --checkpoint runs/x/finetune/model_final.pt --stages features,svm,bbox

``tools/train.py`` trains R-CNN too (all four stages); this alias chooses the stages:

1. ``finetune``: the CNN with a (C+1)-way classifier on warped proposals, into ``<out>/finetune``;
   without this stage ``--checkpoint`` gives the fine-tuned CNN.
2. ``features``: fc7 (and pool5 where IoU > 0.6) of every training proposal into the feature cache
   (``rcnn.feature_cache``, default ``<out>/features``); resumable, refuses another model's cache.
3. ``svm``: one-vs-rest linear SVMs with hard negative mining.
4. ``bbox``: class-specific ridge box regression on pool5.

Stored proposals of the train and test splits are computed first when missing (``--proposal-workers``).
Writes ``<out>/model_final.pt`` (a checkpoint ``tools/test.py`` reads) and prints the test mAP.
The recipe is :func:`detect.recipes.train_rcnn_stages`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect.cli.common import add_runtime_args, apply_runtime, run_cli
from detect.errors import ConfigError

STAGES = ("finetune", "features", "svm", "bbox")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detect-train-rcnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML config with model.pipeline: rcnn")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {', '.join(STAGES)}")
    parser.add_argument("--checkpoint", type=Path, default=None, help="fine-tuned R-CNN when 'finetune' is skipped")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    parser.add_argument("--proposal-workers", type=int, default=0,
                        help="processes computing missing proposals (0: train.workers)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-test", action="store_true", help="skip the final evaluation on the test split")
    parser.add_argument("--no-progress", action="store_true")
    add_runtime_args(parser)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    from detect import load_config
    from detect.distributed import resolve_device
    from detect.recipes import RunOptions, train   # torch and the whole library: not needed for --help

    args = parse_args(argv)

    def body() -> int:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        cfg = load_config(args.config, args.overrides)
        if cfg.model.pipeline != "rcnn":
            raise ConfigError(f"{args.config}: model.pipeline is '{cfg.model.pipeline}'; tools/train_rcnn.py trains "
                              "'rcnn' (use tools/train.py for the others)")
        apply_runtime(args, cfg.train)
        train(cfg, RunOptions(out=args.out or Path("runs") / args.config.stem, device=resolve_device(args.device),
                              resume="auto" if args.resume else None, test=not args.no_test,
                              progress=not args.no_progress, log=log, stages=stages, checkpoint=args.checkpoint,
                              proposal_workers=args.proposal_workers))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
