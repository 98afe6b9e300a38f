"""tools/benchmark_torchvision.py: both detectors build alike, a measurement runs, the table prints."""

import time
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from detect.cli import benchmark_torchvision as bench
from detect.data.synthetic import generate_synthetic


def test_twin_copies_weights_and_settings():
    """Catches a twin whose RPN head or anchors differ from ours (weights not copied, ratios reordered)."""
    ours, theirs, cfg = bench.build_pair("tiny", 3, ["model.input.min_size=[96]", "model.input.max_size=160"])
    assert theirs.rpn.head.cls_logits.weight.shape == ours.proposals.head.cls_logits.weight.shape
    assert torch.equal(theirs.roi_heads.box_predictor.bbox_pred.weight, ours.head.predictor.bbox_pred.weight)
    assert torch.equal(theirs.backbone.body[0][0].weight, ours.backbone.trunk[0][0].weight)
    assert theirs.roi_heads.fg_bg_sampler.batch_size_per_image == cfg.model.roi_heads.batch_size_per_image
    assert theirs.rpn._post_nms_top_n["testing"] == cfg.model.rpn.post_nms_top_n_test
    # same weights, same image: the same objectness map, so the same best proposal
    image = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(0))]
    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        batch, _ = ours.transform(image)
        features = ours.backbone(batch.tensor)
        assert torch.allclose(features, theirs.backbone(batch.tensor), atol=1e-5)
        logits, deltas = ours.proposals.head(features)                     # (N, H*W*A), (N, H*W*A, 4): anchor order
        (objectness,), (box_deltas,) = theirs.rpn.head([features])   # (N, A, H, W), (N, A*4, H, W)
        n, a, h, w = objectness.shape
        assert logits.std() > 1e-3                                   # a map with something to compare
        assert torch.allclose(logits.view(n, h, w, a).permute(0, 3, 1, 2), objectness, atol=1e-6)
        assert torch.allclose(deltas.view(n, h, w, a, 4).permute(0, 3, 4, 1, 2).reshape(n, a * 4, h, w), box_deltas,
                              atol=1e-6)
        proposals, _ = ours.proposals.predict(features, batch.image_sizes)
        (theirs_proposals,), _ = theirs.rpn(ImageList(batch.tensor, batch.image_sizes), {"0": features})
    # torchvision rounds its anchors to whole pixels (ours are exact): the boxes agree within a pixel
    assert len(proposals[0]) == len(theirs_proposals) == cfg.model.rpn.post_nms_top_n_test
    assert torch.allclose(proposals[0][:20], theirs_proposals[:20], rtol=0, atol=1.0)     # in the same order


def test_speed_measurement_and_table(tmp_path, monkeypatch):
    """Catches a wrong image count in images/s (warm-up counted, passes or batch forgotten).

    A fake clock advances 0.25 s per image the model is given, so images/s is exactly 4 when
    the count the tool divides by is the count of images timed.
    """
    root = generate_synthetic(tmp_path / "syn", num_images=3, seed=0, empty_fraction=0.0)
    clock = {"now": 0.0, "seen": set()}

    def counting(method):
        def call(images, *rest, **kwargs):
            clock["now"] += 0.25 * len(images)
            clock["seen"].update(id(im) for im in images)
            return method(images, *rest, **kwargs)
        return call

    def build_pair(*args, **kwargs):
        ours, theirs, cfg = real_build_pair(*args, **kwargs)
        ours.predict, ours.loss, theirs.forward = counting(ours.predict), counting(ours.loss), counting(theirs.forward)
        return ours, theirs, cfg

    real_build_pair = bench.build_pair
    monkeypatch.setattr(bench, "build_pair", build_pair)
    fake_time = SimpleNamespace(perf_counter=lambda: clock["now"], process_time=time.process_time)
    monkeypatch.setattr(bench, "time", fake_time)
    rows = []
    for model in ("ours", "torchvision"):
        for phase in ("inference", "train"):
            clock["seen"] = set()
            spec = dict(setting="tiny", model=model, phase=phase, root=str(root), images=2, passes=2, batch=2,
                        device="cpu", threads=1, overrides=["model.input.max_size=160"], size=96)
            result = bench.measure(spec)
            assert result["images_per_s"] == pytest.approx(4.0), (model, phase)
            assert len(clock["seen"]) == 2 and result["peak_mb"] > 10         # both images given were used
            rows.append(["tiny", f"{model} {phase}", f"{result['images_per_s']:.2f}", "1", "1x"])
    text = bench.table(rows, "header")
    assert text.count("\n| tiny |") == 4 and "ours / torchvision" in text
    assert "| tiny | ours inference | 4.00 |" in text


def test_accuracy_rows_average_seeds_and_count_wins():
    runs = [dict(iterations=10, ours=0.8, torchvision=0.7, ours_minutes=1.0, torchvision_minutes=2.0),
            dict(iterations=10, ours=0.6, torchvision=0.65, ours_minutes=3.0, torchvision_minutes=2.0)]
    mAP, minutes = bench.accuracy_rows("tiny on x", runs)
    assert mAP[2].startswith("0.7000 (0.800, 0.600)") and mAP[3].startswith("0.6750 (0.700, 0.650)")
    assert mAP[4] == f"{0.7 / 0.675:.2f}x, ours >= in 1/2" and "mean of 2 seeds" in mAP[1]
    assert minutes[2:] == ["2.0", "2.0", "1.00x"]
    single, _ = bench.accuracy_rows("tiny on x", runs[:1])
    assert single[2] == "0.8000" and single[4] == f"{0.8 / 0.7:.2f}x"


def test_accuracy_mode_rejects_bad_seeds(tmp_path):
    args = bench.parse_args(["--mode", "accuracy", "--seeds", "1,x", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds"):
        bench.accuracy(args, "tiny")
    args = bench.parse_args(["--mode", "accuracy", "--seeds", "0", "--data-root", str(tmp_path)])
    assert bench.accuracy(args, "tiny") == []          # no dataset there: skipped, nothing measured


@pytest.mark.parametrize("amp", [False, True])
def test_speed_training_steps_run_under_bf16_autocast_with_amp(tmp_path, monkeypatch, amp):
    """Catches --amp not reaching the training step (or autocast left on without it), for both detectors."""
    root = generate_synthetic(tmp_path / "syn", num_images=3, seed=0, empty_fraction=0.0)
    seen = []

    def recording(method):
        def call(*args, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return method(*args, **kwargs)
        return call

    def build_pair(*args, **kwargs):
        ours, theirs, cfg = real_build_pair(*args, **kwargs)
        ours.loss, theirs.forward = recording(ours.loss), recording(theirs.forward)
        return ours, theirs, cfg

    real_build_pair = bench.build_pair
    monkeypatch.setattr(bench, "build_pair", build_pair)
    for model in ("ours", "torchvision"):
        seen.clear()
        spec = dict(setting="tiny", model=model, phase="train", root=str(root), images=2, passes=1, batch=2,
                    device="cpu", threads=1, overrides=["model.input.max_size=160"], size=96, amp=amp)
        assert bench.measure(spec)["images_per_s"] > 0
        assert seen and all(s == amp for s in seen), model
