"""The tiny_synthetic Fast R-CNN and R-CNN train end to end on the CPU and reach a mAP (overfitting 8 images).

Both read selective-search boxes from a proposal store filled here; R-CNN runs all
four stages (fine-tuning, feature cache, SVMs, box regression). The third pipeline,
Faster R-CNN's tiny_synthetic, is trained the same way in
``tests/test_faster_rcnn.py::test_tiny_synthetic_overfits_eight_images``.
"""

import time
from pathlib import Path

import numpy as np
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


def _detect(model, data):
    detections = {}
    for record, image in zip(data["records"], data["images"]):
        det = model.predict([image], image_ids=[record.image_id])[0]
        detections[record.image_id] = {k: v.numpy() for k, v in det.items()}
    return detections


def _map(model, data, detections=None):
    detections = detections or _detect(model, data)
    return evaluate_voc(data["records"], detections, data["names"], metric="voc07")["mAP"]


def _all(detections, key):
    return np.concatenate([d[key] for d in detections.values()])


def _hit_iou(detections, data):
    """Mean IoU of the detections that hit a ground-truth box of their class (IoU >= 0.5) with that box."""
    from torchvision.ops import box_iou

    hits = []
    for record in data["records"]:
        det = detections[record.image_id]
        iou = box_iou(torch.from_numpy(det["boxes"]), torch.from_numpy(record.boxes).float())
        iou[torch.from_numpy(det["labels"])[:, None] != torch.from_numpy(record.labels)[None]] = 0
        best = iou.max(dim=1).values if iou.numel() else iou.new_zeros(0)
        hits.append(best[best >= 0.5])
    return float(torch.cat(hits).mean())


def test_fast_rcnn_tiny_synthetic_trains_end_to_end(data):
    from detect.proposal_sources import ExternalProposals
    from detect.roi_heads import RoIHead

    start = time.perf_counter()
    cfg = _config(CONFIGS / "fast_rcnn" / "tiny_synthetic.yaml", data, ["model.input.min_size=[192]",
                                                                        "model.input.test_min_size=192",
                                                                        "model.roi_heads.batch_size_per_image=128"])
    _fill_stores(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"])
    assert isinstance(model.proposals, ExternalProposals) and isinstance(model.head, RoIHead)
    _train(model, data, iters=200, lr=2e-3)
    result = _map(model, data)
    print(f"fast_rcnn tiny: mAP {result:.3f} in {time.perf_counter() - start:.0f} s")
    assert result >= 0.6


def test_rcnn_tiny_synthetic_runs_all_four_stages(data, tmp_path):
    from detect.feature_cache import FeatureCache
    from detect.rcnn import WarpHead
    from detect.rcnn_training import cache_fingerprint, extract_features, fit_regression_stage, fit_svm_stage

    start = time.perf_counter()
    # 32x32 warps (config: 64) keep the per-region CNN cheap enough for a unit test
    cfg = _config(CONFIGS / "rcnn" / "tiny_synthetic.yaml", data, ["rcnn.crop_size=32", "rcnn.context_padding=2"])
    _fill_stores(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"])
    assert isinstance(model.head, WarpHead) and not model.transform.resize
    _train(model, data, iters=120, lr=3e-3)                           # stage 1: fine-tuning
    softmax_det = _detect(model, data)
    softmax_map = _map(model, data, softmax_det)
    cache = FeatureCache(tmp_path / "features", fingerprint=cache_fingerprint(model, cfg))
    ids = [r.image_id for r in data["records"]]
    done = extract_features(model, data["records"], cache, log=lambda m: None)      # stage 2
    assert done["computed"] == len(ids) and not done["failed"]
    assert extract_features(model, data["records"], cache, log=lambda m: None)["skipped"] == len(ids)  # resumes
    svms = fit_svm_stage(model, cache, ids, cfg, log=lambda m: None)                 # stage 3
    assert svms.fitted.all()
    svm_det = _detect(model, data)
    svm_map = _map(model, data, svm_det)
    fit_regression_stage(model, cache, ids, cfg, log=lambda m: None)                  # stage 4
    assert model.head.box_regressor.fitted.any()
    final_det = _detect(model, data)
    final_map = _map(model, data, final_det)
    print(f"rcnn tiny: softmax mAP {softmax_map:.3f}, SVM {svm_map:.3f}, SVM + bbox reg {final_map:.3f} "
          f"in {time.perf_counter() - start:.0f} s")
    # Measured: softmax 0.542, SVM 0.520-0.551 over 6 runs (LinearSVC unseeded then), SVM + bbox reg the
    # same. Planted faults fall below 0.45: softmax columns in the wrong class order (softmax 0.12), SVM
    # detectors loaded for the wrong classes (SVM 0.085).
    assert softmax_map >= 0.45 and svm_map >= 0.45 and final_map >= 0.45
    # Stage 3 replaces the softmax by SVM margins (a model that kept scoring with the softmax reached 0.542
    # too); stage 4 moves the boxes and, fitted on these images, does not push hits off their objects
    # (mean IoU of the hits 0.782 -> 0.781; deltas decoded with the wrong sign: 0.720).
    assert (_all(softmax_det, "scores") > 0.05).all() and (_all(svm_det, "scores") < 0).any()
    assert not np.array_equal(_all(svm_det, "boxes"), _all(final_det, "boxes"))
    assert final_map >= svm_map - 0.05 and _hit_iou(final_det, data) >= _hit_iou(svm_det, data) - 0.03


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

    from detect.build import model_from_checkpoint
    from detect.checkpoint import load_checkpoint
    from detect.cli import demo, test as test_cli, train
    from detect.data.voc import VOCDataset

    out = tmp_path / "run"
    # tools/train.py runs R-CNN's four stages: SVMs from 2 fine-tuning steps score nothing on the one test
    # image, so R-CNN is tested on its training images (a non-zero mAP to compare)
    split = "test" if pipeline == "fast_rcnn" else "trainval"
    assert train.main(["--config", str(CONFIGS / pipeline / "tiny_synthetic.yaml"), "--out", str(out), "--no-progress",
                       *_tool_sets(tmp_path), "--set", f"test.split={split}"]) == 0
    assert load_checkpoint(out / "model_final.pt")["config"]["model"]["pipeline"] == pipeline
    assert test_cli.main(["--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "test"),
                          "--no-progress"]) == 0
    report = json.loads((tmp_path / "test" / "metrics.json").read_text())
    # the tool's number is the checkpoint's model, rebuilt from its config, on the test split's stored
    # proposals (measured after 2 iterations: 0.222 Fast R-CNN on the 1 test image, R-CNN on trainval below)
    model, _, _ = model_from_checkpoint(out / "model_final.pt")
    records = VOCDataset(tmp_path / "synth", split, classes=model.class_names).records
    detections = {r.image_id: {k: v.numpy() for k, v in
                               model.predict([image_to_tensor(read_image(r.path))], image_ids=[r.image_id])[0].items()}
                  for r in records}
    expected = evaluate_voc(records, detections, model.class_names, metric="voc07")["mAP"]
    assert expected > 0 and report["metrics"]["voc07"]["mAP"] == pytest.approx(expected, abs=1e-9)
    assert set(report["speed"]["stage_seconds_per_image"]) >= {"features", "proposals", "head", "postprocess"}
    images = tmp_path / "synth" / "JPEGImages"
    assert demo.main(["--checkpoint", str(out), "--images", str(images), "--out", str(tmp_path / "demo"),
                      "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "demo" / "detections.json").read_text())["images"]) == 6


def test_train_rcnn_tool_runs_the_four_stages(tmp_path, capsys):
    from detect.build import model_from_checkpoint
    from detect.cli import train_rcnn

    out = tmp_path / "rcnn"
    args = ["--config", str(CONFIGS / "rcnn" / "tiny_synthetic.yaml"), "--out", str(out), "--no-progress",
            *_tool_sets(tmp_path)]
    assert train_rcnn.main(args) == 0
    printed = capsys.readouterr().out
    assert "stage 3/4" in printed and "VOC07 mAP on 'test'" in printed
    model, _, _ = model_from_checkpoint(out / "model_final.pt")
    assert model.head.svm.trained and model.head.box_regressor.weight.shape[-1] == 128 * 7 * 7
    # stages 2-4 again from the fine-tuned weights: the cache is reused (same weights, same proposals)
    again = ["--stages", "features,svm", "--checkpoint", str(out / "finetune" / "model_final.pt"), "--no-test"]
    assert train_rcnn.main(args + again) == 0
    assert "0 computed, " in capsys.readouterr().out
    assert train_rcnn.main(args + ["--stages", "svm", "--no-test"]) == 2     # no fine-tuned model given


def test_train_tool_streams_rcnn_stages_2_3_without_a_feature_cache(tmp_path, capsys):
    # rcnn.feature_cache_mode=streaming through tools/train.py: SVMs and box regressors trained, nothing cached;
    # catches the recipe ignoring the mode (a features/ folder appears) or skipping stage 4.
    from detect.build import model_from_checkpoint
    from detect.cli import train

    out = tmp_path / "rcnn"
    assert train.main(["--config", str(CONFIGS / "rcnn" / "tiny_synthetic.yaml"), "--out", str(out), "--no-progress",
                       "--no-test", *_tool_sets(tmp_path), "--set", "rcnn.feature_cache_mode=streaming"]) == 0
    assert "streamed" in capsys.readouterr().out
    assert not (out / "features").exists()
    model, _, _ = model_from_checkpoint(out / "model_final.pt")
    assert model.head.svm.trained and model.head.box_regressor.trained
