"""Selective search: grouping on hand-made images, the paper's strategies, ranking, determinism, bad input."""

import colorsys

import numpy as np
import pytest
from skimage.color import rgb2lab

from proposals import MODES, selective_search, strategies
from proposals.features import (RegionSet, build_regions, colour_codes, convert_colour, neighbour_pairs, segment,
                                texture_codes, texture_histograms)
from proposals.grouping import check_similarity, hierarchical_grouping
from proposals.selective_search import rank_hierarchies


def two_rectangles(second=(170, 40, 40)) -> np.ndarray:
    """Grey 70x50 image with two touching reddish rectangles: x 10..30 and 30..50, y 10..40."""
    image = np.full((50, 70, 3), 128, np.uint8)
    image[10:40, 10:30] = (200, 30, 30)
    image[10:40, 30:50] = second
    return image


def blobs(seed: int = 0, size: int = 72) -> np.ndarray:
    """A small image of random flat-coloured rectangles, so that there is something to group."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size + 8, 3), 90, np.uint8)
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(6, 30, 2)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("segmenter", ["opencv", "skimage"])
def test_two_rectangles_give_each_box_and_their_union(segmenter):
    # sigma 0: no smoothing, so the segmentation follows the colour edges exactly
    boxes = selective_search(two_rectangles(), mode="single", top_k=0, min_box_size=0, sigma=0.0, segmenter=segmenter)
    assert boxes.dtype == np.float32 and boxes.shape == (4, 4)
    found = {tuple(b) for b in boxes.tolist()}
    assert found == {(10, 10, 30, 40), (30, 10, 50, 40), (10, 10, 50, 40), (0, 0, 70, 50)}


def test_colour_similarity_merges_the_similar_pair_first():
    image = two_rectangles(second=(195, 25, 25))     # distinct pixels, but the same 25-bin colour histogram
    labels = segment(image, 1, sigma=0.0, min_size=1)
    regions = build_regions(labels, colour=colour_codes(image))
    hierarchy = hierarchical_grouping(regions, "C")
    assert regions.n == 3 and len(hierarchy) == 5
    assert hierarchy[3].tolist() == [10, 10, 50, 40]          # first merge: the two reddish rectangles
    assert hierarchy[4].tolist() == [0, 0, 70, 50]            # last: everything


def hand_made_regions(sizes, boxes, colours) -> RegionSet:
    """Regions in a row, each adjacent to the next, with one-bin colour histograms."""
    n = len(sizes)
    colour = np.zeros((n, 4), np.float32)
    colour[np.arange(n), colours] = 1.0
    pairs = np.array([[i, i + 1] for i in range(n - 1)], np.int64)
    return RegionSet(np.array(sizes, float), np.array(boxes, float), colour, None, pairs, image_area=100.0)


def test_size_similarity_merges_small_regions_first():
    regions = hand_made_regions([50, 10, 10, 30], [[0, 0, 5, 10], [5, 0, 6, 10], [6, 0, 7, 10], [7, 0, 10, 10]],
                                [0, 0, 0, 0])
    hierarchy = hierarchical_grouping(regions, "S")
    # 1+2 (size 20) first, then the pair with its smaller neighbour 3 (total 50), then region 0
    assert hierarchy[4:].tolist() == [[5, 0, 7, 10], [5, 0, 10, 10], [0, 0, 10, 10]]


def test_fill_prefers_regions_that_fit_together():
    # regions 0 and 1 fill their joint box exactly; 1 and 2 leave a large hole in theirs
    regions = RegionSet(np.array([20.0, 20.0, 20.0]), np.array([[0, 0, 2, 10], [2, 0, 4, 10], [4, 0, 10, 10.0]]),
                        None, None, np.array([[0, 1], [1, 2]]), image_area=100.0)
    hierarchy = hierarchical_grouping(regions, "F")
    assert hierarchy[3].tolist() == [0, 0, 4, 10]


def test_texture_histograms_are_normalised_and_flat_images_have_no_texture():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255
    labels = np.zeros((20, 30), np.int32)
    labels[:, 15:] = 1
    hist = texture_histograms(labels, texture_codes(image), 2)
    assert hist.shape == (2, 240)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0, rtol=1e-6)
    flat = np.zeros((20, 30, 3), np.uint8)
    zero_bins = texture_histograms(labels, texture_codes(flat), 2).reshape(2, 24, 10)
    np.testing.assert_allclose(zero_bins[:, :, 0], 1 / 24, rtol=1e-6)    # every response is 0


def test_neighbour_pairs_of_a_grid():
    labels = np.array([[0, 0, 1], [2, 2, 1], [2, 3, 3]], np.int32)
    assert neighbour_pairs(labels, 4).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]


def test_the_papers_strategy_counts_and_overrides():
    assert [len(strategies(m)) for m in ("single", "fast", "quality")] == [1, 8, 80]
    assert MODES["fast"] == (("hsv", "lab"), (50, 100), ("CTSF", "TSF"))
    custom = strategies("fast", ks=[200], similarities=["C+T+S+F"], colour_spaces=["rgb"])
    assert [(s.colour_space, s.k, s.similarity) for s in custom] == [("rgb", 200.0, "CTSF")]
    assert check_similarity("f+s") == "SF"
    with pytest.raises(ValueError, match="similarity"):
        check_similarity("CX")
    with pytest.raises(ValueError, match="colour space"):
        strategies("fast", colour_spaces=["xyz"])
    with pytest.raises(ValueError, match="mode"):
        strategies("best")


# red, green, blue, white / grey, orange, teal, black
PALETTE = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
                    [[90, 90, 90], [200, 100, 50], [20, 180, 120], [0, 0, 0]]], np.uint8)


def reference_colours(space: str) -> np.ndarray:
    """The palette in ``space`` from colorsys / scikit-image and the paper's formulas, on the 0..255 scale."""
    rgb = PALETTE.reshape(-1, 3).astype(np.float64)
    hsv = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in rgb]) * [256, 255, 255]   # hue: 360 deg -> 256
    total = np.maximum(rgb.sum(axis=1), 1.0)
    table = {"rgb": rgb, "hsv": hsv, "h": hsv[:, :1], "i": rgb.mean(axis=1, keepdims=True),
             "lab": rgb2lab(PALETTE / 255.0).reshape(-1, 3) * [255 / 100, 1, 1] + [0, 128, 128],
             "rgi": np.stack([255 * rgb[:, 0] / total, 255 * rgb[:, 1] / total, rgb.mean(axis=1)], axis=1)}
    return table[space].reshape(2, 4, -1)


@pytest.mark.parametrize("space,channels", [("rgb", 3), ("hsv", 3), ("lab", 3), ("rgi", 3), ("i", 1), ("h", 1)])
def test_colour_spaces(space, channels):
    # Catches a wrong conversion (channel order, OpenCV's 0..179 hue, Lab without its 8-bit offsets,
    # normalised rg divided by the wrong sum), not only a wrong shape.
    converted = convert_colour(blobs(), space)
    assert converted.dtype == np.uint8 and converted.shape == (72, 80, channels)
    colours = convert_colour(PALETTE, space).astype(np.float64)
    np.testing.assert_allclose(colours, reference_colours(space), atol=1.0)


def test_ranking_drops_lower_ranked_duplicates():
    a = np.array([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 5, 5]], float)
    b = np.array([[0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 5, 5]], float)
    ranked = rank_hierarchies([a, b], np.random.default_rng(0))
    assert len(ranked) == 4
    assert {tuple(r) for r in ranked.tolist()} == {(0, 0, 1, 1), (0, 0, 2, 2), (0, 0, 3, 3), (0, 0, 5, 5)}


def test_output_format_order_and_filters():
    image = blobs()
    boxes = selective_search(image, mode="fast", top_k=0, min_box_size=0)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 20
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 72).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert [0, 0, 80, 72] in boxes.tolist()
    capped = selective_search(image, mode="fast", top_k=7, min_box_size=0)
    np.testing.assert_array_equal(capped, boxes[:7])               # top-k is a prefix of the ranking
    big = selective_search(image, mode="fast", top_k=0, min_box_size=12)
    assert ((big[:, 2:] - big[:, :2]) >= 12).all()
    np.testing.assert_array_equal(big, boxes[((boxes[:, 2:] - boxes[:, :2]) >= 12).all(axis=1)])


def test_same_seed_same_boxes_other_seed_other_order():
    image = blobs(seed=3)
    first = selective_search(image, mode="fast", seed=5, top_k=0)
    np.testing.assert_array_equal(first, selective_search(image.copy(), mode="fast", seed=5, top_k=0))
    other = selective_search(image, mode="fast", seed=6, top_k=0)
    assert {tuple(b) for b in other.tolist()} == {tuple(b) for b in first.tolist()}   # same boxes ...
    assert not np.array_equal(other, first)                                           # ... ranked differently


def test_quality_finds_at_least_what_fast_finds():
    image = blobs(seed=1)
    fast = {tuple(b) for b in selective_search(image, mode="fast", top_k=0).tolist()}
    quality = {tuple(b) for b in selective_search(image, mode="quality", top_k=0).tolist()}
    assert fast <= quality and len(quality) > len(fast)


def test_large_images_are_processed_at_max_side_and_scaled_back():
    image = np.kron(blobs(seed=2), np.ones((10, 10, 1), np.uint8))      # 720 x 800, blocky
    boxes = selective_search(image, mode="single", max_side=80, top_k=0, min_box_size=0)
    assert [0, 0, 800, 720] in boxes.tolist()
    assert (boxes[:, 2] <= 800).all() and (boxes[:, 3] <= 720).all()
    # shrunk by 10, every coordinate comes back as a multiple of 10
    np.testing.assert_allclose(boxes % 10, 0, atol=1e-3)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 40, 3), (3000, 2, 3), (2, 20000, 3)])
def test_degenerate_shapes_do_not_crash(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    boxes = selective_search(image, mode="fast", max_side=500)
    height, width = shape[:2]
    assert boxes.shape[1] == 4 and len(boxes) >= 1
    assert [0, 0, width, height] in boxes.tolist()      # the whole image survives any min size
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


def test_bad_arrays_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        selective_search(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="backend"):
        selective_search(blobs(), backend="matlab")
    gray = selective_search(blobs()[:, :, 0], mode="single")
    # a grey image is searched as the RGB image of three equal channels
    np.testing.assert_array_equal(gray, selective_search(np.repeat(blobs()[:, :, :1], 3, axis=2), mode="single"))
    assert gray.shape[1] == 4 and len(gray) > 1


def test_opencv_backend():
    image = blobs(seed=4)
    boxes = selective_search(image, mode="fast", backend="opencv", top_k=0, min_box_size=0)
    assert boxes.dtype == np.float32 and len(boxes) > 5
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 72).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    # OpenCV ranks with an RNG that cannot be seeded from Python: the same boxes, maybe another order
    again = selective_search(image, mode="fast", backend="opencv", top_k=0, min_box_size=0)
    assert {tuple(b) for b in again.tolist()} == {tuple(b) for b in boxes.tolist()}


def noisy_blobs(seed: int) -> np.ndarray:
    """blobs() at twice the size with Gaussian noise, so that segments have texture and ragged borders."""
    rng = np.random.default_rng(seed)
    image = np.kron(blobs(seed=seed), np.ones((2, 2, 1), np.uint8)).astype(int)
    return np.clip(image + rng.normal(0, 9, image.shape), 0, 255).astype(np.uint8)


# sha256 of selective_search(image, mode, top_k=0, min_box_size=0, seed=3).tobytes(), computed by commit 9afeda4
# (the implementation before issue 16's speed-up). Speed-ups must keep every box, its float32 value and its rank.
REFERENCE_BOXES = [
    ("blobs 96", "fast", 223, "824eb0c4664e4b6db92e2a7d8560f7aef12932339d68b637aa6e29723a7c0722"),
    ("noisy blobs", "fast", 446, "6f3bae235cb2caf2a13c3f7d88d19988e3bd241dd331c00a09d10a9ec6a2c30d"),
    ("blobs 72", "quality", 360, "4e936251d8c530d4d0232fead5cffea8bd7726c69ee068763750bfb93aca1e49"),
]


@pytest.mark.parametrize("name,mode,count,digest", REFERENCE_BOXES)
def test_same_boxes_as_the_reference_implementation(name, mode, count, digest):
    import hashlib

    image = {"blobs 96": lambda: blobs(seed=7, size=96), "noisy blobs": lambda: noisy_blobs(8),
             "blobs 72": lambda: blobs(seed=9)}[name]()
    boxes = selective_search(image, mode=mode, top_k=0, min_box_size=0, seed=3)
    assert len(boxes) == count
    assert hashlib.sha256(np.ascontiguousarray(boxes).tobytes()).hexdigest() == digest


def test_same_boxes_as_the_reference_implementation_on_a_real_image():
    # The synthetic images above have few near-ties; on this bccd image a histogram merge done in float32
    # instead of float64 changes the boxes. Digest of selective_search(image, "fast", top_k=0) by commit 9afeda4.
    import hashlib

    from detect.data.image import read_image
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "bccd" / "JPEGImages" / "BloodImage_00016.jpg"
    if not path.exists():
        pytest.skip("shared bccd data not available")
    boxes = selective_search(read_image(path), mode="fast", top_k=0)
    assert len(boxes) == 3148
    assert hashlib.sha256(boxes.tobytes()).hexdigest() == \
        "75ca8d68941c0c7c38cfd6022c86298a46b456c666dfd0dd7c93d6f1fedf445e"


def test_compiled_segmentation_gives_opencvs_labels(monkeypatch):
    # proposals.segmentation re-implements OpenCV-contrib's GraphSegmentation; any change of weights, merge
    # rule, clean-up order or label numbering shows up as a differing label map.
    import cv2

    from detect.data.image import read_image
    from proposals import segmentation
    from tests.conftest import SHARED_DATA

    if not segmentation.available(blobs()):
        pytest.skip("numba not installed: OpenCV's segmentation is used")
    images = [noisy_blobs(11), blobs(seed=12)]
    path = SHARED_DATA / "raccoon" / "JPEGImages" / "raccoon-5.jpg"
    if path.exists():
        images.append(read_image(path))
    for image in images:
        for space in ("hsv", "lab", "rgi"):
            converted = convert_colour(image, space)
            graph = segmentation.pixel_graph(converted, sigma=0.8)
            for k in (50, 150):
                opencv = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=0.8, k=k, min_size=k)
                expected = opencv.processImage(np.ascontiguousarray(converted))
                np.testing.assert_array_equal(segmentation.graph_segmentation(graph, k, min_size=k), expected)
    # without numba, segment() falls back to OpenCV and still gives the same labels
    converted = convert_colour(images[0], "lab")
    compiled = segment(converted, 100)
    monkeypatch.setattr(segmentation, "numba", None)
    assert not segmentation.available(converted)
    np.testing.assert_array_equal(segment(converted, 100), compiled)


def test_single_channel_images_are_segmented_by_opencv():
    # hue images have many equal-weight edges whose order OpenCV's sort decides: they stay with OpenCV
    from proposals import segmentation

    assert not segmentation.available(np.zeros((4, 5, 1), np.uint8))
    assert segmentation.available(np.zeros((4, 5, 3), np.uint8)) == (segmentation.numba is not None)
