"""The compiled grouping loop (proposals/grouping_kernels.py) against the Python loop it replaces, bit for bit."""

import numpy as np
import pytest

from proposals import grouping_kernels
from proposals.features import RegionSet, build_regions, colour_codes, convert_colour, segment, texture_codes
from proposals.grouping import hierarchical_grouping
from tests.conftest import SHARED_DATA

pytest.importorskip("numba")


@pytest.mark.parametrize("length", [0, 1, 5, 8, 13, 75, 105, 128, 129, 240, 250, 315, 1000, 4099])
def test_min_sum_is_numpys_pairwise_float32_sum(length):
    # A plain running float32 sum (or float64) rounds differently on about half of these rows: the
    # comparison is exact, because one differing last bit can reorder the merges.
    rng = np.random.default_rng(length)
    x = (rng.random((40, length)) ** 3).astype(np.float32)
    y = (rng.random((40, length)) ** 3).astype(np.float32)
    expected = np.minimum(x, y).sum(axis=1)
    got = np.array([grouping_kernels.min_sum(x[r], y[r]) for r in range(40)], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)


def python_grouping(regions, similarity, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(grouping_kernels, "numba", None)       # hierarchical_grouping takes the Python loop
        return hierarchical_grouping(regions, similarity)


def textured_image(seed: int) -> np.ndarray:
    """Flat rectangles with noise: many regions, ragged borders, texture and near-tied similarities."""
    rng = np.random.default_rng(seed)
    image = np.full((90, 110, 3), 90, np.uint8)
    for _ in range(25):
        x, y, w, h = rng.integers(0, 90), rng.integers(0, 70), rng.integers(4, 30), rng.integers(4, 30)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def regions_of(image: np.ndarray, space: str, k: float) -> RegionSet:
    converted = convert_colour(image, space)
    return build_regions(segment(converted, k), colour=colour_codes(converted), texture=texture_codes(converted))


@pytest.mark.parametrize("similarity", ["CTSF", "TSF", "C", "T", "S", "F", "CS"])
def test_compiled_grouping_merges_as_the_python_loop(similarity, monkeypatch):
    for seed, space, k in ((0, "hsv", 20), (1, "lab", 50), (2, "h", 30)):
        regions = regions_of(textured_image(seed), space, k)
        assert regions.n > 30
        np.testing.assert_array_equal(hierarchical_grouping(regions, similarity),
                                      python_grouping(regions, similarity, monkeypatch))


def test_ties_are_broken_by_region_ids_as_heapq_does(monkeypatch):
    # a chain of equal regions: every S and F similarity ties, so only the id order decides the merges
    n = 12
    boxes = np.array([[i, 0, i + 1, 1] for i in range(n)], float)
    pairs = np.array([[i, i + 1] for i in range(n - 1)] + [[0, n - 1]], np.int64)
    regions = RegionSet(np.ones(n), boxes, None, None, pairs, image_area=float(n))
    for similarity in ("S", "SF"):
        compiled = hierarchical_grouping(regions, similarity)
        np.testing.assert_array_equal(compiled, python_grouping(regions, similarity, monkeypatch))
        assert compiled[n].tolist() == [0, 0, 2, 1]          # the smallest pair (0, 1) merges first


def test_compiled_grouping_on_a_real_image(monkeypatch):
    # On this image (HSV, k = 50, 956 regions) merging the histograms in float32 instead of float64
    # changes the TSF hierarchy; the synthetic images above have too few near-ties to show it.
    from detect.data.image import read_image

    path = SHARED_DATA / "bccd" / "JPEGImages" / "BloodImage_00016.jpg"
    if not path.exists():
        pytest.skip("shared bccd data not available")
    regions = regions_of(read_image(path), "hsv", 50)
    assert regions.n == 956
    for similarity in ("CTSF", "TSF"):
        np.testing.assert_array_equal(hierarchical_grouping(regions, similarity),
                                      python_grouping(regions, similarity, monkeypatch))
