"""tools/eval.py on the real VOC-format datasets and on COCO files, against independent oracles."""

import contextlib
import io
import json
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
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    gt_path = tmp_path / "gt.json"
    voc_to_coco(root, "test", gt_path, classes="auto")
    gt = json.loads(gt_path.read_text())
    rng = np.random.default_rng(3)
    results = []
    for ann in gt["annotations"]:
        for _ in range(2):
            x, y, w, h = ann["bbox"]
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x + rng.normal(0, 3), y + rng.normal(0, 3), max(w + rng.normal(0, 4), 1.0),
                                     max(h + rng.normal(0, 4), 1.0)], "score": float(rng.random())})
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(results))
    out = tmp_path / "coco.json"
    assert eval_main(["--coco", str(gt_path), "--detections", str(res_path), "--metric", "coco", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(res_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [ours["stats"][k] for k in names] == pytest.approx(list(evaluator.stats), abs=1e-6)
    assert ours["mAP"] == pytest.approx(evaluator.stats[0], abs=1e-6)
    assert set(ours["per_class"]) == {c["name"] for c in gt["categories"]}


def test_voc_split_evaluated_with_coco_metric_equals_pycocotools(tmp_path, voc_tree):
    root, records, names = voc_tree
    dets = noisy_detections(records, len(names), seed=5)
    write_voc_results(tmp_path / "d", dets, names, "test")
    out = tmp_path / "all.json"
    assert eval_main(["--voc", str(root), "--split", "test", "--detections", str(tmp_path / "d"), "--metric", "all",
                      "--classes", ",".join(names), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"metric", "voc07", "voc10", "coco"}
    assert 0.0 < result["coco"]["mAP"] <= 1.0
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
