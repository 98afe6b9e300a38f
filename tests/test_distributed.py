"""DistributedDataParallel on CPU (gloo): 2 processes give the weights of 1 process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from detect import build_model, distributed, load_config
from detect.data.loader import DetectionDataset
from detect.data.records import ImageRecord
from detect.engine import evaluate_split, fit
from tests.engine_fakes import CLASSES, FakeDetector, fake_config, write_images


def _config():
    # global batch 4: one process takes 4 images per step, two take 2 each
    return fake_config(images_per_batch=4, max_iter=6, steps=[4], checkpoint_period=3, lr=0.1)


def _worker(rank: int, world: int, init_file: str, records, out_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = FakeDetector(random=False)
        train_set = DetectionDataset(records, CLASSES, train=True)
        fit(model, train_set, _config(), out_dir=out_dir, progress=False, log=lambda m: None)
        metrics, detections = evaluate_split(model, DetectionDataset(records, CLASSES), device=torch.device("cpu"))
        torch.save({"state": model.state_dict(), "num_detections": len(detections), "mAP": metrics["mAP"], "images_seen": model.images_seen,
                    "rank": distributed.get_rank(), "world": distributed.get_world_size()},
                   f"{result_dir}/rank{rank}.pt")
    finally:
        dist.barrier()   # no rank tears gloo down while the other still talks to it (std::terminate otherwise)
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    records = write_images(tmp_path / "images", 10)
    (tmp_path / "results").mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), records, str(tmp_path / "ddp"),
                            str(tmp_path / "results")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "results" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [r["images_seen"] for r in ranks] == [12, 12]   # 6 steps x 2 images: each rank half of every batch

    torch.manual_seed(0)
    single = FakeDetector(random=False)
    train_set = DetectionDataset(records, CLASSES, train=True)
    fit(single, train_set, _config(), out_dir=tmp_path / "single", progress=False, log=lambda m: None)
    assert single.images_seen == 24
    torch.manual_seed(0)
    start = FakeDetector(random=False)
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name   # DDP keeps ranks in sync
        assert torch.allclose(ranks[0]["state"][name], value, atol=1e-6, rtol=1e-5), name
        assert not torch.equal(value, start.state_dict()[name]), name                 # training moved it

    # evaluation gathers every image on every rank; only rank 0 wrote checkpoints (same files as one process)
    assert ranks[0]["num_detections"] == ranks[1]["num_detections"] == 10
    metrics, _ = evaluate_split(single, DetectionDataset(records, CLASSES), device=torch.device("cpu"))
    assert abs(metrics["mAP"] - ranks[0]["mAP"]) < 1e-6
    names = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "single" / "checkpoints").iterdir())
    assert names == ["ckpt_0000003.pt", "ckpt_0000006.pt", "last_checkpoint"]
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "ckpt_0000006.pt", weights_only=True)
    assert len(saved["rng"]) == 2   # every rank's RNG state, for an exact resume


# --------------------------------------------------------------------------- the real tiny Faster R-CNN

TINY = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
SHAPES = ["circle", "square", "triangle", "star", "ring"]


def _tiny_config():
    """The demo's Faster R-CNN, made exactly batch-separable so 2 x 1 image must equal 1 x 2 images.

    * ``tiny`` trunk: no BatchNorm (the demo's tiny8 normalises over each process's images, 1 instead of 2);
    * RPN: no IoU band between background and foreground, and a sample larger than the anchors: every
      anchor of every image is in the loss, so the loss is the same mean whether the ranks draw their own
      samples or one process draws them all (every image is 96 x 128: the same anchor count);
    * RoI head: likewise every RoI (32 proposals + 2 ground truths per image);
    * SGD: linear in the gradient, so float-rounding differences stay at that size (Adam's first step,
      ~lr * sign(g), would turn a rounding difference in a near-zero gradient into one of 2 lr).
    """
    return load_config(TINY, ["model.backbone.name=tiny", "pretrain.steps=0", "model.input.min_size=[96]",
                              "model.input.max_size=128", "model.input.test_min_size=96",
                              "model.rpn.bg_iou_thresh=0.7", "model.rpn.batch_size_per_image=100000",
                              "model.rpn.positive_fraction=1.0", "model.rpn.post_nms_top_n_train=32",
                              "model.roi_heads.batch_size_per_image=1000", "model.roi_heads.positive_fraction=1.0",
                              "train.optimizer=sgd", "train.lr=0.02", "train.momentum=0.9", "train.max_iter=3",
                              "train.warmup_iters=1", "train.images_per_batch=2", "train.checkpoint_period=0",
                              "train.log_period=1", "train.workers=0"])


def _shape_images(folder: Path, count: int = 4) -> list[ImageRecord]:
    """96 x 128 PNGs, two flat rectangles each (same object count: the same RoI count per image)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        image = (rng.random((96, 128, 3)) * 80).astype(np.uint8)
        boxes = np.array([[8 + 4 * i, 10, 50 + 4 * i, 60], [70, 30 + 3 * i, 120, 80 + 3 * i]], np.float32)
        for x1, y1, x2, y2 in boxes.astype(int):
            image[y1:y2, x1:x2] = rng.integers(120, 256, 3)
        path = folder / f"shape{i}.png"
        Image.fromarray(image).save(path)
        records.append(ImageRecord(f"shape{i}", path, 128, 96, boxes, np.array([i % 5, (i + 2) % 5]),
                                   np.zeros(2, bool), np.zeros(2, bool)))
    return records


def _train_tiny(records, out_dir: str):
    cfg = _tiny_config()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, class_names=SHAPES)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, DetectionDataset(records, SHAPES, train=True), cfg, out_dir=out_dir, progress=False, log=lambda m: None)
    return start, model.state_dict()


def _tiny_worker(rank: int, world: int, init_file: str, records, out_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, state = _train_tiny(records, out_dir)
        torch.save(state, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_processes_train_the_real_tiny_detector_as_one(tmp_path):
    # Catches DDP not averaging the gradients (a rank would keep its own half-batch gradient), ranks
    # training on the same images instead of their halves of the global batch, and a loss normalised per
    # process instead of per global batch.
    records = _shape_images(tmp_path / "images")
    (tmp_path / "results").mkdir()
    mp.spawn(_tiny_worker, args=(2, str(tmp_path / "rendezvous"), records, str(tmp_path / "ddp"),
                                 str(tmp_path / "results")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "results" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, single = _train_tiny(records, str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    moved = 0.0
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name       # DDP keeps the ranks in sync
        assert torch.allclose(ranks[0][name], value, rtol=1e-4, atol=1e-6), name
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-3                                                 # 3 steps moved the weights


def test_single_process_helpers_need_no_process_group():
    assert not distributed.is_distributed()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    model = FakeDetector()
    assert distributed.wrap_for_training(model, torch.device("cpu")) == model.loss
    wrapped = distributed.LossForward(model)
    assert set(wrapped(*_one_batch())) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in model.parameters())


def _one_batch():
    image = torch.rand(3, 20, 30)
    return [image], [{"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])}]
