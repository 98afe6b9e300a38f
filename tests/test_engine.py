"""The training loop with a tiny fake detector: schedule, resume equality, non-finite losses, clipping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.engine_fakes import CLASSES, FakeDetector, ScriptedValidation, fake_config, fake_dataset

from detect.checkpoint import load_checkpoint
from detect.config import load_config
from detect.data.loader import DetectionDataset, GroupedBatchSampler, eval_loader
from detect.engine import TrainingDiverged, build_optimizer, evaluate, fit, lr_factor, resolve_schedule
from detect.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fake_dataset(tmp_path_factory.mktemp("images"))


def _train(images, out, *, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = FakeDetector()
    cfg = kwargs.pop("cfg", None) or fake_config()
    result = fit(model, images, cfg, out_dir=out, progress=False, log=kwargs.pop("log", lambda m: None), **kwargs)
    return model, result


def test_lr_schedule_warmup_steps_and_cosine():
    cfg = fake_config(lr=0.1, warmup_iters=10, warmup_factor=0.1, steps=[20, 30], gamma=0.5, max_iter=40)
    sched = resolve_schedule(cfg.train, iters_per_epoch=5)
    assert lr_factor(0, cfg.train, sched) == pytest.approx(0.1)
    assert lr_factor(5, cfg.train, sched) == pytest.approx(0.55)
    assert lr_factor(10, cfg.train, sched) == 1.0
    assert lr_factor(25, cfg.train, sched) == 0.5
    assert lr_factor(35, cfg.train, sched) == 0.25
    cfg.train.schedule = "cosine"
    assert lr_factor(20, cfg.train, sched) == pytest.approx(0.5)
    assert lr_factor(40, cfg.train, sched) == pytest.approx(0.0, abs=1e-12)


def test_schedule_in_epochs_converts_to_iterations():
    cfg = fake_config(schedule_unit="epoch", max_iter=4, steps=[3], checkpoint_period=2, eval_period=1)
    sched = resolve_schedule(cfg.train, iters_per_epoch=6)
    assert (sched.max_iter, sched.steps, sched.checkpoint_period, sched.eval_period) == (24, [18], 12, 6)


def test_optimizer_gives_biases_their_own_lr_and_no_decay():
    cfg = fake_config(lr=0.01, weight_decay=0.001, bias_lr_factor=2.0, bias_weight_decay=False)
    model = FakeDetector()
    model.obj.weight.requires_grad_(False)
    opt = build_optimizer(model, cfg.train)
    weights, biases = opt.param_groups
    assert (weights["lr"], weights["weight_decay"], weights["momentum"]) == (0.01, 0.001, 0.9)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    assert all(p is not model.obj.weight for g in opt.param_groups for p in g["params"])
    assert len(weights["params"]) + len(biases["params"]) == 7


def test_adamw_optimizer_keeps_the_bias_groups_and_uses_momentum_as_beta1():
    cfg = fake_config(optimizer="adamw", lr=0.001, momentum=0.8, weight_decay=0.01, bias_lr_factor=1.0)
    opt = build_optimizer(FakeDetector(), cfg.train)
    assert isinstance(opt, torch.optim.AdamW)
    weights, biases = opt.param_groups
    assert (weights["lr"], weights["weight_decay"], weights["betas"]) == (0.001, 0.01, (0.8, 0.999))
    assert (biases["lr"], biases["weight_decay"]) == (0.001, 0.0)


def test_fit_writes_checkpoints_metrics_and_lowers_the_loss(images, tmp_path):
    cfg = fake_config(max_iter=30, steps=[25], checkpoint_period=10, keep_checkpoints=2, log_period=10)
    _, result = _train(images, tmp_path, cfg=cfg)
    assert result["iteration"] == 30 and not result["stopped"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["ckpt_0000020.pt", "ckpt_0000030.pt"]   # the last K=2
    assert (tmp_path / "checkpoints" / "last_checkpoint").read_text().strip() == "ckpt_0000030.pt"
    assert (tmp_path / "model_final.pt").is_file()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [10, 20, 30]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["lr"] == pytest.approx(0.005)
    assert all(r["images_per_s"] > 0 for r in lines)


def test_tensorboard_events_hold_the_logged_metrics(images, tmp_path):
    """The [dev] extra installs tensorboard, so the run folder gets event files with the metrics.jsonl values
    (catches a writer that is never created, loses scalars, or logs them under another step)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = fake_config(max_iter=20, checkpoint_period=0, log_period=10)
    _train(images, tmp_path, cfg=cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(r["iteration"], pytest.approx(r[key], rel=1e-6)) for r in lines]


@pytest.mark.parametrize("stop_after", [4, 6])
def test_resume_after_a_kill_gives_bitwise_the_same_weights(images, tmp_path, stop_after):
    """Killed after ``stop_after`` iterations (checkpoints every 3), resumed: same weights as never stopped."""
    cfg = fake_config(max_iter=11, steps=[8], checkpoint_period=3)
    cfg.model.input.flip = True
    reference, _ = _train(images, tmp_path / "ref", cfg=cfg)
    _, first = _train(images, tmp_path / "run", cfg=cfg, stop_after=stop_after)
    assert first["stopped"] and first["iteration"] == stop_after
    messages = []
    resumed, result = _train(images, tmp_path / "run", cfg=cfg, seed=123, resume=tmp_path / "run",
                             log=messages.append)
    assert f"at iteration {3 * (stop_after // 3)}" in messages[0]
    assert result["iteration"] == 11
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # and not trivially: the weights did move
    assert not torch.equal(reference.conv.weight, FakeDetector().conv.weight)


def test_a_different_seed_changes_the_result(images, tmp_path):
    a, _ = _train(images, tmp_path / "a", cfg=fake_config(max_iter=4))
    b, _ = _train(images, tmp_path / "b", cfg=fake_config(max_iter=4, seed=1))
    assert not torch.equal(a.cls.weight, b.cls.weight)


def test_non_finite_loss_skips_the_step_and_names_the_images(images, tmp_path):
    torch.manual_seed(0)
    model = FakeDetector(nan_calls={2})
    messages = []
    cfg = fake_config(max_iter=5, checkpoint_period=0)
    fit(model, images, cfg, out_dir=tmp_path, progress=False, log=messages.append)
    nan_lines = [m for m in messages if "non-finite" in m]
    sampler = GroupedBatchSampler(images.aspect_ratios(), 2, seed=cfg.train.seed, flip=True)
    third = [images.records[i].image_id for i, _ in sampler.global_batches()[2]]
    assert len(nan_lines) == 1 and "iteration 3" in nan_lines[0] and str(third) in nan_lines[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.calls == 5


def test_too_many_non_finite_losses_in_a_row_stop_the_run(images, tmp_path):
    torch.manual_seed(0)
    model = FakeDetector(nan_calls={1, 2, 3})
    with pytest.raises(TrainingDiverged, match="3 iterations in a row"):
        fit(model, images, fake_config(max_iter=10, max_nonfinite=3), out_dir=tmp_path, progress=False,
            log=lambda m: None)


def test_gradient_clipping_bounds_the_first_update(images, tmp_path):
    clip, lr = 0.01, 0.5
    cfg = fake_config(max_iter=1, lr=lr, weight_decay=0.0, bias_lr_factor=1.0, clip_grad_norm=clip,
                      checkpoint_period=0)
    torch.manual_seed(0)
    model = FakeDetector(random=False)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(model, images, cfg, out_dir=tmp_path, progress=False, log=lambda m: None)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    # first SGD step: update = lr * clipped gradient, whose norm is exactly the clip value
    assert step.norm().item() == pytest.approx(lr * clip, rel=1e-4)


def test_unreadable_image_is_skipped_and_reported_once(images, tmp_path):
    records = list(images.records)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records[0] = type(records[0])(records[0].image_id, broken, 48, 32, records[0].boxes, records[0].labels)
    dataset = DetectionDataset(records, CLASSES, train=True)
    messages = []
    _, result = _train(dataset, tmp_path / "out", cfg=fake_config(max_iter=12, checkpoint_period=0),
                       log=messages.append)
    assert result["iteration"] == 12
    skipped = [m for m in messages if m.startswith("skipped image img000")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]


def test_evaluate_returns_every_image_and_leaves_the_rng_alone(images):
    torch.manual_seed(0)
    model = FakeDetector()
    eval_set = DetectionDataset(images.records, CLASSES)
    state = torch.get_rng_state()
    timings: dict = {}
    detections = evaluate(model, eval_loader(eval_set, batch_size=3), device=torch.device("cpu"), timings=timings)
    assert torch.equal(state, torch.get_rng_state())
    assert sorted(detections) == sorted(r.image_id for r in images.records)
    # each image's own detections under its own id (batches of 3, the last one short)
    for index in (0, 4, 11):
        image, target = eval_set[index]
        own = model.predict([image])[0]
        det = detections[target["image_id"]]
        assert det["labels"].dtype.name == "int64" and det["labels"].tolist() == own["labels"].tolist()
        np.testing.assert_allclose(det["boxes"], own["boxes"].numpy(), atol=1e-5)
        np.testing.assert_allclose(det["scores"], own["scores"].numpy(), atol=1e-6)
    assert timings["images"] == len(images) and timings["total"] > 0
    assert model.training   # mode restored


def test_fit_refuses_a_checkpoint_for_other_classes(images, tmp_path):
    _train(images, tmp_path, cfg=fake_config(max_iter=3))
    other = DetectionDataset(images.records, ["a", "b", "c"], train=True)
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="trained for classes"):
        fit(FakeDetector(["a", "b", "c"]), other, fake_config(max_iter=6), out_dir=tmp_path, resume=tmp_path,
            progress=False, log=lambda m: None)


# --------------------------------------------------------------------------- best model, early stopping


def _scripted_fit(monkeypatch, images, out, values, **kwargs):
    """A run whose validation mAPs are ``values`` (one per evaluation); returns (script, fit result)."""
    from detect import engine

    script = ScriptedValidation(values)
    monkeypatch.setattr(engine, "evaluate_split", script)
    _, result = _train(images, out, val_set=images, **kwargs)
    return script, result


def _same_weights(state: dict, other: dict) -> bool:
    return state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


def test_model_best_holds_the_weights_of_the_best_evaluation(images, tmp_path, monkeypatch):
    cfg = fake_config(max_iter=10, eval_period=2, checkpoint_period=0)
    cfg.test.metric = "coco"
    # evaluations at 2, 4, 6, 8 and at the end (10): the best is the second
    script, result = _scripted_fit(monkeypatch, images, tmp_path, [0.1, 0.3, 0.2, 0.25, 0.28], cfg=cfg)
    assert script.metrics == ["coco"] * 5                      # the config's metric, not a fixed VOC07
    best = load_checkpoint(tmp_path / "model_best.pt")
    assert best["iteration"] == 4 and best["extra"]["best"]["value"] == pytest.approx(0.3)
    assert _same_weights(best["model"], script.weights[1])
    assert not _same_weights(best["model"], script.weights[4])   # and not merely the final weights
    assert result["best"]["iteration"] == 4 and result["best_checkpoint"] == tmp_path / "model_best.pt"
    assert load_checkpoint(tmp_path / "model_final.pt")["iteration"] == 10
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [(r["iteration"], r["mAP"], r["best_mAP"]) for r in lines if r.get("split") == "val"]
    assert val == [(2, 0.1, 0.1), (4, 0.3, 0.3), (6, 0.2, 0.3), (8, 0.25, 0.3), (10, 0.28, 0.3)]


def test_the_metric_all_validates_with_voc07(images, tmp_path, monkeypatch):
    cfg = fake_config(max_iter=4, eval_period=2, checkpoint_period=0)
    cfg.test.metric = "all"
    script, _ = _scripted_fit(monkeypatch, images, tmp_path, [0.1, 0.2], cfg=cfg)
    assert script.metrics == ["voc07", "voc07"]


def test_a_resumed_run_remembers_the_best_value_and_the_patience(images, tmp_path, monkeypatch):
    """Killed at 7 (checkpoint at 6), resumed: later evaluations below the first run's best 0.5 do not replace
    model_best.pt, and the evaluations without improvement before the kill count towards the patience."""
    cfg = fake_config(max_iter=20, eval_period=2, checkpoint_period=3, early_stop_patience=3)
    first, _ = _scripted_fit(monkeypatch, images, tmp_path, [0.1, 0.5, 0.2], cfg=cfg, stop_after=7)
    # the resumed run evaluates at 8 (0.4) and 10 (0.45): three without improvement since iteration 4
    _, result = _scripted_fit(monkeypatch, images, tmp_path, [0.4, 0.45, 0.9], cfg=cfg, resume=tmp_path)
    best = load_checkpoint(tmp_path / "model_best.pt")
    assert best["iteration"] == 4 and _same_weights(best["model"], first.weights[1])
    assert result["early_stopped"] and result["iteration"] == 10
    assert result["best"] == {"metric": "voc07", "value": 0.5, "iteration": 4, "since": 3}


def test_early_stopping_ends_the_run_at_the_evaluation_that_exhausts_the_patience(images, tmp_path, monkeypatch):
    cfg = fake_config(max_iter=30, eval_period=2, checkpoint_period=5, early_stop_patience=2)
    messages = []
    # 2: 0.1, 4: 0.3 (best), 6: 0.2, 8: 0.3 (equal is no improvement) -> stop at 8; 0.9 is never reached
    script, result = _scripted_fit(monkeypatch, images, tmp_path, [0.1, 0.3, 0.2, 0.3, 0.9], cfg=cfg,
                                   log=messages.append)
    assert len(script.weights) == 4 and result["iteration"] == 8
    assert result["early_stopped"] and not result["stopped"]
    assert load_checkpoint(tmp_path / "model_final.pt")["iteration"] == 8     # a normal end: final weights saved
    assert load_checkpoint(tmp_path / "model_best.pt")["iteration"] == 4
    assert any("early stop" in m and "iteration 8" in m for m in messages)
    # without patience the same script runs to the end
    cfg.train.early_stop_patience = 0
    script, result = _scripted_fit(monkeypatch, images, tmp_path / "full", [0.1, 0.3, 0.2, 0.3] + [0.0] * 11,
                                   cfg=cfg)
    assert result["iteration"] == 30 and not result["early_stopped"] and len(script.weights) == 15


def test_a_fresh_run_does_not_keep_an_earlier_runs_best_model(images, tmp_path, monkeypatch):
    _scripted_fit(monkeypatch, images, tmp_path, [0.9, 0.8], cfg=fake_config(max_iter=4, eval_period=2))
    assert (tmp_path / "model_best.pt").is_file()
    _, result = _scripted_fit(monkeypatch, images, tmp_path, [], cfg=fake_config(max_iter=4, eval_period=0))
    assert not (tmp_path / "model_best.pt").exists() and result["best_checkpoint"] is None


# --------------------------------------------------------------------------- mixed precision on the CPU


def test_amp_on_the_cpu_trains_in_bfloat16_close_to_float32(images, tmp_path):
    """train.amp on the CPU: convolutions run in bfloat16 (no GradScaler), losses stay finite, and the first step's
    loss is that of float32 within 5%. bfloat16 keeps 8 significant bits (0.4% per rounding); through the tiny
    trunk the objectness loss moved by < 0.01% and the total by 0.003% here (2.18215 vs 2.18221) and by 1.2% with
    other images (2.4248 vs 2.3963, the box loss of a few positive RoIs whose boxes are rounded to bfloat16: ~1 px
    at 128-256 px). A missing autocast fails the dtype check; float16 or a broken loss would be far off."""
    import copy

    from detect import build_model

    overrides = ["model.input.min_size=[96]", "model.input.test_min_size=96", "model.input.max_size=160",
                 "train.log_period=1", "train.checkpoint_period=0", "train.workers=0", "train.warmup_iters=0"]
    torch.manual_seed(0)
    initial = build_model(load_config(REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml", overrides),
                          class_names=CLASSES)
    runs = {}
    for amp, steps in ((False, 1), (True, 3)):
        cfg = load_config(REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml",
                          overrides + [f"train.max_iter={steps}", f"train.amp={str(amp).lower()}"])
        model = copy.deepcopy(initial)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes = set()
        conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        torch.manual_seed(0)
        fit(model, images, cfg, out_dir=tmp_path / str(amp), progress=False, log=lambda m: None)
        lines = [json.loads(line) for line in (tmp_path / str(amp) / "metrics.jsonl").read_text().splitlines()]
        runs[amp] = (dtypes, lines)
    assert runs[False][0] == {torch.float32} and runs[True][0] == {torch.bfloat16}
    (_, fp32), (_, bf16) = runs[False], runs[True]
    assert [r["iteration"] for r in bf16] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in bf16)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)
    assert bf16[0]["loss_rpn_cls"] == pytest.approx(fp32[0]["loss_rpn_cls"], rel=0.01)
    assert "scaler" not in load_checkpoint(tmp_path / "True" / "checkpoints" / "ckpt_0000003.pt")
