"""R-CNN's SVM stage streamed (rcnn.feature_cache_mode: streaming) against the feature cache: same features, same SVMs.

A fake R-CNN gives every box a feature from a table, so both modes see exactly the same features; a
separable case plants hard negatives that the mining must keep, and only those.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detect.config import Config
from detect.data.records import ImageRecord
from detect.feature_cache import FeatureCache
from detect.rcnn_streaming import fit_svms_streaming
from detect.rcnn_training import (cache_fingerprint, extract_features, fit_regression_rows, fit_regression_stage,
                                  fit_svm_stage)
from detect.bbox_regression import BoxRegressionHead, fit_box_regressors
from detect.svm_heads import LinearSVMHead
from detect.transforms import DetectionTransform

GT = ([4.0, 4.0, 20.0, 20.0], [36.0, 4.0, 52.0, 20.0])     # one box of each class per image


class _TableHead(nn.Module):
    """R-CNN's warp head, stood in for: per-box features (pool5, fc7) read from tables keyed by (image, box)."""

    def __init__(self, fc7: dict, pool5: dict, names) -> None:
        super().__init__()
        self.box_head = nn.Identity()                                    # what the fingerprint hashes
        self.svm = LinearSVMHead(in_features=3, num_classes=len(names))
        self.box_regressor = BoxRegressionHead(in_features=4, num_classes=len(names))
        self.fc7, self.pool5 = fc7, pool5
        self.calls = []                                                  # region_features batch sizes

    def region_features(self, backbone, image, boxes):
        self.calls.append(len(boxes))
        image_index = round(image[0, 0, 0].item() * 255)
        keys = [(image_index, *b) for b in boxes.tolist()]
        return (torch.tensor([self.pool5[k] for k in keys], dtype=torch.float32).reshape(-1, 4),
                torch.tensor([self.fc7[k] for k in keys], dtype=torch.float32).reshape(-1, 3))

    def svm_features(self, pool5, fc7):
        return fc7


class TableRCNN(nn.Module):
    """An R-CNN detector stand-in (the parts detect.rcnn_training.rcnn_parts reads): proposals and features from
    tables; an image is known by its grey level (image i is filled with i); the transform leaves pixels alone."""

    def __init__(self, proposals: dict, fc7: dict, pool5: dict, *, names=("thing", "other")) -> None:
        super().__init__()
        self.backbone = nn.Linear(1, 1)
        self.head = _TableHead(fc7, pool5, names)
        self.transform = DetectionTransform(pixel_mean=(0, 0, 0), pixel_std=(1, 1, 1), resize=False,
                                            min_input_size=1, size_divisibility=1)
        self.proposals = SimpleNamespace(train_top=0, source=lambda images, image_ids, **_: [
            torch.tensor(proposals[i], dtype=torch.float32).reshape(-1, 4) for i in image_ids])
        self.class_names = list(names)

    @property
    def svm(self):
        return self.head.svm

    @property
    def calls(self):
        return self.head.calls


def _case(folder, n_images=16, hard_at=(5, 11), n_easy=30, seed=0):
    """Images with a box of class 0 (features x in [2, 3]) and of class 1 (z in [2, 3]); easy negatives far on
    both axes; images in ``hard_at`` add 3 negatives of class 0 on x = 1 and 3 of class 1 on z = 1 (on the
    margin; a little closer in each later image); one proposal per image overlaps the class-0 box at IoU > 0.6
    (stage 4's row).

    Returns (model, records, planted {class: {(image index, row)}}).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    props, fc7, pool5, records = {}, {}, {}, []
    planted = {0: set(), 1: set()}
    for i in range(n_images):
        path = folder / f"im{i}.png"
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(path)
        image_id = f"im{i}"
        boxes = [list(GT[0]), list(GT[1]), [5.0, 5.0, 20.0, 20.0]]
        feats = [[rng.uniform(2, 3), rng.uniform(-1, 1), rng.uniform(-12, -8)],
                 [rng.uniform(-12, -8), rng.uniform(-1, 1), rng.uniform(2, 3)], [0.0, 0.0, 0.0]]
        for k in range(n_easy):     # far from both objects (IoU 0), a distinct box each
            boxes.append([30.0 + k / 10, 40.0, 50.0 + k / 10, 60.0])
            feats.append([rng.uniform(-12, -8), rng.uniform(-1, 1), rng.uniform(-12, -8)])
        if i in hard_at:
            for c, y in [(0, -0.6), (0, 0.0), (0, 0.6), (1, -0.6), (1, 0.0), (1, 0.6)]:
                planted[c].add((i, len(boxes)))
                boxes.append([10.0 + y + 5 * c, 40.0, 25.0 + y, 58.0 + c])
                near = 1.0 + 0.05 * hard_at.index(i)      # a later image's a little harder: it violates the margin
                feats.append([near, y, -10.0] if c == 0 else [-10.0, y, near])
        for box, f in zip(boxes, feats):
            key = (i, *(np.float32(v).item() for v in box))
            fc7[key], pool5[key] = f, list(rng.normal(size=4))
        props[image_id] = boxes[2:]
        records.append(ImageRecord(image_id, path, 64, 64, boxes=np.array(GT), labels=[0, 1]))
    return TableRCNN(props, fc7, pool5), records, planted


def _cfg(**svm):
    cfg = Config()
    cfg.rcnn.svm.C, cfg.rcnn.svm.retrain_limit, cfg.rcnn.svm.retrain_growth = 10.0, 3, 0.0
    cfg.rcnn.bbox_reg.alpha = 1.0
    for key, value in svm.items():
        setattr(cfg.rcnn.svm, key, value)
    return cfg


def _cached(model, records, cfg, tmp_path):
    cache = FeatureCache(tmp_path / "features", fingerprint=cache_fingerprint(model, cfg))
    done = extract_features(model, records, cache, log=lambda m: None)
    ids = [r.image_id for r in records if r.image_id not in done["failed"]]
    svm = fit_svm_stage(model, cache, ids, cfg, log=lambda m: None)
    reg = fit_regression_stage(model, cache, ids, cfg, log=lambda m: None)
    return cache, ids, svm, reg, model.svm.scale.item()


@pytest.mark.parametrize("batch_images", [1, 4])
def test_both_modes_keep_exactly_the_planted_hard_negatives_and_give_bitwise_the_same_svms(tmp_path, batch_images):
    """Catches: a mode that never evicts the first image's easy seeds or misses a batch's hard negatives;
    streaming that scales, orders, keys or rounds its features unlike the cache (the SVMs would differ in bits)."""
    model, records, planted = _case(tmp_path)
    cfg = _cfg(batch_images=batch_images)
    cache, ids, cached, cached_reg, cached_scale = _cached(model, records, cfg, tmp_path)
    model.calls.clear()
    stream = fit_svms_streaming(model, records, cfg, log=lambda m: None)
    for result in (cached, stream.svm):
        for c in (0, 1):
            assert {tuple(k) for k in result.cache_keys[c].tolist()} == planted[c]
    assert stream.svm.weight.tobytes() == cached.weight.tobytes() and stream.svm.bias.tobytes() == cached.bias.tobytes()
    assert stream.svm.retrainings == cached.retrainings and stream.svm.trained_rows == cached.trained_rows
    assert np.float32(stream.scale) == np.float32(cached_scale) and model.svm.scale.item() == cached_scale
    assert all(np.array_equal(a, b) for a, b in zip(stream.svm.mined_keys, cached.mined_keys))
    # stage 4 from the rows streaming kept: the same regressors as from the cache
    streamed_reg = fit_regression_rows(model, stream.regression, cfg, log=lambda m: None)
    assert streamed_reg.counts == cached_reg.counts == [2 * len(records), len(records)]   # gt boxes + 1 neighbour
    assert streamed_reg.weight.tobytes() == cached_reg.weight.tobytes()
    # the size the cache would have: every array it stores, counted from the rows
    items = [cache.get(i) for i in ids]
    assert stream.full_cache_bytes == sum(x.features.nbytes + x.pool5.nbytes + x.boxes.nbytes + x.overlaps.nbytes
                                          + x.gt_classes.nbytes + x.pool5_rows.nbytes for x in items)
    # nothing is computed twice but the scale sample: ground truth once, proposals once (+ the sample rows)
    rows = sum(len(x.boxes) for x in items)
    assert rows <= sum(model.calls) <= rows + 16 * 100


def test_streaming_skips_an_unreadable_image_like_the_cache(tmp_path):
    """Catches image indices that shift past a skipped image (keys and SVMs would then differ from the cache's)."""
    model, records, planted = _case(tmp_path, n_images=10, hard_at=(3, 7))
    records[2].path.write_bytes(b"not an image")
    cfg = _cfg(batch_images=3)
    _, ids, cached, _, _ = _cached(model, records, cfg, tmp_path)
    stream = fit_svms_streaming(model, records, cfg, log=lambda m: None)
    assert list(stream.failed) == ["im2"] and "im2" not in ids
    assert stream.svm.weight.tobytes() == cached.weight.tobytes()
    shifted = {c: {(i - 1, r) for i, r in keys} for c, keys in planted.items()}     # index among readable images
    assert {tuple(k) for k in stream.svm.cache_keys[0].tolist()} == shifted[0]


def test_streaming_holds_far_less_than_the_cache_as_images_grow(tmp_path):
    """The bytes held are the positives, the hard negatives and stage 4's rows, not every proposal's features.
    Catches a stream that keeps each image's features (held bytes would grow like the cache)."""
    small_model, small_records, _ = _case(tmp_path / "a", n_images=8, n_easy=200, hard_at=(3,))
    big_model, big_records, _ = _case(tmp_path / "b", n_images=32, n_easy=200, hard_at=(3,))
    small = fit_svms_streaming(small_model, small_records, _cfg(batch_images=2), log=lambda m: None)
    big = fit_svms_streaming(big_model, big_records, _cfg(batch_images=2), log=lambda m: None)
    assert big.full_cache_bytes > 3.9 * small.full_cache_bytes
    assert big.peak_bytes < small.peak_bytes + 0.25 * (big.full_cache_bytes - small.full_cache_bytes)
    assert big.peak_bytes < big.full_cache_bytes / 4
    no_bbox = _cfg(batch_images=2)
    no_bbox.rcnn.bbox_reg.enabled = False                    # stage 4 off: its rows are not kept
    lean = fit_svms_streaming(big_model, big_records, no_bbox, log=lambda m: None)
    assert lean.regression is None and lean.full_cache_bytes == big.full_cache_bytes
    assert big.peak_bytes - big.regression_bytes <= lean.peak_bytes < big.peak_bytes
    assert lean.svm.weight.tobytes() == big.svm.weight.tobytes()


def test_a_capped_stage_4_sample_is_the_same_rows_in_both_modes_with_lambda_scaled(tmp_path):
    """Catches sample keys that depend on the order rows arrive in (streaming offers the ground truth in its
    first pass, the proposals later; the cache offers an image at once), and a capped fit that keeps lambda
    unscaled (the subsample's squared error is kept / seen of the full one's)."""
    model, records, _ = _case(tmp_path, n_images=12)
    cfg = _cfg(batch_images=4)
    cfg.rcnn.bbox_reg.max_rows_per_class = 5                   # class 0 has 24 rows, class 1 12
    _, _, _, cached_reg, _ = _cached(model, records, cfg, tmp_path)
    stream = fit_svms_streaming(model, records, cfg, log=lambda m: None)
    assert stream.regression.counts() == [5, 5] and stream.regression.seen.tolist() == [24, 12]
    assert stream.regression.nbytes == 10 * (4 * 2 + 56)      # float16 pool5 + boxes, gt boxes, key, order
    streamed_reg = fit_regression_rows(model, stream.regression, cfg, log=lambda m: None)
    assert streamed_reg.counts == cached_reg.counts == [5, 5]
    assert streamed_reg.weight.tobytes() == cached_reg.weight.tobytes()
    assert streamed_reg.bias.tobytes() == cached_reg.bias.tobytes()
    feats, props, gts, classes = stream.regression.rows()
    scale = model.head.box_regressor.scale.item()
    for c, alpha in ((0, 5 / 24), (1, 5 / 12)):
        direct = fit_box_regressors(feats[classes == c], props[classes == c], gts[classes == c],
                                    np.zeros(5, np.int64), 1, alpha=alpha, scale=scale, log=lambda m: None)
        np.testing.assert_allclose(streamed_reg.weight[c], direct.weight[0], rtol=1e-5)
