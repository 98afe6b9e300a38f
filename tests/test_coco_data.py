"""COCO JSON reading (crowd kept as ignored, degenerate boxes dropped) and VOC <-> COCO conversion."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from detect.cli.convert import main as convert_main
from detect.data.coco import COCODataset
from detect.data.voc import DegenerateBoxWarning, VOCDataset
from detect.errors import DatasetError
from detect.evaluation import evaluate


def coco_file(tmp_path, annotations):
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                       {"id": 3, "file_name": "b.jpg", "width": 50, "height": 50}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
            "annotations": annotations}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_labels_and_crowd(tmp_path):
    path = coco_file(tmp_path, [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 20, 30, 40], "iscrowd": 0, "area": 1200},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 80], "iscrowd": 1, "area": 8000},
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0, "area": 0},
    ])
    with pytest.warns(DegenerateBoxWarning, match="annotation id 3 of image 'b.jpg'"):
        data = COCODataset(path, tmp_path)
    assert data.class_names == ["person", "dog"] and data.category_ids == [1, 18]
    b, a = data.records                              # sorted by COCO id: 3 then 7
    assert a.image_id == "7" and a.path == tmp_path / "a.jpg"
    assert a.boxes.tolist() == [[10, 20, 40, 60], [0, 0, 100, 80]]
    assert a.labels.tolist() == [1, 0] and a.difficult.tolist() == [False, True]
    assert len(b.boxes) == 0
    only_dogs = COCODataset(path, tmp_path, classes=["dog"])
    assert only_dogs.records[1].labels.tolist() == [0]
    with pytest.raises(DatasetError, match=r"classes \['cat'\] are not categories"):
        COCODataset(path, tmp_path, classes=["cat"])


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON at line 1"),
    ("[]", "expected a JSON object"),
    ('{"images": [], "categories": []}', "missing or non-list 'annotations'"),
    ('{"images": [], "categories": [], "annotations": [{"image_id": 1, "category_id": 1, "bbox": "x"}]}', "annotation #0"),
])
def test_bad_coco_json(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        COCODataset(path, tmp_path)
    assert message in str(info.value) and "bad.json" in str(info.value)


def test_voc_to_coco_to_voc_round_trip(tmp_path, voc_tree, capsys):
    root, records, names = voc_tree
    out_json = tmp_path / "test.json"
    assert convert_main(["voc2coco", "--voc", str(root), "--split", "test", "--out", str(out_json),
                         "--classes", ",".join(names)]) == 0
    data = json.loads(out_json.read_text())
    assert len(data["images"]) == len(records)
    assert len(data["annotations"]) == sum(len(r.boxes) for r in records)
    assert sum(a["iscrowd"] for a in data["annotations"]) == sum(int(r.difficult.sum()) for r in records)
    back = tmp_path / "back"
    assert convert_main(["coco2voc", "--coco", str(out_json), "--images", str(root / "JPEGImages"),
                         "--out", str(back), "--split", "test"]) == 0
    again = VOCDataset(back, "test", classes=names)
    for r0, r1 in zip(records, again.records):
        assert r0.image_id == r1.image_id
        np.testing.assert_array_equal(r0.boxes, r1.boxes)
        np.testing.assert_array_equal(r0.labels, r1.labels)
        np.testing.assert_array_equal(r0.difficult, r1.difficult)
        assert r1.path.is_file()


def test_perfect_detections_score_one_on_every_metric(voc_tree):
    _, records, names = voc_tree
    dets = {r.image_id: {"boxes": r.boxes[~r.difficult], "scores": np.ones(int((~r.difficult).sum())),
                         "labels": r.labels[~r.difficult]} for r in records}
    out = evaluate(records, dets, names, "all")
    assert out["voc07"]["mAP"] == pytest.approx(1.0) and out["voc10"]["mAP"] == pytest.approx(1.0)
    assert out["coco"]["stats"]["AP50"] == pytest.approx(1.0) and out["coco"]["mAP"] == pytest.approx(1.0)
    assert evaluate(records, {}, names, "coco")["mAP"] == 0.0


def test_train_and_evaluate_from_coco_json_made_by_convert(tmp_path, capsys):
    # The COCO path of the README: VOC tree -> detect-convert voc2coco per split -> detect-train with
    # data.format=coco, data.root = the folder file_name is relative to, data.annotations with "{split}".
    # Catches a root/file_name join that misses the images (every image skipped: no training), classes or
    # images lost between the JSON and the model, a loss that does not fall, and a COCO result without its keys.
    from detect import load_config
    from detect.recipes import RunOptions, train
    from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
    from detect.evaluation.coco import STAT_NAMES

    voc = generate_synthetic(tmp_path / "voc", num_images=20, seed=3, style="plain", min_side=128, max_side=160)
    for split in ("trainval", "test"):
        assert convert_main(["voc2coco", "--voc", str(voc), "--split", split,
                             "--out", str(tmp_path / "coco" / f"{split}.json")]) == 0
    train_json = json.loads((tmp_path / "coco" / "trainval.json").read_text())
    trainval_ids = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert len(train_json["images"]) == len(trainval_ids) == 16
    present = sorted({SYNTHETIC_CLASSES[a["category_id"] - 1] for a in train_json["annotations"]})
    config = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn" / "tiny_custom.yaml"
    overrides = ["data.format=coco", f"data.root={voc / 'JPEGImages'}",
                 f"data.annotations={tmp_path / 'coco'}/{{split}}.json", "data.classes=auto",
                 "model.input.auto=false", "model.anchors.auto=false", "model.input.min_size=[128]",
                 "model.input.max_size=160", "model.input.test_min_size=128", "model.anchors.sizes=[16, 32, 64, 128]",
                 "pretrain.steps=0", "train.max_iter=40", "train.log_period=5", "train.warmup_iters=5",
                 "train.checkpoint_period=0", "test.metric=coco"]
    result = train(load_config(config, overrides), RunOptions(out=tmp_path / "run", progress=False))
    out = capsys.readouterr().out
    names = json.loads((tmp_path / "run" / "class_names.json").read_text())
    assert names == [c["name"] for c in train_json["categories"]] and set(present) <= set(names)
    assert f"training on 16 images of 'trainval' ({len(names)} classes)" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.8 * losses[0]
    test = result["test"]
    assert test["metric"] == "coco" and set(test["stats"]) == set(STAT_NAMES) and set(test["per_class"]) == set(names)
    assert test["mAP"] == test["stats"]["AP"]
    assert "COCO mAP on 'test' (4 images)" in out


def test_splits_for_a_voc_folder_without_image_sets(tmp_path, capsys):
    # A folder from an annotation tool has Annotations/ and JPEGImages/ only; the VOC reader needs split files.
    # Catches splits that overlap, lose ids, list an annotation without its image, or depend on anything but the seed.
    import shutil

    from detect.data.convert import make_splits
    from tests.conftest import make_voc_tree

    root = tmp_path / "voc"
    ids, names = make_voc_tree(root, num_images=10)
    shutil.rmtree(root / "ImageSets")
    (root / "Annotations" / "orphan.xml").write_text((root / "Annotations" / "img0.xml").read_text())   # no image
    assert convert_main(["splits", "--voc", str(root)]) == 0
    assert "train 6, val 2, trainval 8, test 2 images" in capsys.readouterr().out
    split = {s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval", "test")}
    assert sorted(split["trainval"] + split["test"]) == sorted(ids)
    assert sorted(split["train"] + split["val"]) == split["trainval"] and not set(split["val"]) & set(split["train"])
    assert len(VOCDataset(root, "trainval", classes="auto").records) == 8
    # existing split files are kept unless asked
    assert convert_main(["splits", "--voc", str(root), "--seed", "1"]) == 2
    assert "already has train.txt, val.txt, trainval.txt, test.txt; pass --overwrite" in capsys.readouterr().err
    again = make_splits(root, overwrite=True)
    assert again["test"] == split["test"]                                          # the same seed, the same split
    other = make_splits(root, seed=1, overwrite=True, test_fraction=0.5, val_fraction=0.0)
    assert len(other["test"]) == 5 and other["val"] == [] and other["train"] == other["trainval"]
    with pytest.raises(DatasetError, match="Annotations not found"):
        make_splits(tmp_path / "empty")
    with pytest.raises(DatasetError, match="split fractions"):
        make_splits(root, test_fraction=0.7, val_fraction=0.4, overwrite=True)
