"""tools/eval.py on the real VOC-format datasets and on COCO files, against independent oracles."""

import contextlib
import copy
import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detect.cli.eval import main as eval_main
from detect.data.convert import voc_to_coco
from detect.data.voc import VOCDataset
from detect.evaluation.results import write_voc_results
from tests.devkit_reference import devkit_ap

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_from_voc_xml(root: Path, split: str, names: list[str] | None = None) -> dict:
    """The test's own VOC -> COCO conversion, read straight from the XML (no detect code).

    COCO's ``[x, y, w, h]`` of VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)`` is
    ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``; difficult objects are crowd
    regions. Ids are deliberately not the library's (images 1001.., categories 11, 21, ..)
    so that nothing below can lean on them matching.
    """
    lines = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().splitlines()
    ids = [line.split()[0] for line in lines if line.strip()]
    parsed = {i: ET.parse(root / "Annotations" / f"{i}.xml").getroot() for i in ids}
    if names is None:
        names = sorted({o.findtext("name").strip() for r in parsed.values() for o in r.iter("object")})
    cat_id = {name: 10 * k + 11 for k, name in enumerate(names)}
    images, annotations = [], []
    for n, voc_id in enumerate(ids):
        xml = parsed[voc_id]
        width, height = (int(float(xml.findtext(f"size/{t}"))) for t in ("width", "height"))
        images.append({"id": 1001 + n, "file_name": xml.findtext("filename"), "voc_id": voc_id,
                       "width": width, "height": height})
        for obj in xml.iter("object"):
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height   # no clipping to reproduce
            w, h = xmax - xmin + 1, ymax - ymin + 1
            crowd = int((obj.findtext("difficult") or "0").strip() == "1")
            annotations.append({"id": len(annotations) + 1, "image_id": 1001 + n,
                                "category_id": cat_id[obj.findtext("name").strip()],
                                "bbox": [xmin - 1, ymin - 1, w, h], "area": w * h, "iscrowd": crowd})
    categories = [{"id": cat_id[name], "name": name} for name in names]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results_from_voc_files(det_dir: Path, split: str, gt: dict) -> list[dict]:
    """The test's own reading of VOC results files (``id score xmin ymin xmax ymax``) as COCO results of ``gt``."""
    image_of = {im["voc_id"]: im["id"] for im in gt["images"]}
    results = []
    for cat in gt["categories"]:
        for line in (det_dir / f"comp4_det_{split}_{cat['name']}.txt").read_text().splitlines():
            voc_id, score, xmin, ymin, xmax, ymax = line.split()
            x, y = float(xmin) - 1, float(ymin) - 1
            results.append({"image_id": image_of[voc_id], "category_id": cat["id"], "score": float(score),
                            "bbox": [x, y, float(xmax) - x, float(ymax) - y]})
    return results


def pycocotools_numbers(gt: dict, results: list[dict]) -> tuple[list[float], dict[str, float]]:
    """COCOeval called directly: its 12 stats, and per category AP@[.5:.95] (COCOeval run on that category alone)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))

        def run(cat_ids=None):
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            if cat_ids is not None:
                evaluator.params.catIds = cat_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            return [float(v) for v in evaluator.stats]

        stats = run()
        per_class = {cat["name"]: run([cat["id"]])[0] for cat in gt["categories"]}
    return stats, {name: (math.nan if ap == -1 else ap) for name, ap in per_class.items()}


def assert_coco_numbers(ours: dict, stats: list[float], per_class: dict[str, float]) -> None:
    assert [ours["stats"][k] for k in STAT_NAMES] == pytest.approx(stats, abs=1e-9)
    assert ours["mAP"] == pytest.approx(stats[0], abs=1e-9)
    got = {name: (math.nan if ap is None else ap) for name, ap in ours["per_class"].items()}
    assert got == pytest.approx(per_class, abs=1e-9, nan_ok=True)


def noisy_detections(records, num_classes, seed):
    """Ground truth jittered, relabelled and duplicated, plus random boxes; coarse scores make ties."""
    rng = np.random.default_rng(seed)
    out = {}
    for r in records:
        n = len(r.boxes)
        keep = rng.random(n) < 0.85
        boxes = r.boxes[keep].astype(np.float64)
        sizes = np.maximum(boxes[:, 2:] - boxes[:, :2], 1)
        boxes = boxes + rng.normal(0, 0.12, boxes.shape) * np.concatenate([sizes, sizes], 1)
        labels = np.where(rng.random(len(boxes)) < 0.9, r.labels[keep], rng.integers(0, num_classes, len(boxes)))
        dup = boxes[: len(boxes) // 3] + rng.normal(0, 3, (len(boxes) // 3, 4))
        m = rng.integers(0, 6)
        xy = rng.uniform(0, max(r.width - 20, 1), (m, 2))
        rand = np.concatenate([xy, xy + rng.uniform(5, 120, (m, 2))], 1)
        all_boxes = np.concatenate([boxes, dup, rand])
        all_boxes[:, 2:] = np.maximum(all_boxes[:, 2:], all_boxes[:, :2] + 1)
        all_boxes = np.round(all_boxes, 1)
        all_labels = np.concatenate([labels, labels[: len(dup)], rng.integers(0, num_classes, m)])
        scores = np.round(rng.random(len(all_boxes)), 2)
        out[r.image_id] = {"boxes": all_boxes, "scores": scores, "labels": all_labels}
    return out


def oracle(records, dets, names, use_07):
    aps = []
    for c in range(len(names)):
        gt = {r.image_id: [(b[0] + 1, b[1] + 1, b[2], b[3], d) for b, l, d in zip(r.boxes.astype(float), r.labels, r.difficult) if l == c]
              for r in records}
        dl = [(r.image_id, float(s), b[0] + 1, b[1] + 1, b[2], b[3])
              for r in records for b, s, l in zip(dets[r.image_id]["boxes"], dets[r.image_id]["scores"], dets[r.image_id]["labels"]) if l == c]
        aps.append(devkit_ap(gt, dl, use_07))
    return aps


@pytest.mark.parametrize("name", ["bccd", "raccoon"])
def test_voc_files_give_devkit_map_on_real_datasets(name, tmp_path):
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    data = VOCDataset(root, "test", classes="auto", class_split="trainval")
    dets = noisy_detections(data.records, len(data.class_names), seed=len(name))
    write_voc_results(tmp_path / "dets", dets, data.class_names, "test", image_ids=[r.image_id for r in data.records])
    for metric, use_07 in (("voc07", True), ("voc10", False)):
        out = tmp_path / f"{metric}.json"
        assert eval_main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "dets"),
                          "--metric", metric, "--classes", ",".join(data.class_names), "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        expected = oracle(data.records, dets, data.class_names, use_07)
        assert result["metric"] == metric
        assert [result["per_class"][n] for n in data.class_names] == pytest.approx(expected, abs=1e-6)
        assert result["mAP"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
        assert 0.05 < result["mAP"] < 0.98          # the noisy detections are neither useless nor perfect


@pytest.mark.parametrize("name", ["bccd", "raccoon"])
def test_coco_files_give_pycocotools_numbers(name, tmp_path):
    """Catches a converter that moves boxes or mixes up images/classes, and a wrong COCO metric or per-class AP.

    The oracle is pycocotools on ground truth the test reads from the XML itself and on
    results made from that ground truth; the tool gets the converter's JSON (ids mapped).
    """
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    own = coco_from_voc_xml(root, "test")
    rng = np.random.default_rng(3)
    results = []
    for ann in own["annotations"]:
        for _ in range(2):
            x, y, w, h = ann["bbox"]
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x + rng.normal(0, 3), y + rng.normal(0, 3), max(w + rng.normal(0, 4), 1.0),
                                     max(h + rng.normal(0, 4), 1.0)], "score": float(rng.random())})
    stats, per_class = pycocotools_numbers(own, results)
    assert 0.2 < stats[0] < 0.9 and all(0 < ap < 1 for ap in per_class.values())   # neither trivial nor perfect

    gt_path = tmp_path / "gt.json"
    voc_to_coco(root, "test", gt_path, classes="auto")
    converted = json.loads(gt_path.read_text())
    image_of = {im["voc_id"]: im["id"] for im in converted["images"]}
    cat_of = {c["name"]: c["id"] for c in converted["categories"]}
    own_image = {im["id"]: im["voc_id"] for im in own["images"]}
    own_cat = {c["id"]: c["name"] for c in own["categories"]}
    mapped = [{**r, "image_id": image_of[own_image[r["image_id"]]], "category_id": cat_of[own_cat[r["category_id"]]]}
              for r in results]
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(mapped))
    out = tmp_path / "coco.json"
    assert eval_main(["--coco", str(gt_path), "--detections", str(res_path), "--metric", "coco", "--json", str(out)]) == 0
    assert_coco_numbers(json.loads(out.read_text()), stats, per_class)
    # with --coco the metric defaults to COCO's (it was VOC07)
    default = tmp_path / "default.json"
    assert eval_main(["--coco", str(gt_path), "--detections", str(res_path), "--json", str(default)]) == 0
    assert json.loads(default.read_text()) == json.loads(out.read_text())


def test_voc_split_evaluated_with_coco_metric_equals_pycocotools(tmp_path, voc_tree):
    """Catches COCO numbers off pycocotools' (halved, per-class APs swapped) and boxes moved by records_to_coco.

    The oracle is pycocotools on the test's own COCO version of the VOC XML (difficult objects
    as crowd regions) and of the results files the tool reads.
    """
    root, _, names = voc_tree
    for image in ("img0", "img3"):      # the fixture drew no difficult object: make the first of two difficult
        xml = root / "Annotations" / f"{image}.xml"
        xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    records = VOCDataset(root, "test", classes=names).records
    dets = noisy_detections(records, len(names), seed=5)
    write_voc_results(tmp_path / "d", dets, names, "test")
    out = tmp_path / "all.json"
    assert eval_main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "d"), "--metric", "all",
                      "--classes", ",".join(names), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"metric", "voc07", "voc10", "coco"}
    own = coco_from_voc_xml(root, "test", names)
    assert sum(a["iscrowd"] for a in own["annotations"]) == 2      # the difficult -> crowd rule is exercised
    stats, per_class = pycocotools_numbers(own, coco_results_from_voc_files(tmp_path / "d", "test", own))
    assert 0.05 < stats[0] < 0.95 and len(set(per_class.values())) == len(names)    # distinct, non-trivial APs
    assert_coco_numbers(result["coco"], stats, per_class)
    assert result["voc07"]["mAP"] == pytest.approx(float(np.mean(oracle(records, dets, names, True))), abs=1e-9)


@pytest.mark.parametrize("line, message", [
    ("img0 high 1 1 10 10\n", "score 'high' is not a number"),
    ("img0 0.5 1 1 10\n", "expected 6 fields"),
    ("nope 0.5 1 1 10 10\n", "unrecognized image 'nope'"),
    ("img0 0.5 1 1 x 10\n", "non-numeric coordinate"),
])
def test_malformed_results_file_is_one_clear_error(tmp_path, voc_tree, capsys, line, message):
    root, records, names = voc_tree
    det_dir = tmp_path / "d"
    det_dir.mkdir()
    (det_dir / f"comp4_det_test_{names[0]}.txt").write_text("img0 0.9 1 1 10 10\n" + line)
    code = eval_main(["--voc", str(root), "--split", "test", "--detections", str(det_dir), "--classes", ",".join(names)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0]
    assert f"comp4_det_test_{names[0]}.txt:2" in err[0]


def test_missing_detections_directory_and_bad_coco_json(tmp_path, voc_tree, capsys):
    root, _, names = voc_tree
    assert eval_main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "none")]) == 2
    assert "detections directory not found" in capsys.readouterr().err
    bad = tmp_path / "gt.json"
    bad.write_text("{\"images\": [}")
    res = tmp_path / "r.json"
    res.write_text("[]")
    assert eval_main(["--coco", str(bad), "--detections", str(res), "--metric", "coco"]) == 2
    err = capsys.readouterr().err
    assert "gt.json" in err and "not valid JSON" in err
