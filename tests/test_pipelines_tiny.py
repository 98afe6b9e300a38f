"""The tiny_synthetic Fast R-CNN and R-CNN train end to end on the CPU and reach a mAP (overfitting 8 images).

Both read selective-search boxes from a proposal store filled here; R-CNN runs all
four stages (fine-tuning, feature cache, SVMs, box regression). The third pipeline,
Faster R-CNN's tiny_synthetic, is trained the same way in
``tests/test_faster_rcnn.py::test_tiny_synthetic_overfits_eight_images``.
"""

import time
from pathlib import Path

import pytest
import torch

from detect import build_model, load_config
from detect.data.image import read_image
from detect.data.loader import image_to_tensor
from detect.evaluation import evaluate_voc
from detect.transforms import hflip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
    from detect.data.voc import VOCDataset

    tmp = tmp_path_factory.mktemp("pipelines")
    root = generate_synthetic(tmp / "syn", num_images=8, seed=0, empty_fraction=0.0)
    names = list(SYNTHETIC_CLASSES)
    records = VOCDataset(root, "train", classes=names).records + VOCDataset(root, "val", classes=names).records \
        + VOCDataset(root, "test", classes=names).records
    images = [image_to_tensor(read_image(r.path)) for r in records]
    return {"root": root, "tmp": tmp, "names": names, "records": records, "images": images}


def _config(path, data, extra=()):
    overrides = ["data.format=voc", f"data.root={data['root']}", f"proposals.store={data['tmp'] / 'store'}", "data.train_split=trainval",
                 *extra]
    return load_config(path, overrides)


def _fill_stores(cfg):
    from detect.proposal_sources import ensure_stored_proposals

    for split in ("trainval", "test"):
        ensure_stored_proposals(cfg, split)


def _train(model, data, iters, lr, seed=0):
    """Adam on random pairs of images, each flipped with probability 1/2 (ids and flips ride in the targets)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iters, pct_start=0.1)
    model.train()
    n = len(data["records"])
    for _ in range(iters):
        images, targets = [], []
        for i in torch.randperm(n)[:2].tolist():
            record, image = data["records"][i], data["images"][i]
            boxes, flip = torch.from_numpy(record.boxes), bool(torch.rand(()) < 0.5)
            if flip:
                image, boxes = hflip(image, boxes)
            images.append(image)
            targets.append({"boxes": boxes, "labels": torch.from_numpy(record.labels), "image_id": record.image_id,
                            "flipped": flip})
        losses = model.loss(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()


def _map(model, data, **kwargs):
    detections = {}
    for record, image in zip(data["records"], data["images"]):
        det = model.predict([image], **({"image_ids": [record.image_id]} if kwargs.get("ids", True) else {}))[0]
        detections[record.image_id] = {k: v.numpy() for k, v in det.items()}
    return evaluate_voc(data["records"], detections, data["names"], metric="voc07")["mAP"]


def test_fast_rcnn_tiny_synthetic_trains_end_to_end(data):
    from detect.fast_rcnn import FastRCNN

    start = time.perf_counter()
    cfg = _config(CONFIGS / "fast_rcnn" / "tiny_synthetic.yaml", data, ["model.input.min_size=[192]",
                                                                        "model.input.test_min_size=192",
                                                                        "model.roi_heads.batch_size_per_image=128"])
    _fill_stores(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"])
    assert isinstance(model, FastRCNN)
    _train(model, data, iters=200, lr=2e-3)
    result = _map(model, data)
    print(f"fast_rcnn tiny: mAP {result:.3f} in {time.perf_counter() - start:.0f} s")
    assert result >= 0.6


def test_rcnn_tiny_synthetic_runs_all_four_stages(data, tmp_path):
    from detect.feature_cache import FeatureCache
    from detect.rcnn import RCNN
    from detect.rcnn_training import cache_fingerprint, extract_features, fit_regression_stage, fit_svm_stage

    start = time.perf_counter()
    # 32x32 warps (config: 64) keep the per-region CNN cheap enough for a unit test
    cfg = _config(CONFIGS / "rcnn" / "tiny_synthetic.yaml", data, ["rcnn.crop_size=32", "rcnn.context_padding=2"])
    _fill_stores(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"])
    assert isinstance(model, RCNN)
    _train(model, data, iters=120, lr=3e-3)                           # stage 1: fine-tuning
    softmax_map = _map(model, data)
    cache = FeatureCache(tmp_path / "features", fingerprint=cache_fingerprint(model, cfg))
    ids = [r.image_id for r in data["records"]]
    done = extract_features(model, data["records"], cache, log=lambda m: None)      # stage 2
    assert done["computed"] == len(ids) and not done["failed"]
    assert extract_features(model, data["records"], cache, log=lambda m: None)["skipped"] == len(ids)  # resumes
    svms = fit_svm_stage(model, cache, ids, cfg, log=lambda m: None)                 # stage 3
    assert svms.fitted.all()
    svm_map = _map(model, data)
    fit_regression_stage(model, cache, ids, cfg, log=lambda m: None)                  # stage 4
    assert model.box_regressor.fitted.any()
    final_map = _map(model, data)
    print(f"rcnn tiny: softmax mAP {softmax_map:.3f}, SVM {svm_map:.3f}, SVM + bbox reg {final_map:.3f} "
          f"in {time.perf_counter() - start:.0f} s")
    assert final_map >= 0.45


def _tool_sets(tmp_path):
    sets = [f"data.root={tmp_path / 'synth'}", "data.synthetic_images=6", "train.max_iter=2", "train.eval_period=0", "pretrain.steps=0",
            "train.images_per_batch=2", "train.workers=0", "train.warmup_iters=1", "train.log_period=1",
            "model.input.min_size=[128]", "model.input.test_min_size=128", f"proposals.store={tmp_path / 'store'}",
            "proposals.mode=single", "fast_rcnn.compute_missing=true", "rcnn.compute_missing=true",
            "rcnn.crop_size=32", "rcnn.context_padding=2"]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("pipeline", ["fast_rcnn", "rcnn"])
def test_train_test_and_demo_tools_take_the_pipeline_from_the_config(pipeline, tmp_path, capsys):
    import json

    from detect.checkpoint import load_checkpoint
    from detect.cli import demo, test as test_cli, train

    out = tmp_path / "run"
    assert train.main(["--config", str(CONFIGS / pipeline / "tiny_synthetic.yaml"), "--out", str(out), "--no-progress",
                       *_tool_sets(tmp_path)]) == 0
    assert load_checkpoint(out / "model_final.pt")["config"]["model"]["pipeline"] == pipeline
    assert test_cli.main(["--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "test"),
                          "--no-progress"]) == 0
    report = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert 0.0 <= report["metrics"]["voc07"]["mAP"] <= 1.0
    assert set(report["speed"]["stage_seconds_per_image"]) >= {"proposals", "features", "heads"}
    images = tmp_path / "synth" / "JPEGImages"
    assert demo.main(["--checkpoint", str(out), "--images", str(images), "--out", str(tmp_path / "demo"),
                      "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "demo" / "detections.json").read_text())["images"]) == 6


def test_train_rcnn_tool_runs_the_four_stages(tmp_path, capsys):
    from detect.checkpoint import model_from_checkpoint
    from detect.cli import train_rcnn

    out = tmp_path / "rcnn"
    args = ["--config", str(CONFIGS / "rcnn" / "tiny_synthetic.yaml"), "--out", str(out), "--no-progress",
            *_tool_sets(tmp_path)]
    assert train_rcnn.main(args) == 0
    printed = capsys.readouterr().out
    assert "stage 3/4" in printed and "VOC07 mAP on 'test'" in printed
    model, _, _ = model_from_checkpoint(out / "model_final.pt")
    assert model.svm.trained and model.box_regressor.weight.shape[-1] == 128 * 7 * 7
    # stages 2-4 again from the fine-tuned weights: the cache is reused (same weights, same proposals)
    again = ["--stages", "features,svm", "--checkpoint", str(out / "finetune" / "model_final.pt"), "--no-test"]
    assert train_rcnn.main(args + again) == 0
    assert "0 computed, " in capsys.readouterr().out
    assert train_rcnn.main(args + ["--stages", "svm", "--no-test"]) == 2     # no fine-tuned model given
