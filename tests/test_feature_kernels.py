"""The compiled region features (proposals/feature_kernels.py) against the numpy code they replace, bit for bit."""

import numpy as np
import pytest

from proposals import feature_kernels
from proposals.features import build_regions, colour_codes, convert_colour, segment, texture_codes
from tests.conftest import SHARED_DATA

pytest.importorskip("numba")


def textured_image(seed: int, shape=(70, 90, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full(shape, 120, np.uint8)
    for _ in range(15):
        x, y, w, h = rng.integers(0, shape[1]), rng.integers(0, shape[0]), rng.integers(3, 25), rng.integers(3, 25)
        image[y:y + h, x:x + w] = rng.integers(0, 256, shape[2])
    return np.clip(image + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)


def with_numpy(function, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(feature_kernels, "numba", None)        # proposals.features takes its numpy code
        return function()


@pytest.mark.parametrize("space", ["hsv", "lab", "h"])
def test_texture_codes_are_the_numpy_codes(space, monkeypatch):
    # a wrong steering sign, scale rounded in float64 or a bin clipped differently changes some codes
    images = [textured_image(0), textured_image(1, (33, 7, 3))]
    path = SHARED_DATA / "raccoon" / "JPEGImages" / "raccoon-5.jpg"
    if path.exists():
        from detect.data.image import read_image

        images.append(read_image(path))
    for image in images:
        converted = convert_colour(image, space)
        compiled = texture_codes(converted)
        expected = with_numpy(lambda: texture_codes(converted), monkeypatch)
        assert compiled.dtype == expected.dtype == np.int32
        np.testing.assert_array_equal(compiled, expected)


def random_labels(seed: int, shape, n: int) -> np.ndarray:
    """A label map with every label 0..n-1 present, in blocks so that regions have neighbours."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n, (shape[0] // 3 + 1, shape[1] // 3 + 1)).repeat(3, 0).repeat(3, 1)[:shape[0], :shape[1]]
    return np.unique(labels, return_inverse=True)[1].reshape(shape).astype(np.int32)


@pytest.mark.parametrize("seed,shape,n", [(0, (30, 40), 25), (1, (1, 50), 6), (2, (45, 1), 4), (3, (20, 20), 1)])
def test_region_sizes_boxes_pairs_and_histograms_are_the_numpy_ones(seed, shape, n, monkeypatch):
    labels = random_labels(seed, shape, n)
    image = textured_image(seed, (*shape, 3))
    colour, texture = colour_codes(image), texture_codes(image)
    compiled = build_regions(labels, colour=colour, texture=texture)
    expected = with_numpy(lambda: build_regions(labels, colour=colour, texture=texture), monkeypatch)
    assert compiled.n == expected.n == labels.max() + 1
    for name in ("sizes", "boxes", "pairs", "colour", "texture"):
        got, want = getattr(compiled, name), getattr(expected, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_region_features_of_a_segmentation(monkeypatch):
    converted = convert_colour(textured_image(5, (80, 100, 3)), "lab")
    labels = segment(converted, 30)
    colour, texture = colour_codes(converted), texture_codes(converted)
    compiled = build_regions(labels, colour=colour, texture=texture)
    expected = with_numpy(lambda: build_regions(labels, colour=colour, texture=texture), monkeypatch)
    assert compiled.n > 20
    for name in ("sizes", "boxes", "pairs", "colour", "texture"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(expected, name), err_msg=name)


def test_region_geometry_of_a_hand_made_map():
    labels = np.array([[0, 0, 1], [2, 2, 1], [2, 3, 3]], np.int32)
    sizes, boxes, keys = feature_kernels.region_geometry(labels, 4)
    assert sizes.tolist() == [2, 2, 3, 2]
    assert boxes.tolist() == [[0, 0, 2, 1], [2, 0, 3, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    assert np.unique(keys).tolist() == [0 * 4 + 1, 0 * 4 + 2, 1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 3]
