"""Results at the file edges: predict output to numpy, VOC results files and COCO results JSON.

Written from mutation testing (mutmut over detect/evaluation/results.py): each test names the mutants
it kills. Values are checked exactly: the module promises that evaluating the files gives bit for bit
what evaluating the detections in memory gives.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detect.data.records import ImageRecord
from detect.errors import ResultsFormatError
from detect.evaluation.results import (detection_to_numpy, read_coco_results, read_voc_results,
                                       read_voc_results_file, voc_results_path, write_coco_results,
                                       write_voc_results)
from detect.evaluation.voc import detections_by_class, evaluate_voc

NAMES = ["cat", "dog"]


def records():
    boxes = np.array([[10, 20, 30, 40], [0, 0, 50, 50]], np.float32)
    return [ImageRecord("a", Path("a.jpg"), 60, 60, boxes, np.array([0, 1]), np.zeros(2, bool)),
            ImageRecord("b", Path("b.jpg"), 60, 60, boxes[:1], np.array([0]), np.zeros(1, bool)),
            ImageRecord("c", Path("c.jpg"), 60, 60, np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, bool))]


def fractional_detections():
    """float32 boxes and scores whose values are not short decimals (as a model outputs them)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for image_id, n in (("b", 3), ("a", 2)):
        xy = torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 20], 1)
        out[image_id] = {"boxes": boxes.numpy(), "scores": torch.rand(n, generator=g).numpy(),
                         "labels": np.arange(n) % 2}
    return out


def test_detection_to_numpy_values_dtypes_and_shapes():
    # Kills: every mutant of detection_to_numpy (no test called it): keys, float32/int64 casts, reshapes.
    out = detection_to_numpy({"boxes": torch.tensor([[1.5, 2.25, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]],
                                                    dtype=torch.float64, requires_grad=True),
                              "scores": torch.tensor([[0.75], [0.5]]), "labels": torch.tensor([[2], [0]], dtype=torch.int32)})
    assert set(out) == {"boxes", "scores", "labels"}
    assert out["boxes"].dtype == np.float32 and out["boxes"].tolist() == [[1.5, 2.25, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]]
    assert out["scores"].dtype == np.float32 and out["scores"].tolist() == [0.75, 0.5]
    assert out["labels"].dtype == np.int64 and out["labels"].tolist() == [2, 0]
    empty = detection_to_numpy({"boxes": torch.zeros(0), "scores": torch.zeros(0),
                                "labels": torch.zeros(0, dtype=torch.int64)})
    assert (empty["boxes"].shape, empty["scores"].shape, empty["labels"].shape) == ((0, 4), (0,), (0,))


def test_voc_results_files_names_order_and_lines(tmp_path):
    # Kills: the default prefix "comp4" mutated, image_ids ignored (dict order used), "continue" -> "break"
    # at an image without detections, the returned paths replaced, a custom prefix dropped.
    dets = {"b": {"boxes": np.array([[0.0, 1.0, 10.0, 11.0]]), "scores": np.array([0.25]), "labels": np.array([0])},
            "a": {"boxes": np.array([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]]), "scores": np.array([0.5, 0.125]),
                  "labels": np.array([0, 1])}}
    paths = write_voc_results(tmp_path, dets, NAMES, "test", image_ids=["a", "c", "b"])
    assert paths == [tmp_path / "comp4_det_test_cat.txt", tmp_path / "comp4_det_test_dog.txt"]
    assert paths[0].read_text() == "a 0.5 11.0 21.0 30.0 40.0\nb 0.25 1.0 2.0 10.0 11.0\n"    # VOC pixels: +1 on x1, y1
    assert paths[1].read_text() == "a 0.125 2.0 3.0 3.0 4.0\n"
    assert write_voc_results(tmp_path, dets, NAMES, "val", prefix="comp3")[0] == tmp_path / "comp3_det_val_cat.txt"
    assert voc_results_path(tmp_path, "val", "dog") == tmp_path / "comp4_det_val_dog.txt"


def test_column_shaped_scores_and_labels_are_written_like_flat_ones(tmp_path):
    # Kills: reshape(-1) of scores and labels dropped in write_voc_results and detections_to_coco
    # (a (N, 1) column then reaches float() / int() one row at a time, which numpy refuses).
    flat = fractional_detections()
    column = {k: dict(d, scores=d["scores"].reshape(-1, 1), labels=d["labels"].reshape(-1, 1)) for k, d in flat.items()}
    for name, dets in (("flat", flat), ("column", column)):
        write_voc_results(tmp_path / name, dets, NAMES, "test")
        write_coco_results(tmp_path / name / "r.json", dets, {"a": 1, "b": 2}, [1, 2])
    for file in ("comp4_det_test_cat.txt", "comp4_det_test_dog.txt", "r.json"):
        assert (tmp_path / "column" / file).read_text() == (tmp_path / "flat" / file).read_text()


def test_voc_files_read_back_bit_for_bit_what_memory_evaluates(tmp_path):
    dets, recs = fractional_detections(), records()
    write_voc_results(tmp_path, dets, NAMES, "test", image_ids=[r.image_id for r in recs])
    from_files = read_voc_results(tmp_path, "test", NAMES, recs)
    for got, want in zip(from_files, detections_by_class(recs, dets, len(NAMES))):
        for field in ("image_index", "scores", "boxes"):
            assert getattr(got, field).dtype == getattr(want, field).dtype
            assert np.array_equal(getattr(got, field), getattr(want, field))
    assert (evaluate_voc(recs, {}, NAMES, "voc10", class_dets=from_files)["per_class"]
            == evaluate_voc(recs, dets, NAMES, "voc10")["per_class"])


def test_prefix_chooses_among_several_results_files(tmp_path):
    # Kills: the prefix ignored or passed wrongly to voc_results_path, "> 1" -> "> 2", the message dropped.
    (tmp_path / "comp3_det_test_cat.txt").write_text("a 0.9 11 21 30 40\n")
    (tmp_path / "comp4_det_test_cat.txt").write_text("b 0.8 11 21 30 40\nb 0.7 1 1 5 5\n")
    (tmp_path / "comp3_det_test_dog.txt").write_text("")
    cat, dog = read_voc_results(tmp_path, "test", NAMES, records(), prefix="comp3")
    assert cat.image_index.tolist() == [0] and cat.scores.tolist() == [0.9] and len(dog.scores) == 0
    with pytest.raises(ResultsFormatError, match=r"several results files for class 'cat': "
                                                 r"\['comp3_det_test_cat.txt', 'comp4_det_test_cat.txt'\]; pass a prefix"):
        read_voc_results(tmp_path, "test", NAMES, records())


def test_a_missing_class_file_is_empty_with_a_warning_and_no_file_is_an_error(tmp_path):
    # Kills: the empty ClassDetections of a missing class (None, wrong dtypes or shapes), "continue" ->
    # "break" after it, the class name missing from the warning, the no-file message dropped.
    (tmp_path / "comp4_det_test_dog.txt").write_text("a 0.9 1 1 50 50\n")
    with pytest.warns(UserWarning, match=r"no results file for classes \['cat'\]; they count as having no detections"):
        cat, dog = read_voc_results(tmp_path, "test", NAMES, records())
    assert (cat.image_index.dtype, cat.image_index.shape, cat.scores.shape, cat.boxes.shape) == (np.int64, (0,), (0,), (0, 4))
    assert dog.image_index.tolist() == [0] and dog.boxes.tolist() == [[1.0, 1.0, 50.0, 50.0]]
    out = evaluate_voc(records(), {}, NAMES, "voc10", class_dets=[cat, dog])
    assert out["per_class"] == {"cat": 0.0, "dog": 1.0}
    with pytest.raises(ResultsFormatError, match=r"no results files '\*_det_val_<class>.txt' for any of \['cat', 'dog'\]"):
        read_voc_results(tmp_path, "val", NAMES, records())


def test_empty_and_one_line_results_files(tmp_path):
    # Kills: "rows == 0" -> "rows == 1" (a one-line file read as empty) and the empty file's arrays mutated.
    index = {"a": 0, "b": 1}
    (tmp_path / "empty.txt").write_text("\n")
    empty = read_voc_results_file(tmp_path / "empty.txt", index)
    assert (empty.image_index.dtype, empty.image_index.shape, empty.scores.dtype, empty.scores.shape,
            empty.boxes.dtype, empty.boxes.shape) == (np.int64, (0,), np.float64, (0,), np.float64, (0, 4))
    (tmp_path / "one.txt").write_text("b 0.5 1 2 3 4\n")
    one = read_voc_results_file(tmp_path / "one.txt", index)
    assert one.image_index.tolist() == [1] and one.scores.tolist() == [0.5] and one.boxes.tolist() == [[1, 2, 3, 4]]


def test_a_results_file_that_is_not_utf8_is_named(tmp_path):
    # Kills: the UTF-8 error's message dropped.
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_bytes(b"a 0.5 1 1 10 10\n\xff\xfe\n")
    with pytest.raises(ResultsFormatError, match=f"{path}: not a UTF-8 text file"):
        read_voc_results_file(path, {"a": 0})


def test_line_by_line_parser_gives_the_same_detections(tmp_path):
    # Kills: the line-by-line fallback's return values (None, wrong field, parts[3:], wrong dtype or
    # reshape). A form feed inside a line makes splitlines() see two rows, so the bulk parser hands
    # the file to the line-by-line one, which splits the line on whitespace as usual.
    index = {"a": 0, "b": 1}
    plain = "b 0.5 1 2 3 4\na 0.25 5.5 6 7 8.125\n"
    (tmp_path / "plain.txt").write_text(plain)
    (tmp_path / "ff.txt").write_text(plain.replace("0.25 5.5", "0.25\f5.5"))
    want, got = (read_voc_results_file(tmp_path / name, index) for name in ("plain.txt", "ff.txt"))
    assert got.image_index.tolist() == [1, 0] and got.image_index.dtype == np.int64
    assert got.scores.tolist() == [0.5, 0.25] and got.scores.dtype == np.float64
    assert got.boxes.tolist() == [[1, 2, 3, 4], [5.5, 6, 7, 8.125]] and got.boxes.dtype == np.float64
    assert all(np.array_equal(getattr(got, f), getattr(want, f)) for f in ("image_index", "scores", "boxes"))


@pytest.mark.parametrize("text, where", [
    ("a 0.5 1 1 10 10\nb nan 1 1 10 10\n", ":2: non-finite score or coordinate"),       # finite box, NaN score
    ("a 0.5 1 1 10 10\n\nzz 0.5 1 1 10 10\n", ":3: unrecognized image 'zz'"),            # after a blank line
    ("a 0.5 1 1 x 10\n", ":1: box '1 1 x 10' has a non-numeric coordinate"),
])
def test_bad_lines_are_named(tmp_path, text, where):
    # Kills: the non-finite check skipped or "or" -> "and", its message dropped, "continue" -> "break"
    # at a blank line (the bad line after it went unread), the box excerpt from parts[3:].
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text(text)
    with pytest.raises(ResultsFormatError) as info:
        read_voc_results_file(path, {"a": 0, "b": 1})
    assert f"{path}{where}" in str(info.value)


def test_coco_results_round_trip_in_float64(tmp_path):
    # Kills: write_coco_results (untested), the float64 cast of boxes before x2 - x1.
    dets = fractional_detections()
    path = write_coco_results(tmp_path / "r.json", dets, {"a": 7, "b": 3}, [4, 9])
    assert path == tmp_path / "r.json" and path.read_text().count("\n") == 1      # compact: one line
    expected = [{"image_id": coco_id, "category_id": [4, 9][int(label)],
                 "bbox": [float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1)], "score": float(score)}
                for image_id, coco_id in (("b", 3), ("a", 7))
                for (x1, y1, x2, y2), score, label in zip(*(dets[image_id][k] for k in ("boxes", "scores", "labels")))]
    boxes = np.concatenate([d["boxes"] for d in dets.values()])
    assert np.any((boxes[:, 2] - boxes[:, 0]).astype(np.float64) != boxes[:, 2].astype(np.float64) - boxes[:, 0])
    assert read_coco_results(path) == expected
    with pytest.raises(ResultsFormatError, match="detections for image 'zz', which is not in the annotations"):
        write_coco_results(tmp_path / "s.json", {"zz": dets["a"]}, {"a": 7}, [4, 9])


@pytest.mark.parametrize("entry", [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},               # no score
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5},     # three numbers
    {"image_id": 1, "category_id": 1, "bbox": ["0", 0, 1, 1], "score": 0.5},
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"},
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": True},
])
def test_bad_coco_results_entries_are_named(tmp_path, entry):
    # Kills: "or"/"and" swaps in the entry, bbox and score checks, their messages dropped or crashing.
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, entry]))
    with pytest.raises(ResultsFormatError, match=f"{path}: entry 1 "):
        read_coco_results(path)


def test_coco_results_file_that_is_not_a_list_missing_or_not_json(tmp_path):
    # Kills: read_json given no error class or label, the not-a-list message dropped or naming NoneType.
    path = tmp_path / "r.json"
    path.write_text('{"image_id": 1}')
    with pytest.raises(ResultsFormatError, match="expected a JSON list of detections, got dict"):
        read_coco_results(path)
    with pytest.raises(ResultsFormatError, match=f"results file not found: {tmp_path / 'none.json'}"):
        read_coco_results(tmp_path / "none.json")
    path.write_text("[{")
    with pytest.raises(ResultsFormatError, match="not valid JSON at line 1"):
        read_coco_results(path)
