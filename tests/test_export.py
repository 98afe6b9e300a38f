"""detect.export / detect.export_graphs / detect.runtime and tools/export.py on trained tiny detectors.

A tiny Faster R-CNN and Fast R-CNN train for a few dozen steps on a 12-image synthetic set; each
is exported once per format, then the files run on image sizes and aspect ratios the trace
never saw and must give the eager model's detections (same count and labels, boxes within
0.5 px, scores within 1e-3) without being traced again.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detect import build_model, load_config  # noqa: E402
from detect.build import model_from_checkpoint  # noqa: E402
from detect.checkpoint import save_checkpoint  # noqa: E402
from detect.cli import export as export_cli  # noqa: E402
from detect.config import config_to_dict  # noqa: E402
from detect.errors import CheckpointError, DetectError, ExportError  # noqa: E402
from detect.proposal_sources import FixedProposals  # noqa: E402
from detect.runtime import match_detections, model_from_exported  # noqa: E402
from detect.runtime import load_exported as load_exported_uncached  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEST_MIN = 160                    # the trace sees one 160 x 213 image
SIZES = [(160, 213), (97, 311), (300, 120), (64, 64), (241, 250), (181, 517)]   # wide, tall, tiny, odd, max-size bound
BOX_TOL, SCORE_TOL = 0.5, 1e-3


_LOADED: dict = {}


def load_exported(path, **kwargs):
    """``load_exported``, each file read once (deserialising a .pt2 takes seconds of sympy parsing)."""
    key = (str(path), repr(sorted(kwargs.items())))
    if key not in _LOADED:
        _LOADED[key] = load_exported_uncached(path, **kwargs)
    return _LOADED[key]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor
    from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
    from detect.data.voc import VOCDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # deterministic, and immune to spin-waiting on a busy machine
    tmp = tmp_path_factory.mktemp("export")
    root = generate_synthetic(tmp / "syn", num_images=12, seed=0, empty_fraction=0.0, style="plain")
    names = list(SYNTHETIC_CLASSES)
    records = VOCDataset(root, "trainval", classes=names).records + VOCDataset(root, "test", classes=names).records
    # A little pixel noise, as photos have: on perfectly flat fills anchors tie up to float rounding and
    # onnxruntime (1e-5 from PyTorch) ranks them otherwise (see detect.export.check_image).
    generator = torch.Generator().manual_seed(0)
    images = [_noisy(image_to_tensor(read_image(r.path)), generator) for r in records]
    yield {"root": root, "tmp": tmp, "names": names, "records": records, "images": images}
    torch.set_num_threads(threads)


def _noisy(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randint(-3, 4, image.shape, generator=generator)
    return ((image * 255).round() + noise).clamp(0, 255) / 255


def _proposals(record, image, seed: int) -> np.ndarray:
    """Jittered ground truth plus random boxes, all inside the image (as a proposal source returns them)."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[-2:]
    jitter = np.repeat(record.boxes, 4, axis=0) + rng.normal(0, 6, (4 * len(record.boxes), 4))
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (40, 2))
    rand = np.concatenate([xy, xy + rng.uniform(8, 100, (40, 2))], axis=1)
    boxes = np.concatenate([jitter, rand]).clip(0, [w, h, w, h])
    keep = (boxes[:, 2] - boxes[:, 0] > 2) & (boxes[:, 3] - boxes[:, 1] > 2)
    return boxes[keep].astype(np.float32)


def _train(model, data, iters: int, proposals: dict | None = None) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(iters):
        pick = torch.randperm(len(data["records"]))[:2].tolist()
        targets = [{"boxes": torch.from_numpy(data["records"][i].boxes), "image_id": data["records"][i].image_id,
                    "labels": torch.from_numpy(data["records"][i].labels)} for i in pick]
        losses = model.loss([data["images"][i] for i in pick], targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()


def _checkpoint(data, pipeline: str, iters: int, extra=(), name: str = "") -> tuple[Path, dict]:
    cfg = load_config(CONFIGS / pipeline / "tiny_synthetic.yaml",
                      ["data.format=voc", f"data.root={data['root']}", "data.train_split=trainval",
                       f"model.input.min_size=[{TEST_MIN}]", f"model.input.test_min_size={TEST_MIN}",
                       "model.input.max_size=272", f"proposals.store={data['tmp'] / 'store'}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"])
    boxes = None
    if pipeline == "fast_rcnn":
        boxes = {r.image_id: _proposals(r, im, i) for i, (r, im) in enumerate(zip(data["records"], data["images"]))}
        model.proposals.source = FixedProposals(boxes_by_id=boxes)
    _train(model, data, iters)
    path = data["tmp"] / (name or pipeline) / "model_final.pt"
    save_checkpoint(path, model=model, config=config_to_dict(cfg), class_names=data["names"], iteration=iters)
    return path, boxes


@pytest.fixture(scope="module")
def faster(data):
    """A trained tiny Faster R-CNN, exported by the tool (one trace, checked at export) to .onnx and .pt2."""
    ckpt, _ = _checkpoint(data, "faster_rcnn", 60)
    files = {"onnx": ckpt.with_suffix(".onnx"), "torch-export": ckpt.with_suffix(".pt2")}
    argv = ["--checkpoint", str(ckpt), "--out", str(files["onnx"]), "--out", str(files["torch-export"])]
    assert export_cli.main(argv) == 0
    model, _, _ = model_from_checkpoint(ckpt)
    return {"ckpt": ckpt, "files": files, "model": model}


@pytest.fixture(scope="module")
def fast(data):
    """A trained tiny Fast R-CNN whose config computes selective search on the fly, exported with a uint8 input."""
    ckpt, boxes = _checkpoint(data, "fast_rcnn", 60, ["fast_rcnn.proposal_source=selective_search"])
    files = {"onnx": ckpt.with_suffix(".onnx"), "torch-export": ckpt.with_suffix(".pt2")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_cli.main(["--checkpoint", str(ckpt), "--out", str(files["onnx"]), "--out",
                                str(files["torch-export"]), "--input-dtype", "uint8"])
    assert code == 0, printed.getvalue()
    model, _, _ = model_from_checkpoint(ckpt)
    return {"ckpt": ckpt, "files": files, "model": model, "boxes": boxes, "printed": printed.getvalue()}


def _resized(data, size, index):
    """A dataset image at another size, on the 0-255 grid (so a uint8 copy holds the same pixels)."""
    image = data["images"][index % len(data["images"])]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return (image * 255).round() / 255


@pytest.fixture
def no_tracing(monkeypatch):
    """Running an exported file must not trace anything again (one program for every size)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an exported model was traced again")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(torch.onnx, "export", refuse)


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_faster_rcnn_export_gives_eager_detections_at_every_size(faster, data, fmt, no_tracing):
    exported = load_exported(faster["files"][fmt])
    total = 0
    for index, size in enumerate(SIZES):
        image = _resized(data, size, index)
        want = faster["model"].predict([image])[0]
        got = exported.predict([image])[0]
        problem, box_diff, score_diff = match_detections(want, got, box_tol=BOX_TOL, score_tol=SCORE_TOL)
        assert problem is None, f"{fmt} {size}: {problem}"
        assert got["labels"].dtype == torch.int64 and box_diff <= BOX_TOL and score_diff <= SCORE_TOL
        total += len(want["scores"])
    assert total >= 20          # the comparison is not between empty results


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_fast_rcnn_export_gives_eager_detections_on_given_proposals(fast, data, fmt, no_tracing):
    model, exported = fast["model"], load_exported(fast["files"][fmt])
    total = 0
    for index, size in enumerate(SIZES):
        record = data["records"][index]
        image = _resized(data, size, index)
        scale = torch.tensor([size[1] / record.width, size[0] / record.height] * 2)
        boxes = torch.from_numpy(fast["boxes"][record.image_id]) * scale
        model.proposals.source = FixedProposals(boxes_by_id={"x": boxes.numpy()})
        want = model.predict([image], image_ids=["x"])[0]
        given = (image * 255).round().to(torch.uint8) if index % 2 else image      # the graph takes uint8
        got = exported.predict([given], boxes=[boxes])[0]
        problem, _, _ = match_detections(want, got, box_tol=BOX_TOL, score_tol=SCORE_TOL)
        assert problem is None, f"{fmt} {size}: {problem}"
        total += len(want["scores"])
    assert total >= 20
    # no proposal at all, and a single one: the graph has no "at least 2" left in it
    for boxes in (torch.zeros(0, 4), torch.tensor([[10.0, 12.0, 90.0, 70.0]])):
        model.proposals.source = FixedProposals(boxes_by_id={"x": boxes.numpy()})
        want = model.predict([data["images"][0]], image_ids=["x"])[0]
        got = exported.predict([data["images"][0]], boxes=[boxes])[0]
        assert match_detections(want, got)[0] is None and len(got["scores"]) <= len(boxes) * len(data["names"])


def test_exported_files_have_dynamic_sizes_and_carry_names_and_config(faster, fast):
    import onnx

    for files, inputs in ((faster["files"], ["image"]), (fast["files"], ["image", "proposals"])):
        proto = onnx.load(str(files["onnx"]))
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert list(dims) == inputs
        assert dims["image"][0] == 3 and all(isinstance(d, str) and d for d in dims["image"][1:]), dims
        if "proposals" in dims:
            assert isinstance(dims["proposals"][0], str) and dims["proposals"][1] == 4
        meta = json.loads({p.key: p.value for p in proto.metadata_props}["detect"])
        assert meta["class_names"] == ["circle", "square", "triangle", "star", "ring"]
        assert meta["config"]["model"]["input"]["test_min_size"] == TEST_MIN
    program = load_exported(faster["files"]["torch-export"]).backend
    image = program.graph_signature.user_inputs
    height, width = next(n for n in program.graph.nodes if n.name == image[0]).meta["val"].shape[1:]
    ranges = {str(k): (str(v.lower), str(v.upper)) for k, v in program.range_constraints.items()}
    assert len(image) == 1 and ranges[str(height)] == ranges[str(width)] == ("1", str(1 << 14)), ranges


def test_resize_inside_the_graph_gives_the_transforms_sizes():
    """The graph's float64 resize arithmetic lands on the eager transform's size for every shape tried."""
    from detect.export_graphs import resize_image
    from detect.transforms import DetectionTransform

    transform = DetectionTransform(min_size=[TEST_MIN], test_min_size=TEST_MIN, max_size=272, min_input_size=16)
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 250), (96, 304), (160, 213)] + [tuple(s) for s in rng.integers(1, 900, (150, 2))]:
        image = torch.zeros(3, int(h), int(w))
        batch, _ = transform([image])
        x, size, to_input, _ = resize_image(transform, image)
        assert size == batch.image_sizes[0] and tuple(x.shape[-2:]) == tuple(batch.tensor.shape[-2:]), (h, w)
        ratio = transform.boxes_to_input(torch.ones(1, 4), batch.image_sizes[0], (int(h), int(w)))[0]
        assert torch.equal(to_input, ratio)


def test_runtime_scores_a_split_with_the_checkpoints_map(faster, fast, data):
    """tools/test.py's scoring (detect.evaluation.evaluate) of the .onnx files equals the checkpoints' mAP."""
    from detect.evaluation import evaluate
    from detect.evaluation.results import detection_to_numpy

    records = data["records"]
    for run in (faster, fast):
        model, exported = run["model"], load_exported(run["files"]["onnx"], class_names=data["names"])
        eager, exp = {}, {}
        for record, image in zip(records, data["images"]):
            boxes = None
            if run is fast:
                boxes = [torch.from_numpy(run["boxes"][record.image_id])]
                model.proposals.source = FixedProposals(boxes_by_id={record.image_id: boxes[0].numpy()})
                eager[record.image_id] = detection_to_numpy(model.predict([image], image_ids=[record.image_id])[0])
            else:
                eager[record.image_id] = detection_to_numpy(model.predict([image])[0])
            timings: dict = {}
            exp[record.image_id] = detection_to_numpy(exported.predict([image], boxes=boxes, timings=timings)[0])
            assert timings["exported"] > 0
        want = evaluate(records, eager, data["names"], "voc07")["mAP"]
        got = evaluate(records, exp, data["names"], "voc07")["mAP"]
        _, cfg, info = model_from_exported(run["files"]["onnx"], overrides=["test.metric=coco"])
        assert cfg.model.pipeline == exported.kind and cfg.test.metric == "coco"
        assert info["class_names"] == data["names"] and info["path"] == str(run["files"]["onnx"])
        print(f"{exported.kind}: mAP eager {want:.4f}, onnx {got:.4f}")
        assert want > 0.02 and abs(got - want) <= 0.001, (want, got)


def test_detector_from_checkpoint_opens_exported_files_as_checkpoints(faster, fast, data):
    """Detector.from_checkpoint takes the .onnx / .pt2 as a checkpoint: same predict and class_names, CPU only."""
    from detect import Detector
    from detect.runtime import ExportedDetector

    image = _resized(data, (181, 250), 3)
    want = faster["model"].predict([image])[0]
    for fmt in ("onnx", "torch-export"):
        detector = Detector.from_checkpoint(faster["files"][fmt])
        assert isinstance(detector, ExportedDetector) and detector.class_names == data["names"]
        got = detector.predict([image])[0]
        assert len(want["scores"]) >= 2 and match_detections(want, got)[0] is None, fmt
    # config overrides outside the graph reach the runtime (here Fast R-CNN's proposal source) ...
    detector = Detector.from_checkpoint(fast["files"]["onnx"], overrides=["fast_rcnn.proposal_source=ground_truth"])
    assert detector.config["fast_rcnn"]["proposal_source"] == "ground_truth"
    assert detector.meta["config"]["fast_rcnn"]["proposal_source"] == "selective_search"
    # ... while a model setting baked into the graph, or another device, is refused in one line
    with pytest.raises(DetectError, match=r"model\.roi_heads\.score_thresh changes a setting baked into") as info:
        Detector.from_checkpoint(faster["files"]["onnx"], overrides=["model.roi_heads.score_thresh=0.3"])
    assert "\n" not in str(info.value) and "model_final.onnx" in str(info.value)
    with pytest.raises(DetectError, match="run on the CPU here, not on cuda"):
        Detector.from_checkpoint(faster["files"]["torch-export"], device="cuda")
    with pytest.raises(CheckpointError, match="not found"):
        Detector.from_checkpoint(data["tmp"] / "missing.onnx")


def test_fast_rcnn_runtime_runs_the_configs_selective_search(fast, data, capsys):
    """Without boxes the runtime finds proposals as the checkpoint does (here: selective search on the fly)."""
    model, _, _ = model_from_checkpoint(fast["ckpt"])
    image = data["images"][5]
    want = model.predict([image])[0]
    timings: dict = {}
    got = load_exported(fast["files"]["onnx"]).predict([image], timings=timings)[0]
    assert match_detections(want, got)[0] is None and timings["proposals"] > 0


def test_fast_rcnn_export_says_proposals_are_an_input(fast):
    text = fast["printed"]
    assert "note: proposals are an input ('proposals'" in text and "fast_rcnn.proposal_source=selective_search" in text
    assert text.count("inputs image, proposals -> outputs boxes, scores, labels") == 2
    assert load_exported(fast["files"]["torch-export"]).meta["notes"][0].startswith("proposals are an input")


# --------------------------------------------------------------------------- R-CNN's region scorer


def test_rcnn_region_scorer_export_equals_eager(data, tmp_path):
    from detect.export import export_model

    cfg = load_config(CONFIGS / "rcnn" / "tiny_synthetic.yaml",
                      ["rcnn.crop_size=32", "rcnn.context_padding=2", "rcnn.proposal_source=selective_search"])
    torch.manual_seed(0)
    model = build_model(cfg, class_names=data["names"]).eval()
    with torch.no_grad():         # stage 3 and 4 results: SVMs for 3 of the 5 classes, all regressors
        model.head.svm.weight.normal_(std=0.1)
        model.head.svm.fitted[:3] = True
        model.head.box_regressor.weight.normal_(std=1e-3)
        model.head.box_regressor.fitted[:] = True
    image = data["images"][0]
    regions = torch.tensor([[5.0, 6.0, 80.0, 90.0], [30.0, 10.0, 60.0, 120.0], [0.0, 0.0, 150.0, 150.0]])
    head = model.head
    crops = head.warp(model.transform([image])[0].tensor[0], regions)
    with torch.no_grad():
        pool5, fc7 = head.forward_regions(model.backbone, crops)
        want_scores, want_boxes = head.svm(head.svm_features(pool5, fc7)), head.box_regressor(pool5, regions)
    report = export_model(model, [tmp_path / "scorer.pt2", tmp_path / "scorer.onnx"], log=lambda m: None)
    for file in report["files"]:
        assert file["kind"] == "rcnn" and [r["detections"] for r in file["check"]] == [0, 1, 9, 40]
        exported = load_exported(file["out"])
        scores, boxes = exported.score_regions(crops, regions)
        assert torch.isinf(scores[:, 3:]).all() and torch.allclose(scores[:, :3], want_scores[:, :3], atol=1e-4)
        assert torch.allclose(boxes, want_boxes, atol=1e-3)
        with pytest.raises(DetectError, match="region scorer"):
            exported.predict([image])


# --------------------------------------------------------------------------- bad input


def test_onnx_file_from_another_tool_is_refused_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["boxes"])], "other",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, "h", "w"])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [3, "h", "w"])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="not exported by this toolkit") as info:
        load_exported(tmp_path / "other.onnx")
    assert "\n" not in str(info.value) and "other.onnx" in str(info.value)
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_exported(tmp_path / "junk.onnx")
    with pytest.raises(CheckpointError, match="not found"):
        load_exported(tmp_path / "missing.pt2")


def test_exported_file_for_other_classes_is_refused(faster):
    with pytest.raises(CheckpointError, match=r"exported for classes \['circle'.*but \['cat', 'dog'\] are expected"):
        load_exported(faster["files"]["onnx"], class_names=["cat", "dog"])


def test_export_tool_exits_2_with_one_line(faster, data, tmp_path, capsys):
    ckpt = str(faster["ckpt"])
    cases = [
        (["--checkpoint", ckpt, "--format", "onnx", "--out", str(tmp_path / "x.pt2")],
         "an ONNX export is written as .onnx"),
        (["--checkpoint", str(faster["files"]["onnx"])], "not a checkpoint"),
        (["--checkpoint", ckpt, "--out", str(tmp_path / "x.bin")], "cannot tell the format"),
    ]
    fast_ckpt, _ = _checkpoint(data, "fast_rcnn", 0, ["fast_rcnn.test_scales=[128,160]"], name="multiscale")
    cases.append((["--checkpoint", str(fast_ckpt), "--out", str(tmp_path / "m.onnx")], "fast_rcnn.test_scales has 2"))
    for argv, message in cases:
        assert export_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not list(tmp_path.iterdir())        # nothing was written


def test_export_refuses_to_write_a_file_that_differs_from_eager(faster, tmp_path, monkeypatch):
    import detect.export as export

    real = export.eager_detections

    def shifted(*args, **kwargs):   # an eager model one pixel away from the exported one
        det = real(*args, **kwargs)
        return {**det, "boxes": det["boxes"] + 1.0}

    program = load_exported(faster["files"]["torch-export"]).backend      # the trace itself is tested above
    monkeypatch.setattr(export, "trace", lambda parts, input_dtype: program)
    monkeypatch.setattr(export, "eager_detections", shifted)
    with pytest.raises(ExportError, match=r"differs from the eager model on a \d+x\d+ image: detection 0"):
        export.export_model(faster["model"], [tmp_path / "bad.pt2", tmp_path / "bad.onnx"])
    assert not list(tmp_path.iterdir())


def test_test_tool_scores_the_onnx_file_as_the_checkpoint(faster, data, tmp_path):
    """tools/test.py --checkpoint model.onnx: the same split, the same mAP as the checkpoint (within 0.001)."""
    import json

    from detect.cli import test as test_cli

    maps = {}
    for key, path in (("ckpt", faster["ckpt"]), ("onnx", faster["files"]["onnx"])):
        out = tmp_path / key
        assert test_cli.main(["--checkpoint", str(path), "--out", str(out), "--no-progress", "--metric", "voc07"]) == 0
        maps[key] = json.loads((out / "metrics.json").read_text())["metrics"]["voc07"]["mAP"]
    assert maps["ckpt"] > 0 and abs(maps["onnx"] - maps["ckpt"]) <= 0.001, maps
