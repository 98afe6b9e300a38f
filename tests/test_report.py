"""The HTML report and the analyze / explain tools, on a briefly trained tiny_synthetic Faster R-CNN."""

import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

import detect.engine
from detect.analysis.html import HtmlReport, referenced_files
from detect.cli import analyze, explain, test as test_cli, train
from tests.devkit_reference import devkit_ap

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    sets = [f"data.root={base / 'synth'}", "data.synthetic_images=12", "train.max_iter=4", "pretrain.steps=0", "train.checkpoint_period=4",
            "train.eval_period=0", "train.images_per_batch=2", "train.workers=0", "train.warmup_iters=2",
            "train.log_period=2", "model.input.min_size=[160]", "model.input.test_min_size=160"]
    out = base / "run"
    args = ["--config", str(CONFIG), "--out", str(out), "--no-progress", "--no-test"]
    assert train.main(args + [x for s in sets for x in ("--set", s)]) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    out = run_dir.parent / "report"
    out.mkdir()
    (out / "stale.png").write_bytes(b"left over from something else")
    code = analyze.main(["--checkpoint", str(run_dir / "model_final.pt"), "--split", "test", "--out", str(out),
                         "--no-progress", "--rpn-recall", "--deconv-images", "4", "--deconv-count", "1",
                         "--occlusion", "1", "--samples", "3"])
    assert code == 0
    return out


def test_report_references_only_files_it_wrote(report):
    page = (report / "index.html").read_text(encoding="utf-8")
    refs = referenced_files(page)
    assert refs
    for ref in refs:
        assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/") and ".." not in ref, ref
        assert (report / ref).is_file(), ref
    on_disk = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    assert set(refs) == on_disk - {"index.html", "stale.png"}        # everything it wrote, nothing else
    assert "<script" not in page and "<link" not in page and "http" not in page
    for section in ("Dataset", "Training curves", "Average precision", "Precision, recall and F1 at score",
                    "AP by object size", "Proposal recall", "Error analysis", "Class confusion", "Detections",
                    "Occlusion sensitivity", "Deconvnet"):
        assert section in page
    images = [r for r in refs if r.endswith((".png", ".jpg"))]
    assert any(r.startswith("occlusion/") for r in images) and any(r.startswith("deconvnet/") for r in images)


def test_report_reads_the_training_log_next_to_the_checkpoint(report, run_dir):
    """Catches the training curves read from another file, or their last values taken from the wrong line."""
    numbers = json.loads((report / "analysis.json").read_text())["training"]
    assert numbers["path"] == str(run_dir / "metrics.jsonl")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "split" not in line]
    assert len(train_lines) == 2                 # 4 iterations, a line every 2
    for key in ("loss", "loss_rpn_cls", "loss_cls", "lr"):
        assert numbers["final"][key] == pytest.approx(train_lines[-1][key])
    assert "figures/training.png" in referenced_files((report / "index.html").read_text(encoding="utf-8"))


def test_analyze_leaves_the_training_curves_out_with_metrics_none(run_dir, tmp_path):
    assert analyze.main(["--checkpoint", str(run_dir / "model_final.pt"), "--split", "test", "--out",
                         str(tmp_path / "r"), "--no-progress", "--occlusion", "0", "--deconv-layer", "none",
                         "--samples", "1", "--max-images", "2", "--metrics", "none"]) == 0
    assert json.loads((tmp_path / "r" / "analysis.json").read_text())["training"] is None
    assert "figures/training.png" not in (tmp_path / "r" / "index.html").read_text(encoding="utf-8")


def _split_objects(root: Path, split: str) -> dict[str, list[tuple]]:
    """The split's objects, read from the XML by the test: ``{id: [(name, xmin, ymin, xmax, ymax, difficult)]}``."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    out = {}
    for image_id in ids:
        xml = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
        corners = ("xmin", "ymin", "xmax", "ymax")
        out[image_id] = [(o.findtext("name"), *(float(o.findtext(f"bndbox/{t}")) for t in corners),
                          o.findtext("difficult", "0").strip() == "1") for o in xml.iter("object")]
    return out


def _planted_detections(objects: dict[str, list[tuple]], seed: int = 0) -> list[tuple]:
    """Per object a false positive beside it; two of three objects found (a box one pixel off); one of three
    also, and one of three only, covered by a loose box (IoU about 0.43: a false positive at the devkit's 0.5).

    Returns VOC-pixel rows ``(image_id, name, score, xmin, ymin, xmax, ymax)``, scores float32-exact, random order.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, objs in objects.items():
        for n, (name, x1, y1, x2, y2, _) in enumerate(objs):
            if n % 3 != 2:
                rows.append((image_id, name, x1 + 1, y1, x2 + 1, y2))
            if n % 3 != 0:
                shift = round(0.4 * (x2 - x1 + 1))
                rows.append((image_id, name, x1 + shift, y1, x2 + shift, y2))
            rows.append((image_id, name, x2 + 2, y2 + 2, 2 * x2 - x1 + 2, 2 * y2 - y1 + 2))   # beside it, no overlap
    scores = rng.permutation(len(rows)).astype(np.float32) / len(rows) + np.float32(0.01)
    return [(r[0], r[1], float(s), *r[2:]) for r, s in zip(rows, scores)]


def test_report_numbers_match_the_test_tool(report, run_dir, tmp_path, monkeypatch):
    """Catches a report (or test tool) whose AP differs from the devkit's on detections with non-trivial APs.

    Both tools get the same planted detections in place of the briefly trained model's (whose APs
    are all 0 or NaN); the reference is the loop-by-loop devkit transcription on the XML.
    """
    names = yaml.safe_load(CONFIG.read_text())["data"]["classes"]
    objects = _split_objects(run_dir.parent / "synth", "test")
    planted = _planted_detections(objects)

    def planted_evaluate(model, loader, **kwargs):
        out = {}
        for image_id in objects:
            mine = [r for r in planted if r[0] == image_id]
            boxes = [[r[3] - 1, r[4] - 1, r[5], r[6]] for r in mine]          # VOC pixels -> library convention
            out[image_id] = {"boxes": np.array(boxes, np.float32).reshape(-1, 4),
                             "scores": np.array([r[2] for r in mine], np.float32),
                             "labels": np.array([names.index(r[1]) for r in mine], np.int64)}
        return out

    expected, npos = {}, {}
    for name in names:
        gt = {i: [(*o[1:5], o[5]) for o in objs if o[0] == name] for i, objs in objects.items()}
        npos[name] = sum(not o[4] for objs in gt.values() for o in objs)
        # a class with no object that counts (here: only difficult ones) has no AP, and is left out of the mean
        expected[name] = devkit_ap(gt, [(r[0], r[2], *r[3:]) for r in planted if r[1] == name], use_07=True) \
            if npos[name] else math.nan
    valid = [ap for ap in expected.values() if not math.isnan(ap)]
    assert sum(0 < ap < 1 for ap in valid) >= 2 and len(set(valid)) >= 2        # several distinct, non-trivial APs

    monkeypatch.setattr(detect.engine, "evaluate", planted_evaluate)
    assert analyze.main(["--checkpoint", str(run_dir / "model_final.pt"), "--split", "test", "--out",
                         str(tmp_path / "report"), "--no-progress", "--occlusion", "0", "--deconv-layer", "none",
                         "--samples", "1"]) == 0
    numbers = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert test_cli.main(["--checkpoint", str(run_dir / "model_final.pt"), "--split", "test", "--metric", "voc07",
                          "--out", str(tmp_path / "test"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())["metrics"]["voc07"]
    mean = float(np.mean(valid))
    for source in (numbers["summary"]["mAP"], numbers["breakdown"]["all"]["mAP"], metrics["mAP"]):
        assert source == pytest.approx(mean, abs=1e-9)
    for name in names:
        ap = expected[name] if not math.isnan(expected[name]) else None        # NaN is written as null
        assert numbers["per_class"][name]["ap"] == pytest.approx(ap, abs=1e-9)
        assert metrics["per_class"][name] == pytest.approx(ap, abs=1e-9)
        assert numbers["per_class"][name]["npos"] == npos[name]
    assert numbers["summary"]["detections"] == len(planted)
    # and the full report of the trained model has every section's numbers
    full = json.loads((report / "analysis.json").read_text())
    assert set(full["error_analysis"]["per_class"]) == set(names)
    assert "RPN" in full["proposal_recall"] and full["deconvnet"]["layer"] == "conv5"


def _chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


_CHECK = """<script>window.addEventListener("load", function () {
  var all = Array.prototype.slice.call(document.images);
  var bad = all.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  bad.forEach(function (i) { console.error("broken image: " + i.getAttribute("src")); });
  document.body.setAttribute("data-images", all.length);
  document.body.setAttribute("data-broken", bad.length);
});</script>"""


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no Chromium at /usr/bin/chromium")
def test_report_opens_in_headless_chromium(report, tmp_path):
    dom, console = _chromium(report / "index.html", tmp_path / "profile1")
    assert "Detector analysis" in dom and console == []
    # the page has no script; a copy with a checker script finds every image decoded
    copy = tmp_path / "copy"
    shutil.copytree(report, copy)
    page = (copy / "index.html").read_text(encoding="utf-8")
    (copy / "check.html").write_text(page.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    count = page.count("<img ")
    dom, console = _chromium(copy / "check.html", tmp_path / "profile2")
    assert f'data-images="{count}"' in dom and 'data-broken="0"' in dom and console == []
    # and the checker does see a missing image
    next(copy.glob("figures/*.png")).unlink()
    dom, console = _chromium(copy / "check.html", tmp_path / "profile3")
    assert 'data-broken="1"' in dom and len(console) == 1 and "broken image: figures/" in console[0]


def test_html_writer_refuses_files_it_did_not_write(tmp_path):
    page = HtmlReport(tmp_path, "t")
    with pytest.raises(ValueError, match="not written"):
        page.figure("elsewhere.png")
    for bad in ("../x.png", "/tmp/x.png", "C:/x.png"):
        with pytest.raises(ValueError, match="relative"):
            page.path(bad)
    page.parts.append('<img src="https://example.org/x.png">')
    with pytest.raises(ValueError, match="did not write"):
        page.write()
    assert not (tmp_path / "index.html").exists()


def _first_image(run_dir: Path) -> Path:
    return sorted((run_dir.parent / "synth" / "JPEGImages").glob("*.jpg"))[0]


def _image_with_a_detection(run_dir: Path) -> Path:
    from detect.build import model_from_checkpoint
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor

    model, _, _ = model_from_checkpoint(run_dir / "model_final.pt")
    for path in sorted((run_dir.parent / "synth" / "JPEGImages").glob("*.jpg")):
        if len(model.predict([image_to_tensor(read_image(path))])[0]["scores"]):
            return path
    pytest.fail("the briefly trained model detects nothing in any image")


def test_explain_occlusion_box_and_deconvnet(run_dir, tmp_path, capsys):
    """Catches explain reporting another detection, box, label, layer or channel than asked, or a wrong map summary.

    The reference numbers are recomputed here: the model's own detection, an occlusion map of
    the whole image (explain crops around the box) and the layer's activation read by a hook.
    """
    import torch

    from detect.analysis.deconvnet import resize_like_model
    from detect.analysis.occlusion import DetectorBoxScorer, occlusion_map
    from detect.analysis.trunk import flatten_trunk, resolve_layer
    from detect.build import model_from_checkpoint
    from detect.data.image import read_image
    from detect.data.loader import image_to_tensor

    ckpt, image = str(run_dir / "model_final.pt"), str(_image_with_a_detection(run_dir))
    model, _, _ = model_from_checkpoint(run_dir / "model_final.pt")
    pixels = image_to_tensor(read_image(Path(image)))
    det = model.predict([pixels])[0]
    out = tmp_path / "explain"
    assert explain.main(["--checkpoint", ckpt, "--image", image, "--out", str(out), "--detection", "0"]) == 0
    summary = json.loads((out / f"occlusion_{Path(image).stem}_det0.json").read_text())
    assert (out / f"occlusion_{Path(image).stem}_det0.png").is_file()
    assert summary["box"] == pytest.approx(det["boxes"][0].tolist(), abs=1e-4)
    assert summary["score"] == pytest.approx(float(det["scores"][0]), abs=1e-6)
    label = int(det["labels"][0])
    assert summary["label"] == model.class_names[label]
    full = occlusion_map(DetectorBoxScorer(model, pixels, det["boxes"][0], label, crop=False), patch=32, stride=16)
    assert summary["baseline"] == pytest.approx(full.baseline, abs=1e-5)
    assert summary["lowest"] == pytest.approx(float(full.scores.min()), abs=1e-5)
    assert summary["positions"] == full.scores.size and 0 < summary["evaluated"] <= full.scores.size
    assert explain.main(["--checkpoint", ckpt, "--image", image, "--out", str(out), "--box", "10,10,60,70",
                         "--label", "square"]) == 0
    boxed = json.loads((out / f"occlusion_{Path(image).stem}_box.json").read_text())
    assert boxed["label"] == "square" and boxed["box"] == [10, 10, 60, 70] and boxed["score"] is None
    square = DetectorBoxScorer(model, pixels, [10, 10, 60, 70], model.class_names.index("square"), crop=False)
    assert boxed["baseline"] == pytest.approx(square.baseline(), abs=1e-5)
    assert explain.main(["--checkpoint", ckpt, "--image", image, "--out", str(out), "--layer", "conv4",
                         "--channel", "3", "--top", "4"]) == 0
    units = json.loads((out / f"deconv_{Path(image).stem}_conv4_c3.json").read_text())["units"]
    assert 1 <= len(units) <= 4 and all(a["activation"] >= b["activation"] for a, b in zip(units, units[1:]))
    # the strongest unit is channel 3's maximum at conv4 (ReLU output) of the image as the model resizes it
    layers = flatten_trunk(model.backbone.trunk)
    seen = []
    hook = layers[resolve_layer(layers, "conv4")].module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    backbone = model.backbone
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (backbone.pixel_mean, backbone.pixel_std))
    with torch.no_grad():
        backbone.trunk((resize_like_model(model, pixels)[None] - mean) / std)
    hook.remove()
    plane = seen[0][0, 3]
    assert units[0]["activation"] == pytest.approx(float(plane.max()), rel=1e-5)
    assert units[0]["cell_yx"] == list(divmod(int(plane.argmax()), plane.shape[1]))


@pytest.mark.parametrize("case", ["detection", "layer", "box", "missing_checkpoint", "similar", "metrics"])
def test_bad_input_is_one_line_naming_it(case, run_dir, tmp_path, capsys):
    ckpt, image = str(run_dir / "model_final.pt"), str(_first_image(run_dir))
    base = ["--checkpoint", ckpt, "--image", image, "--out", str(tmp_path)]
    if case == "detection":
        code, expected = explain.main(base + ["--detection", "100000"]), "--detection 100000 does not exist"
    elif case == "layer":
        code, expected = explain.main(base + ["--layer", "conv99"]), "unknown layer 'conv99'"
    elif case == "box":
        code, expected = explain.main(base + ["--box", "10,10,60,70"]), "--box needs --label"
    elif case == "missing_checkpoint":
        code = analyze.main(["--checkpoint", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "r")])
        expected = "checkpoint not found"
    elif case == "similar":
        code = analyze.main(["--checkpoint", ckpt, "--out", str(tmp_path / "r"), "--similar", "round=circle,oval"])
        expected = "unknown classes ['oval']"
    else:
        code = analyze.main(["--checkpoint", ckpt, "--out", str(tmp_path / "r"), "--metrics", str(tmp_path / "no")])
        expected = f"--metrics {tmp_path / 'no'}: no metrics.jsonl there"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and expected in err[-1]


def test_tools_scripts_run_from_a_checkout(tmp_path):
    missing = ["--checkpoint", str(tmp_path / "x.pt")]
    runs = [subprocess.Popen([sys.executable, str(REPO / "tools" / f"{tool}.py"), *missing, *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            for tool, extra in (("analyze", []), ("explain", ["--image", str(tmp_path / "i.jpg")]))]
    for run in runs:            # started together: two interpreter start-ups in the time of one
        _, err = run.communicate(timeout=120)
        assert run.returncode == 2 and err.startswith("error: "), err


def test_report_from_detections_alone_with_a_proposal_store(voc_tree, tmp_path):
    from detect.analysis.report import ReportOptions, build_report, open_proposal_store
    from detect.errors import DetectError
    from proposals.store import ProposalStore

    _, records, names = voc_tree
    store = ProposalStore(tmp_path / "store", "voc-test", {"source": "ground truth, twice"})
    store.prepare()
    with store.writer() as writer:
        for record in records:                 # the objects themselves, then a shifted copy: recall 1 at IoU 1
            writer.add(record.image_id, np.concatenate([record.boxes + 3, record.boxes]).astype(np.float32))
    store.merge()
    rng = np.random.default_rng(0)
    detections = {r.image_id: {"boxes": r.boxes + rng.normal(0, 2, r.boxes.shape).astype(np.float32),
                               "scores": rng.random(len(r.labels)).astype(np.float32), "labels": r.labels}
                  for r in records}
    options = ReportOptions(occlusion=0, deconv_layer="", proposals=store.directory.parent, samples=2)
    index = build_report(None, records, names, detections, tmp_path / "report", options=options,
                         info={"source": "hand-made"}, log=lambda m: None)
    numbers = json.loads((tmp_path / "report" / "analysis.json").read_text())
    recall = numbers["proposal_recall"]["stored proposals"]
    assert recall["recall@0.7"] == 1.0 and recall["recall_vs_iou"]["recall"][-1] == 1.0
    page = index.read_text(encoding="utf-8")
    assert all((index.parent / ref).is_file() for ref in referenced_files(page))
    assert "Occlusion sensitivity" not in page and "Deconvnet" not in page
    aps = []                                    # the devkit on the same boxes, in VOC pixels
    for c in range(len(names)):
        gt = {r.image_id: [(b[0] + 1, b[1] + 1, b[2], b[3], d) for b, l, d in zip(r.boxes.astype(float), r.labels,
                                                                                  r.difficult) if l == c]
              for r in records}
        dl = [(i, float(s), b[0] + 1, b[1] + 1, b[2], b[3]) for i, d in detections.items()
              for b, s, l in zip(d["boxes"].astype(float), d["scores"], d["labels"]) if l == c]
        aps.append(devkit_ap(gt, dl, use_07=True))
    assert numbers["summary"]["mAP"] > 0.5      # jittered ground truth
    assert numbers["summary"]["mAP"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    with pytest.raises(DetectError, match="not a proposal store folder"):
        open_proposal_store(tmp_path)


def test_models_without_a_whole_image_pipeline_get_notes_not_crashes(voc_tree, tmp_path):
    """A model without the Detector's hooks (score_boxes, an input transform): notes instead of the sections."""
    from torch import nn

    from detect.analysis.report import ReportOptions, build_report

    class WarpingDetector(nn.Module):   # a predict-only model, not a Detector
        pass

    _, records, names = voc_tree
    detections = {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.labels), np.float32), "labels": r.labels}
                  for r in records}
    options = ReportOptions(occlusion=1, deconv_layer="conv1", samples=1)
    index = build_report(WarpingDetector(), records, names, detections, tmp_path / "report", options=options,
                         log=lambda m: None)
    page = index.read_text(encoding="utf-8")
    assert "no score_boxes hook to score a fixed box" in page
    assert "no input transform and trunk to project through" in page


# ---------------------------------------------------------------- data, training, thresholds, confusion, thumbnails
def _section_tables(page: str, anchor: str) -> list[list[list[str]]]:
    """The tables of one section (from its <h2 id=anchor> to the next <h2>): rows of cell texts."""
    body = page.split(f'<h2 id="{anchor}">', 1)[1].split("<h2 ", 1)[0]
    return [[re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
            for table in re.findall(r"<table>(.*?)</table>", body, re.S)]


def _hand_made_split(root: Path):
    from PIL import Image

    from detect.data.records import ImageRecord

    root.mkdir()
    for name, size in (("a", (200, 150)), ("b", (120, 100))):
        Image.new("RGB", size, (90, 90, 90)).save(root / f"{name}.png")
    records = [ImageRecord("a", root / "a.png", 200, 150, boxes=[[10, 10, 60, 60], [100, 20, 160, 80],
                                                                 [20, 90, 50, 120]], labels=[0, 1, 0]),
               ImageRecord("b", root / "b.png", 120, 100, boxes=[[0, 0, 120, 100]], labels=[1])]
    detections = {"a": {"boxes": np.array([[10, 10, 60, 60], [100, 20, 160, 80], [150, 100, 190, 140],
                                           [20, 90, 50, 120]], np.float32),
                        "scores": np.array([0.9, 0.8, 0.6, 0.3], np.float32), "labels": np.array([0, 0, 1, 0])},
                  "b": {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                        "labels": np.zeros(0, np.int64)}}
    return records, detections


def test_report_sections_on_data_training_thresholds_and_confusion_have_the_right_numbers(tmp_path):
    """Hand-computed: at score 0.5 the cat is found, the dog called a cat, one cat (0.3) and the dog of b missed,
    a stray dog is background; the cat's best F1 (0.8) is at 0.3. Catches a section missing or misnumbered."""
    from PIL import Image

    from detect.analysis.report import ReportOptions, build_report

    records, detections = _hand_made_split(tmp_path / "images")
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text('{"iteration": 2, "lr": 0.01, "loss": 3.0, "loss_cls": 2.0}\n'
                   '{"iteration": 2, "split": "val", "metric": "voc07", "mAP": 0.125}\n'
                   '{"iteration": 4, "lr": 0.02, "loss": 1.5, "loss_cls": 1.0}\n')
    options = ReportOptions(occlusion=0, deconv_layer="", samples=1, training_log=log)
    index = build_report(None, records, ["cat", "dog"], detections, tmp_path / "report", options=options,
                         log=lambda m: None)
    page = index.read_text(encoding="utf-8")

    (confusion,) = _section_tables(page, "class-confusion")
    assert confusion == [["true \\ predicted", "cat", "dog", "missed"], ["cat", "1", "0", "1"],
                         ["dog", "1", "0", "1"], ["background", "0", "1", "0"]]
    assert "1 of 4 objects (25.0%) found with the right class" in page

    thresholds = _section_tables(page, "average-precision")[1]
    assert thresholds[0][:7] == ["class", "objects", "TP", "FP", "precision", "recall", "F1"]
    assert thresholds[1] == ["cat", "2", "1", "1", "0.5000", "0.5000", "0.5000", "0.3000", "0.6667", "1.0000",
                             "0.8000"]
    assert thresholds[2] == ["dog", "2", "0", "1", "0.0000", "0.0000", "0.0000", "n/a", "n/a", "n/a", "n/a"]
    assert thresholds[3][:7] == ["all", "4", "1", "2", "0.3333", "0.2500", "0.2857"]

    classes, sizes = _section_tables(page, "dataset")
    assert classes[1:] == [["cat", "2", "0", "1", "1", "1", "0"], ["dog", "2", "0", "2", "0", "1", "1"],
                           ["all", "4", "0", "2", "1", "2", "1"]]
    assert sizes[1] == ["all, image pixels", "0", "0", "1", "2", "1", "0", "0", "0"]   # 30 | 50, 60 | 109.5

    series, evaluations = _section_tables(page, "training-curves")
    assert series[1] == ["loss", "2", "3.0000", "4", "1.5000", "1.5000"]
    assert series[3] == ["lr", "2", "0.0100", "4", "0.0200", "0.0100"]
    assert evaluations[1] == ["2", "val", "voc07", "0.1250"]

    numbers = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert numbers["confusion"]["matrix"] == [[1, 0, 1], [1, 0, 1], [0, 1, 0]]
    assert numbers["thresholds"]["per_class"]["cat"]["best_thresh"] == pytest.approx(0.3)
    assert numbers["dataset"]["classes"]["dog"] == {"objects": 2, "difficult": 0, "images": 2}
    assert numbers["training"]["final"]["loss"] == 1.5

    # gallery: a 320 px wide thumbnail (tags drawn at that size) that opens the full-size drawing
    link, thumb = re.search(r'<a href="(samples/best_00[^"]*)"><img src="(samples/best_00[^"]*)"', page).groups()
    assert (link, thumb) == ("samples/best_00.jpg", "samples/best_00_thumb.jpg")
    with Image.open(tmp_path / "report" / thumb) as small, Image.open(tmp_path / "report" / link) as full:
        assert small.size == (320, 240) and full.size == (200, 150)
    legend = re.search(r'<p class="legend">(.*?)</p>', page).group(1)
    assert re.findall(r">(\w+)</span>", legend) == ["cat", "dog"]


def test_report_without_a_training_log_says_how_to_give_one(voc_tree, tmp_path):
    from detect.analysis.report import ReportOptions, build_report

    _, records, names = voc_tree
    detections = {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.labels), np.float32), "labels": r.labels}
                  for r in records}
    index = build_report(None, records, names, detections, tmp_path / "report",
                         options=ReportOptions(occlusion=0, deconv_layer="", samples=1), log=lambda m: None)
    page = index.read_text(encoding="utf-8")
    assert "no metrics.jsonl found next to the checkpoint (tools/analyze.py --metrics PATH names one)" in page
    assert json.loads((tmp_path / "report" / "analysis.json").read_text())["training"] is None
