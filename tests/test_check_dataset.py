"""Annotation checker on small broken VOC trees, the CLI's exit codes, and what the loader does with the same trees."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.cli.check_dataset import main as check_main
from detect.data.checks import check_voc
from detect.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from detect.data.voc import DegenerateBoxWarning, VOCDataset
from detect.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>&lol3;</filename></annotation>
"""


def _xml(width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
    return f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{body}</annotation>"


def _jpeg(path: Path, width: int = 40, height: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def _write(root: Path, image_id: str, xml: str, *, image: bool = True, size: tuple[int, int] = (40, 30)) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    if image:
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", *size)


def _split(root: Path, name: str, ids: list[str]) -> None:
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def broken(tmp_path) -> Path:
    """Every kind of damage once, plus two clean images; split ``all`` lists them all, ``good`` the clean ones."""
    root = tmp_path / "broken"
    _write(root, "good", _xml(40, 30, [("cat", (1, 1, 20, 20)), ("dog", (10, 5, 40, 30))]))
    _write(root, "good2", _xml(40, 30, [("dog", (3, 3, 12, 12))]))
    _write(root, "malformed", "<annotation><size><width>40</width></size><object>")
    _write(root, "bomb", BILLION_LAUGHS)
    _write(root, "noimage", _xml(40, 30, [("cat", (1, 1, 10, 10))]), image=False)
    _write(root, "truncjpg", _xml(40, 30, [("cat", (1, 1, 10, 10))]))
    jpg = root / "JPEGImages" / "truncjpg.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    _write(root, "degenerate", _xml(40, 30, [("cat", (2, 2, 12, 12)), ("dog", (20, 5, 10, 15))]))
    _write(root, "unknown", _xml(40, 30, [("cat", (2, 2, 12, 12)), ("zebra", (5, 5, 15, 15))]))
    _write(root, "outside", _xml(40, 30, [("dog", (50, 2, 60, 12))]))
    _write(root, "sizemismatch", _xml(64, 48, [("cat", (2, 2, 12, 12))]))
    _write(root, "empty", _xml(40, 30, []))
    _split(root, "all", ["good", "good2", "malformed", "bomb", "noimage", "truncjpg", "degenerate", "unknown",
                         "outside", "sizemismatch", "empty", "good", "noxml"])
    _split(root, "good", ["good", "good2"])
    (root / "ImageSets" / "Main" / "blank.txt").write_text("\n  \n")
    return root


def _only(report, kind):
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, (kind, found)
    return found[0]


def test_every_kind_of_damage_is_reported_naming_the_file(broken):
    report = check_voc(broken, "all", ["cat", "dog"])
    assert not report.clean
    assert report.num_images == 12 and report.counts() == {
        "duplicate_id": 1, "missing_annotation": 1, "bad_annotation": 2, "missing_image": 1, "unreadable_image": 1,
        "size_mismatch": 1, "unknown_class": 1, "degenerate_box": 1, "box_outside_image": 1, "empty_image": 1}
    assert "'good' is listed 2 times" in _only(report, "duplicate_id").message
    assert _only(report, "missing_annotation").file.endswith("noxml.xml")

    bad = {Path(p.file).name: p.message for p in report.problems if p.kind == "bad_annotation"}
    assert set(bad) == {"malformed.xml", "bomb.xml"}
    assert "malformed XML at line 1" in bad["malformed.xml"]
    assert "refused unsafe XML" in bad["bomb.xml"] and "EntitiesForbidden" in bad["bomb.xml"]

    assert "noimage.jpg: image not found" in _only(report, "missing_image").message
    unreadable = _only(report, "unreadable_image")
    assert unreadable.file.endswith("truncjpg.jpg") and "truncjpg.jpg" in unreadable.message
    assert "<size> says 64x48 but sizemismatch.jpg is 40x30" in _only(report, "size_mismatch").message

    unknown = _only(report, "unknown_class")
    assert (Path(unknown.file).name, unknown.object_index, unknown.class_name) == ("unknown.xml", 1, "zebra")
    assert "unknown.xml: object #1 ('zebra')" in unknown.message
    degenerate = _only(report, "degenerate_box")
    assert (Path(degenerate.file).name, degenerate.object_index, degenerate.class_name) == ("degenerate.xml", 1, "dog")
    assert "degenerate.xml: object #1 ('dog') VOC box (20, 5, 10, 15) is degenerate" in degenerate.message
    outside = _only(report, "box_outside_image")
    assert (Path(outside.file).name, outside.object_index) == ("outside.xml", 0) and "outside the 40x30" in outside.message
    assert _only(report, "empty_image").file.endswith("empty.xml")

    text = report.format()
    assert "bad_annotation]: 2" in text and "bomb.xml" in text and "problem(s) found" in text


def test_clean_split_auto_classes_and_empty_split(broken):
    report = check_voc(broken, "good", "auto")
    assert report.clean and report.problems == [] and report.classes == ["cat", "dog"] and report.num_objects == 3
    assert report.format().endswith("clean")
    blank = check_voc(broken, "blank", "auto")
    assert not blank.clean and _only(blank, "empty_split").file.endswith("blank.txt")
    assert "is empty" in blank.problems[0].message
    with pytest.raises(DatasetError, match=r"split file not found: .*nosuch.txt.*available splits"):
        check_voc(broken, "nosuch")


def test_non_numeric_or_infinite_fields_are_bad_annotations(tmp_path):
    root = tmp_path / "v"
    _write(root, "inf", _xml(40, 30, [("cat", (1, 1, 5, 5))]).replace("<width>40</width>", "<width>inf</width>"))
    _write(root, "nan", _xml(40, 30, [("cat", (1, 1, 5, 5))]).replace("<ymin>1</ymin>", "<ymin>nan</ymin>"))
    _write(root, "word", _xml(40, 30, [("cat", (1, 1, 5, 5))]).replace("<xmax>5</xmax>", "<xmax>five</xmax>"))
    _split(root, "s", ["inf", "nan", "word"])
    report = check_voc(root, "s")
    bad = {Path(p.file).name: p.message for p in report.problems if p.kind == "bad_annotation"}
    assert set(bad) == {"inf.xml", "word.xml"} and "inf.xml" in bad["inf.xml"]
    assert "word.xml: object #0 ('cat') has a missing or non-numeric box coordinate" in bad["word.xml"]
    nan = _only(report, "degenerate_box")
    assert nan.file.endswith("nan.xml") and "non-finite" in nan.message


def test_box_crossing_the_border_is_a_note_not_an_error(tmp_path):
    root = tmp_path / "v"
    _write(root, "a", _xml(40, 30, [("cat", (0, 1, 41, 20))]))
    _split(root, "s", ["a"])
    report = check_voc(root, "s")
    assert report.clean and _only(report, "box_exceeds_image").object_index == 0


def test_cli_exit_codes_report_and_json(broken, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert check_main(["--voc", str(broken), "--split", "all", "--classes", "cat,dog", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "missing images [missing_image]: 1" in printed and "noimage.jpg" in printed
    data = json.loads(out.read_text())
    assert data["clean"] is False and data["counts"]["bad_annotation"] == 2 and len(data["problems"]) == 11
    assert check_main(["--voc", str(broken), "--split", "good", "--classes", "cat,dog"]) == 0
    assert check_main(["--voc", str(broken), "--split", "good", "--classes", "cat"]) == 1     # dog is unknown
    capsys.readouterr()
    assert check_main(["--voc", str(tmp_path / "nowhere"), "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset root not found:") and err.count("\n") == 1
    assert check_main(["--voc", str(broken), "--split", "nosuch"]) == 2
    assert check_main(["--split", "all"]) == 2                                              # --voc missing
    done = subprocess.run([sys.executable, str(REPO / "tools" / "check_dataset.py"), "--voc", str(broken),
                           "--split", "all", "--classes", "voc"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and "not in the class list" in done.stdout


def test_synthetic_dataset_is_clean_apart_from_empty_images(tmp_path):
    root = generate_synthetic(tmp_path / "syn", 30, seed=4)
    report = check_voc(root, "trainval", list(SYNTHETIC_CLASSES))
    assert report.clean and set(report.counts()) == {"empty_image"}
    assert check_main(["--voc", str(root), "--split", "trainval", "--strict"]) == 1           # empty images count


def test_bccd_is_clean():
    root = SHARED_DATA / "bccd"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    for split, images in (("trainval", 292), ("test", 72)):
        report = check_voc(root, split, ["RBC", "WBC", "Platelets"])
        assert report.num_images == images and report.problems == [], report.format()


# --- the loader side: what VOCDataset does with the same damage ---------------------------------------------------

def test_loader_skips_bad_annotations_with_warnings_naming_them(broken):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = VOCDataset(broken, "all", classes=["cat", "dog", "zebra"])
    messages = [str(w.message) for w in caught]
    skipped = dict(data.skipped)
    assert set(skipped) == {"malformed", "bomb", "noxml"}
    for image_id, why in (("malformed", "malformed.xml: malformed XML"), ("bomb", "bomb.xml: refused unsafe XML"),
                          ("noxml", "noxml.xml")):
        assert why in skipped[image_id]
        assert any(m.startswith(f"skipped image {image_id}:") and why in m for m in messages)
    assert any("lists ids more than once: ['good']" in m for m in messages)
    kept = {r.image_id: r for r in data.records}
    assert len(kept) == 9 and "empty" in kept and len(kept["empty"].boxes) == 0
    assert 2 in kept["unknown"].labels.tolist()
    # without 'zebra' in the list the split is refused once, not skipped image by image (issue 14)
    with pytest.raises(DatasetError, match=r"1 objects in 1 annotation files .* 'zebra' \(1\); set data.classes=auto"):
        VOCDataset(broken, "all", classes=["cat", "dog"])
    # a degenerate or outside box is dropped, the rest of the image kept
    assert kept["degenerate"].labels.tolist() == [0] and len(kept["outside"].boxes) == 0
    degenerate = [w for w in caught if issubclass(w.category, DegenerateBoxWarning)]
    assert len(degenerate) == 2
    assert any("degenerate.xml: dropped object #1 ('dog')" in str(w.message) for w in degenerate)
    assert any("outside.xml: dropped object #0 ('dog')" in str(w.message) and "outside" in str(w.message)
               for w in degenerate)


@pytest.mark.filterwarnings("ignore:.*lists ids more than once")
def test_loader_strict_raises_naming_the_file(broken):
    with pytest.raises(DatasetError, match=r"malformed\.xml: malformed XML"):
        VOCDataset(broken, "all", classes=["cat", "dog"], strict=True)
    _split(broken, "bomb_only", ["good", "bomb"])
    with pytest.raises(DatasetError, match=r"bomb\.xml: refused unsafe XML"):
        VOCDataset(broken, "bomb_only", classes=["cat", "dog"], strict=True)
    with pytest.warns(DegenerateBoxWarning, match=r"degenerate\.xml: dropped object #1 \('dog'\)"):
        _split(broken, "degenerate_only", ["degenerate"])
        VOCDataset(broken, "degenerate_only", classes=["cat", "dog"], strict=True)
