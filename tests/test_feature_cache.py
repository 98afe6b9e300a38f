"""The R-CNN feature cache: float16 memory maps per image, resumable, refuses another model's features."""

import numpy as np
import pytest

from detect.feature_cache import CachedImages, FeatureCache, FeatureCacheError


def _put(cache, image_id, rows=5, dim=8):
    """Store random rows for ``image_id``; returns what was stored."""
    rng = np.random.default_rng(len(image_id))
    arrays = {"boxes": rng.uniform(0, 50, (rows, 4)), "gt_classes": np.array([1] + [-1] * (rows - 1)),
              "overlaps": rng.uniform(0, 1, (rows, 3)), "features": rng.normal(size=(rows, dim)),
              "pool5_rows": np.array([0, 2]), "pool5": rng.normal(size=(2, 12))}
    cache.put(image_id, **arrays)
    return arrays


def test_round_trip_float16_memory_mapped(tmp_path):
    cache = FeatureCache(tmp_path / "c", fingerprint={"model_weights": "abc", "proposal_set": "ss:1"})
    first = _put(cache, "2008_000001")
    stored = _put(cache, "dir/odd id")
    assert "2008_000001" in cache and "dir/odd id" in cache and "other" not in cache
    item = cache.get("dir/odd id")
    assert item.features.dtype == np.float16 and isinstance(item.features, np.memmap)
    assert item.features.shape == (5, 8) and item.pool5.shape == (2, 12) and item.gt_classes.tolist()[0] == 1
    # the values come back: features and pool5 rounded to float16, the rest as stored
    np.testing.assert_array_equal(item.features, stored["features"].astype(np.float16))
    np.testing.assert_array_equal(item.pool5, stored["pool5"].astype(np.float16))
    np.testing.assert_allclose(item.boxes, stored["boxes"], rtol=1e-6)
    np.testing.assert_allclose(item.overlaps, stored["overlaps"], rtol=1e-6)
    assert item.gt_classes.tolist() == stored["gt_classes"].tolist() and item.pool5_rows.tolist() == [0, 2]
    np.testing.assert_array_equal(cache.get("2008_000001").features, first["features"].astype(np.float16))
    images = CachedImages(cache, ["2008_000001", "dir/odd id"])
    assert len(images) == 2 and images[1].image_id == "dir/odd id"
    size = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.feat.npy"))
    assert size == 2 * (128 + 5 * 8 * 2)       # float16: 2 bytes per value plus the .npy header


def test_other_model_or_proposals_are_refused_and_resume_works(tmp_path):
    FeatureCache(tmp_path / "c", fingerprint={"model_weights": "abc", "proposal_set": "ss:1"})
    with pytest.raises(FeatureCacheError, match="another model weights"):
        FeatureCache(tmp_path / "c", fingerprint={"model_weights": "xyz", "proposal_set": "ss:1"})
    with pytest.raises(FeatureCacheError, match="another proposal set"):
        FeatureCache(tmp_path / "c", fingerprint={"model_weights": "abc", "proposal_set": "ss:2"})
    again = FeatureCache(tmp_path / "c", fingerprint={"model_weights": "abc", "proposal_set": "ss:1"})
    _put(again, "a")
    (tmp_path / "c" / next(p.name for p in (tmp_path / "c").glob("*.info.npz"))).unlink()   # killed before the info
    assert "a" not in again                                   # the image counts as not done: recomputed
    with pytest.raises(FeatureCacheError, match="no features for image 'a'"):
        again.get("a")
