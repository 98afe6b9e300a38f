"""DistributedDataParallel on CPU (gloo): 2 processes give the weights of 1 process with the same global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detect import distributed
from detect.data.loader import DetectionDataset
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
