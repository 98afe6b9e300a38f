"""tools/train.py, tools/test.py and tools/demo.py on the tiny synthetic config (a few iterations)."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from detect.checkpoint import load_checkpoint, save_checkpoint
from detect.cli import demo, eval as eval_cli, test as test_cli, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"


def _overrides(root: Path) -> list[str]:
    sets = [f"data.root={root}", "data.synthetic_images=12", "train.max_iter=4", "pretrain.steps=0", "train.checkpoint_period=2",
            "train.eval_period=0", "train.images_per_batch=2", "train.workers=0", "train.warmup_iters=2",
            "train.log_period=2", "model.input.min_size=[160]", "model.input.test_min_size=160"]
    return [arg for s in sets for arg in ("--set", s)]


CLASSES = ["circle", "square", "triangle", "star", "ring"]


def _oracle_detection(record) -> dict[str, np.ndarray]:
    """Jittered ground truth plus false positives, drawn from the image id (the same whatever the order)."""
    rng = np.random.default_rng(zlib.crc32(record.image_id.encode()))
    n = len(record.boxes)
    fake = rng.uniform(0, 100, (n + 1, 2))
    boxes = np.concatenate([record.boxes + rng.normal(0, 4, record.boxes.shape), np.concatenate([fake, fake + 30], 1)])
    return {"boxes": boxes.astype(np.float32), "scores": rng.uniform(0.05, 1, 2 * n + 1).astype(np.float32),
            "labels": np.concatenate([record.labels, rng.integers(0, 5, n + 1)]).astype(np.int64)}


class _PixelOracle:
    """``predict`` for a trained model: the oracle detections of the test image it is shown, found by its pixels
    (none for any other image), so the final evaluation the train tool logs has a known, non-trivial mAP."""

    def __init__(self, root: Path):
        self.root, self.by_pixels = root, None

    def __call__(self, images, timings=None):
        from detect.data.image import read_image
        from detect.data.loader import image_to_tensor
        from detect.data.voc import VOCDataset

        if self.by_pixels is None:      # the tool generates the dataset: read it at the first call
            records = VOCDataset(self.root, "test", classes=CLASSES).records
            self.by_pixels = {image_to_tensor(read_image(r.path)).numpy().tobytes(): r for r in records}
        none = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "labels": np.zeros(0, np.int64)}
        out = []
        for image in images:
            record = self.by_pixels.get(image.cpu().numpy().tobytes())
            det = _oracle_detection(record) if record is not None else none
            out.append({k: torch.from_numpy(v) for k, v in det.items()})
        return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from detect.detector import Detector

    if not CONFIG.is_file():
        pytest.skip("configs/faster_rcnn/tiny_synthetic.yaml not present")
    base = tmp_path_factory.mktemp("tools")
    out = base / "run"
    oracle = _PixelOracle(base / "synth")
    # The detector trains as usual; only the predictions of its final evaluation are the oracle's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Detector, "predict", lambda self, images, image_ids=None, timings=None: oracle(images, timings))
        code = train.main(["--config", str(CONFIG), "--out", str(out), "--no-progress", *_overrides(base / "synth")])
    assert code == 0
    return out


def test_train_writes_config_classes_metrics_and_checkpoints(run_dir, capsys):
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "class_names.json").read_text()) == ["circle", "square", "triangle", "star", "ring"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "loss" in x] == [2, 4]
    # the logged test result is the final model's on the test split (the oracle's detections, scored here)
    from detect.data.voc import VOCDataset
    from detect.evaluation import evaluate_voc

    records = VOCDataset(run_dir.parent / "synth", "test", classes=CLASSES).records
    expected = evaluate_voc(records, {r.image_id: _oracle_detection(r) for r in records}, CLASSES, metric="voc07")
    assert lines[-1]["split"] == "test" and lines[-1]["iteration"] == 4 and 0.05 < expected["mAP"] < 0.95
    assert lines[-1]["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    for name, ap in expected["per_class"].items():
        assert lines[-1]["per_class"][name] == (None if np.isnan(ap) else pytest.approx(ap, abs=1e-9)), name
    ckpt = load_checkpoint(run_dir / "model_final.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["train"]["max_iter"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]


def test_train_scores_the_final_model_with_the_configs_metric(run_dir, tmp_path, capsys):
    """test.metric=coco: the train tool logs and prints the COCO mAP, not VOC07 (catches a hard-coded metric)."""
    from detect.data.voc import VOCDataset
    from detect.evaluation import evaluate
    from detect.detector import Detector

    synth = run_dir.parent / "synth"
    oracle = _PixelOracle(synth)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Detector, "predict", lambda self, images, image_ids=None, timings=None: oracle(images, timings))
        code = train.main(["--config", str(CONFIG), "--out", str(tmp_path / "coco"), "--no-progress",
                           *_overrides(synth), "--set", "train.max_iter=1", "--set", "test.metric=coco"])
    assert code == 0
    records = VOCDataset(synth, "test", classes=CLASSES).records
    expected = evaluate(records, {r.image_id: _oracle_detection(r) for r in records}, CLASSES, "coco")
    last = json.loads((tmp_path / "coco" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["metric"] == "coco" and last["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    printed = capsys.readouterr().out
    assert f"COCO mAP on 'test' ({len(records)} images): {expected['mAP']:.4f}" in printed
    assert "VOC07 mAP" not in printed


def test_ap_of_a_class_without_ground_truth_prints_as_n_a():
    from detect.cli.common import format_ap

    assert [format_ap(x) for x in (float("nan"), None, 0.5, 1.0, 0.0)] == ["n/a", "n/a", "0.5000", "1.0000", "0.0000"]


def test_resume_of_a_finished_run_and_refusal_to_mix_runs(run_dir, capsys):
    base = run_dir.parent
    args = ["--config", str(CONFIG), "--out", str(run_dir), "--no-progress", "--no-test", *_overrides(base / "synth")]
    assert train.main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert train.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "ckpt_0000004.pt at iteration 4" in printed


def test_test_tool_writes_results_metrics_and_speed(run_dir, tmp_path, capsys):
    out = tmp_path / "test"
    assert test_cli.main(["--checkpoint", str(run_dir / "model_final.pt"), "--metric", "all", "--out", str(out),
                          "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "images/s" in printed and "features" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"voc07", "voc10", "coco"}
    assert report["speed"]["images"] == report["images"] and report["speed"]["images_per_s"] > 0
    assert set(report["speed"]["stage_seconds_per_image"]) >= {"features", "proposals", "head", "postprocess"}
    assert len(list(out.glob("comp4_det_test_*.txt"))) == 5
    # one COCO result per VOC results line: the same detections in both formats
    lines = [line for path in out.glob("comp4_det_test_*.txt") for line in path.read_text().splitlines()]
    coco = json.loads((out / "coco_results.json").read_text())
    assert isinstance(coco, list) and len(coco) == len(lines) > 0
    np.testing.assert_allclose(sorted(float(line.split()[1]) for line in lines), sorted(c["score"] for c in coco),
                               atol=1e-5)


class _Oracle(torch.nn.Module):
    """Jittered ground truth plus false positives, so the AP being compared is neither 0 nor 1."""

    def __init__(self, records):
        super().__init__()
        self.records = iter(records)
        self.rng = np.random.default_rng(0)

    def predict(self, images, *, image_ids=None, timings=None):
        out = []
        for _ in images:
            record = next(self.records)
            n = len(record.boxes)
            boxes = record.boxes + self.rng.normal(0, 4, record.boxes.shape)
            fake = self.rng.uniform(0, 100, (n + 1, 2))
            boxes = np.concatenate([boxes, np.concatenate([fake, fake + 30], 1)])
            labels = np.concatenate([record.labels, self.rng.integers(0, 5, n + 1)])
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "scores": torch.tensor(self.rng.uniform(0.05, 1, 2 * n + 1), dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def test_test_tool_metrics_equal_eval_tool_on_its_files(run_dir, tmp_path, monkeypatch, capsys):
    from detect import build as checkpoint   # where model_from_checkpoint lives
    from detect.data.voc import VOCDataset

    root = run_dir.parent / "synth"
    records = VOCDataset(root, "test", classes=["circle", "square", "triangle", "star", "ring"]).records
    real = checkpoint.model_from_checkpoint

    def oracle(path, **kwargs):
        _, cfg, ckpt = real(path, **kwargs)
        return _Oracle(records), cfg, ckpt

    monkeypatch.setattr(checkpoint, "model_from_checkpoint", oracle)
    out = tmp_path / "test"
    assert test_cli.main(["--checkpoint", str(run_dir / "model_final.pt"), "--metric", "voc07", "--out", str(out),
                          "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())["metrics"]["voc07"]
    assert 0.05 < report["mAP"] < 0.95
    assert eval_cli.main(["--voc", str(root), "--split", "test", "--detections", str(out), "--metric", "voc07",
                          "--classes", "circle,square,triangle,star,ring", "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    evaluated = evaluated.get("voc07", evaluated)
    assert evaluated["mAP"] == report["mAP"]
    for name, ap in report["per_class"].items():
        other = evaluated["per_class"][name]
        assert (ap is None and (other is None or other != other)) or ap == other, name


def test_demo_writes_an_image_and_an_entry_per_input(run_dir, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    source = sorted((run_dir.parent / "synth" / "JPEGImages").glob("*.jpg"))[:3]
    for i, path in enumerate(source):
        (images / ("sub" if i == 2 else "") / path.name).write_bytes(path.read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "drawn"
    assert demo.main(["--checkpoint", str(run_dir), "--images", str(images), "--out", str(out),
                      "--score-thresh", "0.0", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((out / "detections.json").read_text())
    files = sorted(e["file"] for e in report["images"])
    assert files == sorted([source[0].name, source[1].name, f"sub/{source[2].name}"])
    assert [u["file"] for u in report["unreadable"]] == ["broken.jpg"]
    for name in files:
        assert (out / name).is_file()
    rows = (out / "detections.csv").read_text().splitlines()
    assert rows[0] == "file,class,score,x1,y1,x2,y2"
    assert len(rows) - 1 == sum(len(e["detections"]) for e in report["images"])
    assert "broken.jpg" in capsys.readouterr().out


def test_demo_draws_with_the_label_mode_and_legend_asked_for(run_dir, tmp_path):
    """Catches --labels / --legend not reaching the drawing: each drawn image must be exactly what
    draw_detections makes of the listed detections with those options (PNG in and out: no JPEG noise)."""
    from PIL import Image

    from detect.data.image import read_image
    from detect.visualize import draw_detections

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((run_dir.parent / "synth" / "JPEGImages").glob("*.jpg"))[:4]:
        Image.open(path).save(images / f"{path.stem}.png")
    drawn = {}
    for labels, legend in (("none", True), ("class", False)):
        out = tmp_path / f"drawn_{labels}"
        assert demo.main(["--checkpoint", str(run_dir), "--images", str(images), "--out", str(out), "--score-thresh",
                          "0.0", "--device", "cpu", "--no-progress", "--labels", labels,
                          *(["--legend"] if legend else [])]) == 0
        report = json.loads((out / "detections.json").read_text())
        for entry in report["images"]:
            dets = entry["detections"]
            expected = draw_detections(read_image(images / entry["file"]),
                                       np.array([d["box"] for d in dets], np.float32).reshape(-1, 4),
                                       np.array([d["score"] for d in dets], np.float32),
                                       np.array([CLASSES.index(d["class"]) for d in dets], np.int64), CLASSES,
                                       label_mode=labels, legend=legend)
            drawn[labels, entry["file"]] = read_image(out / entry["file"])
            assert np.array_equal(drawn[labels, entry["file"]], expected), entry["file"]
    with_detections = [e["file"] for e in report["images"] if e["detections"]]
    assert with_detections, "the briefly trained model detects nothing: the test would compare blank drawings"
    assert all(not np.array_equal(drawn["none", f], drawn["class", f]) for f in with_detections)


@pytest.mark.parametrize("case", ["missing_checkpoint", "unknown_key", "not_writable", "empty_folder",
                                  "other_model", "other_classes"])
def test_bad_input_is_one_line_naming_it(case, run_dir, tmp_path, capsys):
    final = run_dir / "model_final.pt"
    if case == "missing_checkpoint":
        code = test_cli.main(["--checkpoint", str(tmp_path / "gone.pt")])
        expected = "gone.pt"
    elif case == "unknown_key":
        code = train.main(["--config", str(CONFIG), "--set", "train.lrr=0.1", "--out", str(tmp_path)])
        expected = "train.lrr"
    elif case == "not_writable":
        (tmp_path / "file").write_text("x")
        code = train.main(["--config", str(CONFIG), "--out", str(tmp_path / "file" / "out")])
        expected = "file/out"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        code = demo.main(["--checkpoint", str(final), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
        expected = "empty"
    elif case == "other_model":
        ckpt = load_checkpoint(final)
        model = torch.nn.Linear(2, 2)
        save_checkpoint(tmp_path / "other.pt", model=model, config=ckpt["config"], class_names=ckpt["class_names"])
        code = demo.main(["--checkpoint", str(tmp_path / "other.pt"), "--images", str(run_dir.parent / "synth"), "--out",
                          str(tmp_path / "o")])
        expected = "weights belong to another model"
    else:
        code = test_cli.main(["--checkpoint", str(final), "--out", str(tmp_path / "o"),
                              "--set", "data.classes=[circle,square,triangle,ring,star]", "--no-progress"])
        expected = "trained for classes"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_tools_scripts_run_from_a_checkout(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "test.py"), "--checkpoint", str(tmp_path / "x.pt")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: checkpoint not found")


def test_alternating_training_freezes_what_each_step_says_and_resumes(tmp_path, capsys):
    if not CONFIG.is_file():
        pytest.skip("configs/faster_rcnn/tiny_synthetic.yaml not present")
    out = tmp_path / "alt"
    args = ["--config", str(CONFIG), "--out", str(out), "--no-progress", "--no-test",
            "--set", "train.training_mode=alternating", *_overrides(tmp_path / "synth")]
    assert train.main(args) == 0
    weights = {k: load_checkpoint(out / f"step{k}" / "model_final.pt")["model"] for k in (1, 2, 3, 4)}

    def group(k, prefix):
        return {n: v for n, v in weights[k].items() if n.startswith(prefix) and "running" not in n
                and "num_batches" not in n}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    assert same(group(2, "backbone."), group(3, "backbone.")) and same(group(3, "backbone."), group(4, "backbone."))
    assert same(group(3, "proposals."), group(4, "proposals.")) and not same(group(1, "proposals."), group(3, "proposals."))
    assert not same(group(3, "head."), group(4, "head.")) and same(group(2, "head."), group(3, "head."))
    final = load_checkpoint(out / "model_final.pt")
    assert final["iteration"] == 16 and all(torch.equal(final["model"][n], weights[4][n]) for n in weights[4])

    # killed during step 4 after its first checkpoint: --resume skips steps 1-3 and ends with the same weights
    (out / "step4" / "model_final.pt").unlink()
    (out / "step4" / "checkpoints" / "ckpt_0000004.pt").unlink()
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 3 and "ckpt_0000002.pt at iteration 2" in printed
    again = load_checkpoint(out / "model_final.pt")["model"]
    assert all(torch.equal(again[n], weights[4][n]) for n in weights[4])


def test_torchrun_two_cpu_processes(tmp_path):
    if not CONFIG.is_file():
        pytest.skip("configs/faster_rcnn/tiny_synthetic.yaml not present")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed next to this python")
    out = tmp_path / "ddp"
    command = [str(torchrun), "--nproc_per_node", "2", "--standalone",
               str(REPO / "tools" / "train.py"), "--config", str(CONFIG), "--out", str(out), "--device", "cpu",
               "--no-progress", *_overrides(tmp_path / "synth")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es) on cpu" in result.stdout and result.stdout.count("VOC07 mAP on 'test'") == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    saved = load_checkpoint(out / "checkpoints" / "ckpt_0000004.pt")
    assert len(saved["rng"]) == 2 and saved["iteration"] == 4


def test_speed_report_per_image_and_uncovered_time():
    report = test_cli.speed_report({"features": 1.0, "proposals": 0.5, "total": 2.0, "images": 4})
    assert report["images_per_s"] == 2.0 and report["seconds_per_image"] == 0.5
    assert report["stage_seconds_per_image"] == {"features": 0.25, "proposals": 0.125, "other": 0.125}
