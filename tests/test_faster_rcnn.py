"""Faster R-CNN (Detector with an RPN): the public API, bad input, empty images, odd sizes, training stages, flipping, overfitting."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detect import build_model, load_config
from detect.errors import ConfigError, DatasetError
from detect.alternating import ALTERNATING_STEPS, apply_alternating_step, apply_joint_training, parameter_groups
from detect.transforms import DetectionTransform, hflip
from detect.utils.modes import eval_mode
from tests.head_helpers import head_detections

TINY = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
LOSS_NAMES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(TINY, overrides=["model.num_classes=3", "model.input.min_size=[128]", "model.input.max_size=200",
                                       "model.input.test_min_size=128"])
    return build_model(cfg)


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 120, 90, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 10.0, 140.0, 50.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 80.0, 110.0]]), "labels": torch.tensor([1])}]
    return images, targets


def test_loss_names_values_and_gradients(model):
    model.train()
    images, targets = batch()
    losses = model.loss(images, targets)
    assert set(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_cls"].item() == pytest.approx(math.log(4.0), abs=0.1)     # untrained: ~uniform over C+1
    model.zero_grad()
    sum(losses.values()).backward()
    assert model.proposals.head.cls_logits.weight.grad.abs().sum() > 0
    assert model.head.predictor.bbox_pred.weight.grad.abs().sum() > 0
    assert model.backbone.trunk[0][0].weight.grad.abs().sum() > 0


@pytest.fixture
def accept_all(model):
    """An untrained model scores everything alike: accept every detection so there are boxes to compare."""
    old = model.head.score_thresh
    model.head.score_thresh = 0.0
    yield model
    model.head.score_thresh = old


def test_predict_returns_boxes_in_input_pixels(accept_all):
    model = accept_all
    images, _ = batch()
    dets = model.predict(images)
    assert model.training      # predict restores the mode
    assert len(dets) == 2
    for det, image in zip(dets, images):
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] > 0
        assert det["labels"].dtype == torch.int64 and int(det["labels"].max()) < 3
        assert det["boxes"][:, 2].max() <= image.shape[2] + 1e-3 and det["boxes"][:, 3].max() <= image.shape[1] + 1e-3


def test_boxes_scale_back_to_the_input_image(accept_all):
    # Catches boxes left in the network's pixels, or scaled by the wrong ratio or axis.
    model = accept_all
    g = torch.Generator().manual_seed(1)
    # 128 x 192 is already the network's size (test_min_size 128); the 2x nearest-neighbour enlargement
    # is shrunk back by 0.5 to exactly the same network input, so its detections are the same at 2x.
    small = torch.rand(3, 128, 192, generator=g)
    large = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    at_1x, at_2x = model.predict([small])[0], model.predict([large])[0]
    assert len(at_1x["boxes"]) > 0 and torch.equal(at_1x["labels"], at_2x["labels"])
    assert torch.equal(at_1x["scores"], at_2x["scores"])
    assert torch.allclose(at_2x["boxes"], 2 * at_1x["boxes"], atol=1e-3)
    # 90 x 125 goes in at 128 x 177: the axes scale by 90/128 and 125/177, which differ
    image = torch.rand(3, 90, 125, generator=g)
    with torch.no_grad(), eval_mode(model):
        net, _ = model.transform([image])
        assert net.image_sizes == [(128, 177)]
        features = model.backbone(net.tensor)
        proposals, _ = model.proposals.predict(features, net.image_sizes)
        internal = head_detections(model.head, features, proposals, net.image_sizes)[0]
    det = model.predict([image])[0]
    assert len(det["boxes"]) > 0 and torch.equal(det["scores"], internal["scores"])
    expected = internal["boxes"] * torch.tensor([125 / 177, 90 / 128, 125 / 177, 90 / 128])
    assert torch.allclose(det["boxes"], expected, atol=1e-4)


def test_image_without_objects_trains(model):
    images, targets = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model.loss(images, empty)
    assert losses["loss_box"].item() == 0 and losses["loss_rpn_box"].item() == 0
    assert math.isfinite(losses["loss_cls"].item()) and losses["loss_cls"].item() > 0
    assert math.isfinite(losses["loss_rpn_cls"].item()) and losses["loss_rpn_cls"].item() > 0
    sum(losses.values()).backward()


def test_tiny_and_elongated_images_work(model):
    images = [torch.rand(3, 7, 9), torch.rand(3, 12, 600)]
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 6.0, 5.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[100.0, 2.0, 180.0, 11.0]]), "labels": torch.tensor([1])}]
    losses = model.loss(images, targets)
    assert all(math.isfinite(v.item()) for v in losses.values())
    # Catches boxes of extreme sizes left in the network's pixels (9 x 7 is enlarged ~18x, 12 x 600 shrunk)
    model.head.score_thresh, old = 0.0, model.head.score_thresh
    try:
        dets = model.predict(images)
    finally:
        model.head.score_thresh = old
    assert len(dets) == 2
    for det, image in zip(dets, images):
        boxes, (height, width) = det["boxes"], image.shape[1:]
        assert len(boxes) > 0 and (boxes >= 0).all()
        assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()


def test_bad_input_is_named(model):
    images, targets = batch()
    with pytest.raises(ValueError, match=r"images\[1\].*\(3, H, W\)"):
        model.predict([images[0], torch.rand(1, 50, 50)])
    with pytest.raises(ValueError, match=r"images\[0\].*dtype"):
        model.loss([(images[0] * 255).to(torch.uint8)], targets[:1])     # training takes float images only
    with pytest.raises(ValueError, match=r"images\[0\]: expected a tensor, got dict"):
        model.predict([{"not": "an image"}])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\].*label 3"):
        model.loss(images, [targets[0], {"boxes": targets[1]["boxes"], "labels": torch.tensor([3])}])
    with pytest.raises(DatasetError, match=r"targets\[0\]\['boxes'\].*#1.*no area"):
        bad = torch.tensor([[10.0, 20.0, 60.0, 80.0], [70.0, 10.0, 70.0, 50.0]])
        model.loss(images, [{"boxes": bad, "labels": torch.tensor([0, 1])}, targets[1]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\].*\(N, 4\)"):
        model.loss(images, [{"boxes": torch.zeros(2, 5), "labels": torch.tensor([0, 1])}, targets[1]])
    with pytest.raises(ValueError, match="2 dicts"):
        model.loss(images, targets[:1])


def test_build_needs_a_class_count():
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(load_config(None, overrides=["model.backbone.name=tiny", "model.backbone.weights=none"]))
    cfg = load_config(TINY)
    assert build_model(cfg).class_names == ["circle", "square", "triangle", "star", "ring"]
    assert build_model(cfg, class_names=["a", "b"]).num_classes == 2
    with pytest.raises(ConfigError, match="num_classes=3"):
        build_model(load_config(TINY, overrides=["model.num_classes=3"]), class_names=["a", "b"])


def test_training_stages_and_alternating_steps(model):
    images, targets = batch()
    rpn_only = model.loss(images, targets, stage="rpn")
    assert rpn_only["loss_cls"].item() == 0 and rpn_only["loss_rpn_cls"].item() > 0
    head_only = model.loss(images, targets, stage="head")
    assert head_only["loss_rpn_cls"].item() == 0 and head_only["loss_cls"].item() > 0
    external = [torch.tensor([[10.0, 20.0, 60.0, 80.0]]), torch.tensor([[0.0, 0.0, 50.0, 50.0]])]
    with_props = model.loss(images, targets, stage="head", proposals=external)
    assert with_props["loss_cls"].item() > 0
    groups = parameter_groups(model)
    try:
        for spec in ALTERNATING_STEPS:
            assert apply_alternating_step(model, spec.step) is spec
            for name, params in groups.items():
                assert all(p.requires_grad == (name in spec.trains) for p in params)
        assert [s.stage for s in ALTERNATING_STEPS] == ["rpn", "head", "rpn", "head"]
        assert ALTERNATING_STEPS[2].trains == ("rpn",) and ALTERNATING_STEPS[3].trains == ("head",)
    finally:
        apply_joint_training(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage"):
        model.loss(images, targets, stage="both")


def test_transform_resizes_pads_and_draws_scales():
    t = DetectionTransform(min_size=(100, 200), max_size=300, test_min_size=150, size_divisibility=32)
    image = torch.rand(3, 50, 120)
    batch_, _ = t([image])
    # test: shorter side 150 would make the longer 360 > 300, so the scale is 300 / 120
    assert batch_.image_sizes == [(125, 300)] and batch_.tensor.shape[-2:] == (128, 320)
    seen = {t([image], training=True)[0].image_sizes[0] for _ in range(30)}
    assert seen == {(100, 240), (125, 300)}                   # 200 would give 480 > 300: capped at 300
    boxes = torch.tensor([[10.0, 5.0, 60.0, 40.0]])
    out, targets = t([image], [{"boxes": boxes, "labels": torch.tensor([0])}])
    back = t.boxes_to_input(targets[0]["boxes"], out.image_sizes[0], out.original_sizes[0])
    assert torch.allclose(back, boxes, atol=1e-4)


def test_hflip_moves_boxes_with_pixels():
    image = torch.zeros(3, 4, 10)
    image[:, 1:3, 1:4] = 1.0
    flipped, boxes = hflip(image, torch.tensor([[1.0, 1.0, 4.0, 3.0]]))
    assert boxes.tolist() == [[6.0, 1.0, 9.0, 3.0]] and type(boxes) is torch.Tensor
    assert flipped[0, 1:3, 6:9].sum() == 6 and flipped.sum() == image.sum()


def _records_and_images(root, class_names):
    from detect.data.image import read_image
    from detect.data.voc import VOCDataset

    records = []
    for split in ("trainval", "test"):
        records += VOCDataset(root, split, classes=class_names).records
    images = [torch.from_numpy(np.ascontiguousarray(read_image(r.path))).permute(2, 0, 1).float() / 255 for r in records]
    return records, images


@pytest.fixture
def one_thread():
    """One intra-op thread: deterministic, and immune to OpenMP spin-waiting on a busy machine
    (with 2 threads on 2 loaded cores the same training took ~4x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_synthetic_overfits_eight_images(tmp_path, one_thread):
    from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
    from detect.evaluation import evaluate_voc

    start = time.perf_counter()
    torch.manual_seed(0)
    root = generate_synthetic(tmp_path / "syn", num_images=8, seed=0, empty_fraction=0.0)
    names = list(SYNTHETIC_CLASSES)
    records, images = _records_and_images(root, names)
    assert len(records) == 8
    targets = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels)} for r in records]
    model = build_model(load_config(TINY), class_names=names).train()
    iters = 400
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=iters, pct_start=0.1)
    for _ in range(iters):
        pick = torch.randperm(8)[:2].tolist()
        losses = model.loss([images[i] for i in pick], [targets[i] for i in pick])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
    detections = {}
    for record, image in zip(records, images):
        det = model.predict([image])[0]
        detections[record.image_id] = {k: v.numpy() for k, v in det.items()}
    result = evaluate_voc(records, detections, names, metric="voc07")
    print(f"overfit: mAP {result['mAP']:.3f} in {time.perf_counter() - start:.0f} s; {result['per_class']}")
    assert result["mAP"] >= 0.95


@pytest.mark.parametrize("backbone", ["tiny8", "resnet18"])
def test_prepare_for_inference_keeps_detections(backbone):
    torch.manual_seed(0)
    cfg = load_config(TINY, overrides=["model.num_classes=3", "model.input.min_size=[128]", "model.input.max_size=200",
                                       "model.input.test_min_size=128", f"model.backbone.name={backbone}",
                                       "model.rpn.channels=64", "model.roi_heads.score_thresh=0.0"])
    model = build_model(cfg)
    images, targets = batch()
    model.train()
    with torch.no_grad():
        for _ in range(2):                 # BatchNorm statistics away from their initial (0, 1)
            model.loss(images, targets)
    before = model.predict(images)
    model.prepare_for_inference()
    after = model.predict(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # An fc head's 1x1 convolutions read the pooled features as they are; ResNet's res5 head goes channels-last.
    head_convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert head_convs
    spatial = [m for m in head_convs if m.kernel_size != (1, 1)]    # 1x1 weights look the same in both layouts
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in spatial)
    assert bool(spatial) == (backbone == "resnet18")
    for b, a in zip(before, after):
        assert len(b["scores"]) > 0 and torch.equal(b["labels"], a["labels"])
        assert torch.allclose(b["scores"], a["scores"], atol=1e-4)
        assert torch.allclose(b["boxes"], a["boxes"], atol=1e-2)
