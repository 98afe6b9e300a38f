"""VOC reading (1-based pixels at the edge, flags, class discovery, bad input) and image decoding."""


import numpy as np
import pytest
from PIL import Image

from detect.data.folder import list_images
from detect.data.image import read_image
from detect.data.voc import DegenerateBoxWarning, VOCDataset, from_voc_pixels, to_voc_pixels
from detect.errors import DatasetError, ImageReadError
from tests.conftest import SHARED_DATA

XML = """<annotation><filename>{name}.jpg</filename><size><width>50</width><height>40</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = "<object><name>{cls}</name><truncated>{t}</truncated><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"


def write_tree(root, annotations: dict, split="s"):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in annotations.items():
        body = "".join(OBJ.format(cls=c, b=b, t=t, d=d) for c, b, t, d in objects)
        (root / "Annotations" / f"{name}.xml").write_text(XML.format(name=name, objects=body))
        Image.new("RGB", (50, 40), (10, 20, 30)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")


def test_voc_pixels_convert_once_at_the_edge():
    voc = np.array([[1, 1, 50, 40]])
    lib = from_voc_pixels(voc)
    assert lib.tolist() == [[0, 0, 50, 40]]              # the whole 50 x 40 image
    assert to_voc_pixels(lib).tolist() == voc.tolist()


def test_reader_keeps_flags_and_discovers_classes(tmp_path):
    write_tree(tmp_path, {"a": [("dog", (11, 21, 30, 35), 1, 0), ("cat", (1, 1, 5, 5), 0, 1)], "b": []})
    data = VOCDataset(tmp_path, "s", classes="auto")
    assert data.class_names == ["cat", "dog"]
    a, b = data.records
    assert a.boxes.tolist() == [[10, 20, 30, 35], [0, 0, 5, 5]]
    assert a.labels.tolist() == [1, 0]
    assert a.truncated.tolist() == [True, False] and a.difficult.tolist() == [False, True]
    assert (a.width, a.height) == (50, 40) and a.path.name == "a.jpg"
    assert len(b.boxes) == 0
    assert a.without_difficult().labels.tolist() == [1]


def test_degenerate_box_is_dropped_with_a_warning_naming_file_and_object(tmp_path):
    write_tree(tmp_path, {"a": [("cat", (20, 5, 10, 15), 0, 0), ("cat", (1, 1, 5, 5), 0, 0), ("cat", (60, 50, 70, 60), 0, 0)]})
    with pytest.warns(DegenerateBoxWarning) as caught:
        data = VOCDataset(tmp_path, "s", classes=["cat"])
    messages = [str(w.message) for w in caught]
    assert any("a.xml" in m and "object #0" in m and "degenerate" in m for m in messages)
    assert any("object #2" in m and "outside" in m for m in messages)
    assert data.records[0].boxes.tolist() == [[0, 0, 5, 5]]


def test_a_wrong_class_list_is_one_error_counting_the_unknown_objects(tmp_path, recwarn):
    """Issue 14: a class list that misses the annotations' classes was one warning per image, then training
    on what was left; now it is one error with the counts and the fix (catches a per-image skip or a flood)."""
    write_tree(tmp_path, {"a": [("zebra", (1, 1, 5, 5), 0, 0), ("zebra", (2, 2, 9, 9), 0, 0)],
                          "b": [("cat", (1, 1, 5, 5), 0, 0), ("okapi", (3, 3, 8, 8), 0, 0)],
                          "c": [("cat", (1, 1, 5, 5), 0, 0)]})
    for strict in (False, True):
        with pytest.raises(DatasetError) as caught:
            VOCDataset(tmp_path, "s", classes=["cat"], strict=strict)
        message = str(caught.value)
        assert "\n" not in message
        assert "3 objects in 2 annotation files of split 's'" in message
        assert "'okapi' (1), 'zebra' (2)" in message and "data.classes=auto" in message
    assert len(recwarn) == 0
    assert [r.image_id for r in VOCDataset(tmp_path, "s", classes="auto").records] == ["a", "b", "c"]


@pytest.mark.parametrize("content, message", [
    ("<annotation><object><name>cat</name>", "malformed XML at line 1"),
    ("""<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">]>
<annotation><filename>&lol2;</filename></annotation>""", "refused unsafe XML"),
    ("<annotation><object><name>cat</name><bndbox><xmin>a</xmin></bndbox></object></annotation>", "non-numeric box coordinate"),
    ("<annotation><object><bndbox/></object></annotation>", "has no <name>"),
])
def test_bad_xml_is_one_clear_error(tmp_path, content, message):
    write_tree(tmp_path, {"a": []})
    (tmp_path / "Annotations" / "a.xml").write_text(content)
    with pytest.raises(DatasetError) as info:
        VOCDataset(tmp_path, "s", classes=["cat"], strict=True)
    assert message in str(info.value) and "a.xml" in str(info.value)


def test_split_file_errors(tmp_path):
    write_tree(tmp_path, {"a": []})
    with pytest.raises(DatasetError, match=r"split file not found: .*nope\.txt \(available splits: \['s'\]\)"):
        VOCDataset(tmp_path, "nope", classes=["cat"])
    (tmp_path / "ImageSets" / "Main" / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"empty\.txt is empty"):
        VOCDataset(tmp_path, "empty", classes=["cat"])
    with pytest.raises(DatasetError, match="dataset root not found"):
        VOCDataset(tmp_path / "missing", "s")


def test_duplicate_ids_are_used_once_with_a_warning(tmp_path):
    write_tree(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)]})
    (tmp_path / "ImageSets" / "Main" / "s.txt").write_text("a\na\n")
    with pytest.warns(UserWarning, match="more than once"):
        assert len(VOCDataset(tmp_path, "s", classes=["cat"])) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :4] = (200, 100, 50)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.arange(48).reshape(6, 8) * 1000).astype(np.uint16))
        path = tmp_path / "x.png"
    else:
        img = img.convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    out = read_image(path)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out[0, 0, 0] == 0 and out[-1, -1, 0] == round(47000 * 255 / 65535)
    elif mode in ("RGBA", "P"):
        assert [int(v) for v in out[0, 0]] == pytest.approx([200, 100, 50], abs=8)   # palette quantises
    else:
        assert out[0, 0].mean() > out[0, -1].mean() + 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6            # rotate 90 clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (30, 10, 3)


def test_missing_truncated_and_non_images_are_clear_errors(tmp_path):
    with pytest.raises(ImageReadError, match="image not found"):
        read_image(tmp_path / "none.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageReadError, match="text.jpg: not a readable image"):
        read_image(tmp_path / "text.jpg")


def test_image_folder_is_recursive(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["z.jpeg", "y.PNG", "x.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="image folder not found"):
        list_images(tmp_path / "missing")


def test_real_grayscale_raccoon_loads_as_rgb():
    root = SHARED_DATA / "raccoon"
    if not root.is_dir():
        pytest.skip("shared data not present")
    data = VOCDataset(root, "trainval", classes=["raccoon"])
    gray = [r for r in data.records if r.image_id in ("raccoon-150", "raccoon-152", "raccoon-161")]
    assert gray, "the dataset's grayscale images are in trainval"
    image = read_image(gray[0].path)
    assert image.shape == (gray[0].height, gray[0].width, 3)
    assert len(data) == 160 and sum(len(r.boxes) for r in data.records) == 173


def test_auto_classes_skip_a_broken_annotation_and_odd_numbers_are_clear(tmp_path):
    write_tree(tmp_path, {"a": [("cat", (1, 1, 5, 5), 0, 0)], "b": []})
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation>")
    with pytest.warns(UserWarning, match="skipped image b"):
        data = VOCDataset(tmp_path, "s", classes="auto")
    assert data.class_names == ["cat"] and len(data) == 1
    (tmp_path / "Annotations" / "b.xml").write_text(XML.format(name="b", objects="").replace("<width>50", "<width>inf"))
    with pytest.raises(DatasetError, match=r"b\.xml: <size> has a non-numeric width"):
        VOCDataset(tmp_path, "s", classes=["cat"], strict=True)


def test_read_image_returns_a_writable_array(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    image[0, 0] = 255
    assert image.flags.writeable and image[0, 0, 0] == 255
