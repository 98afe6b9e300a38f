"""Hard negative mining (R-CNN Sec. 2.3, Appendix B): planted hard negatives are found, easy ones evicted."""

import numpy as np

from detect.hard_negatives import ImageFeatures, train_svms


def _image(rng, feats, gt_class=None):
    """Rows of one image: an optional ground-truth row of class 0 first, then proposals (all negatives)."""
    n = len(feats)
    gt = np.full(n, -1)
    overlaps = np.zeros((n, 2), np.float32)
    if gt_class is not None:
        gt[0] = gt_class
        overlaps[0, gt_class] = 1.0
    return ImageFeatures(np.asarray(feats, np.float32), gt, overlaps)


def test_hard_negative_mining_finds_the_planted_hard_negatives():
    rng = np.random.default_rng(0)
    images = []
    planted = set()
    for i in range(12):
        pos = [rng.uniform([2.0, -1], [3.0, 1])]                     # class 0 positive, x in [2, 3]
        easy = rng.uniform([-12.0, -1], [-8.0, 1], size=(50, 2))     # far on the negative side
        feats = pos + list(easy)
        if i == 6:                                                   # one image holds the hard negatives
            hard = rng.uniform([0.6, -1], [1.0, 1], size=(6, 2))   # close to the positives, still separable
            planted |= {(i, len(feats) + k) for k in range(6)}
            feats += list(hard)
        images.append(_image(rng, feats, gt_class=0))
    result = train_svms(images, 2, C=10.0, retrain_limit=5, class_names=["thing", "absent"], log=lambda m: None)
    mined = {tuple(k) for k in result.mined_keys[0].tolist()}
    cached = {tuple(k) for k in result.cache_keys[0].tolist()}
    assert planted <= mined                                           # every planted hard negative was mined
    assert 50 <= len(mined - planted) < 70          # easy ones: the first image's 50 seeds, few of the other 550
    assert cached <= planted | {(0, r) for r in range(51)} and cached & planted   # easy ones evicted
    w, b = result.weight[0], result.bias[0]
    hard_scores = [images[i].features[r] @ w + b for i, r in planted]
    pos_scores = [img.features[0] @ w + b for img in images]
    assert max(hard_scores) < 0 < min(pos_scores)                     # the final SVM separates them
    assert result.retrainings >= 3
    # class 1 has no positives: reported and given a zero detector
    assert not result.fitted[1] and np.all(result.weight[1] == 0)
    assert any("'absent' has no positive" in p for p in result.problems)


def test_first_image_only_training_misses_the_hard_negatives():
    """Control: without mining past the first image, the hard negatives are scored as positives."""
    rng = np.random.default_rng(0)
    easy_image = _image(rng, [[2.5, 0.0]] + list(rng.uniform([-12, -1], [-8, 1], size=(50, 2))), gt_class=0)
    result = train_svms([easy_image], 2, C=10.0, log=lambda m: None)
    assert np.array([0.8, 0.0]) @ result.weight[0] + result.bias[0] > 0


def _separable_images(n_images, rng, hard_at=(), n_easy=40):
    """Class-0 positives at x in [2, 3]; easy negatives at x in [-12, -8]; images in ``hard_at`` add 4 negatives
    on the line x = 1 (all equally close to the positives: each one a support vector). Returns (images, planted)."""
    images, planted = [], set()
    for i in range(n_images):
        feats = [[rng.uniform(2.0, 3.0), rng.uniform(-1, 1)]] + list(rng.uniform([-12.0, -1], [-8.0, 1], (n_easy, 2)))
        if i in hard_at:
            planted |= {(i, len(feats) + k) for k in range(4)}
            feats += [[1.0, y] for y in (-0.9, -0.3, 0.3, 0.9)]
        images.append(_image(rng, feats, gt_class=0))
    return images, planted


def test_mining_keeps_exactly_the_planted_hard_negatives():
    """Catches: easy negatives never evicted (seeds of the first image stay), or a batch's hard negatives missed."""
    images, planted = _separable_images(20, np.random.default_rng(1), hard_at=(5, 13))
    for batch_images in (1, 4):
        result = train_svms(images, 2, C=10.0, retrain_limit=3, batch_images=batch_images, retrain_growth=0.0,
                            class_names=["thing", "absent"], log=lambda m: None)
        assert {tuple(k) for k in result.cache_keys[0].tolist()} == planted
        w, b = result.weight[0], result.bias[0]
        assert all(abs(images[i].features[r] @ w + b + 1) < 0.05 for i, r in planted)   # on the margin


def _trained_rows(n_images, growth):
    """Total training-set rows over all retrainings, and the rows mined, on images where every one has hard
    negatives (each image adds some negatives scoring above -1 until the end)."""
    rng = np.random.default_rng(2)
    images = []
    for i in range(n_images):
        pos = rng.normal([3.0, 0.0], 0.3, size=(4, 2))
        neg = rng.normal([0.0, 0.0], 1.0, size=(30, 2))                # overlapping: hard ones in every image
        feats = np.concatenate([pos, neg])
        gt = np.r_[np.zeros(4, np.int64), np.full(30, -1)]
        overlaps = np.zeros((34, 1), np.float32)
        overlaps[:4, 0] = 1.0
        images.append(ImageFeatures(feats.astype(np.float32), gt, overlaps))
    result = train_svms(images, 1, C=1.0, retrain_limit=10, retrain_growth=growth, batch_images=2, log=lambda m: None)
    return sum(result.trained_rows), sum(len(k) for k in result.mined_keys), 4 * n_images, result


def test_retraining_cost_is_linear_in_the_images():
    """Each retraining trains on positives + cache only, and waits for retrain_growth x its last training set:
    the rows trained on in all are a bounded multiple of positives + mined negatives, at 40 and 160 images.
    Catches the fixed retrain limit's quadratic cost (every retraining re-reads all positives)."""
    growth = 0.5
    for n in (40, 160):
        trained, mined, positives, result = _trained_rows(n, growth)
        assert trained <= (3 + 1 / growth) * (positives + mined)
        assert result.scored_rows >= 30 * n                              # every negative scored once ...
        assert result.scored_rows <= 30 * n + trained                    # ... plus the caches at evictions
    fixed_40, fixed_160 = _trained_rows(40, 0.0)[0], _trained_rows(160, 0.0)[0]
    grown_40, grown_160 = _trained_rows(40, growth)[0], _trained_rows(160, growth)[0]
    assert fixed_160 / fixed_40 > 6                                      # the paper's rule: superlinear here
    assert grown_160 / grown_40 < 5                                      # 4x the images: about 4x the work


def test_same_seed_gives_bitwise_the_same_svms():
    """Catches an unseeded liblinear (its sample order drawn from numpy's global RNG) or order-dependent mining."""
    images, _ = _separable_images(12, np.random.default_rng(3), hard_at=(4,))
    runs = []
    for seed in (5, 5, 6):
        np.random.seed(len(runs))                                        # a global RNG state must not matter
        r = train_svms(images, 2, C=0.01, retrain_limit=3, batch_images=3, seed=seed, log=lambda m: None)
        runs.append((r.weight.tobytes(), r.bias.tobytes(), r.cache_keys[0].tobytes()))
    assert runs[0] == runs[1]
    assert runs[0][:2] != runs[2][:2]                                    # the seed does reach liblinear


def test_a_second_pass_never_caches_a_negative_twice():
    """Catches a later pass re-adding the hard negatives already cached (duplicate rows weigh twice in the SVM)."""
    images, planted = _separable_images(10, np.random.default_rng(4), hard_at=(2, 7))
    result = train_svms(images, 1, C=10.0, retrain_limit=0, batch_images=3, epochs=2, log=lambda m: None)
    mined = [tuple(k) for k in result.mined_keys[0].tolist()]
    assert len(mined) == len(set(mined)) and planted <= set(mined)
    assert {tuple(k) for k in result.cache_keys[0].tolist()} == planted


def test_float16_rows_are_cached_as_float16_and_give_the_same_svms():
    """The cache keeps rows unscaled in their dtype (float16 from the feature cache: half the bytes) and scales a
    copy to train. Catches a cache that forgets the scale or applies it twice (the SVMs would differ)."""
    images, planted = _separable_images(12, np.random.default_rng(5), hard_at=(4, 9))
    half = [ImageFeatures(img.features.astype(np.float16), img.gt_classes, img.overlaps) for img in images]
    rounded = [ImageFeatures(img.features.astype(np.float32), img.gt_classes, img.overlaps) for img in half]
    prescaled = [ImageFeatures(img.features * 1.7, img.gt_classes, img.overlaps) for img in rounded]
    runs = [train_svms(x, 2, C=10.0, retrain_limit=3, batch_images=2, scale=scale, log=lambda m: None)
            for x, scale in ((half, 1.7), (rounded, 1.7), (prescaled, 1.0))]
    for other in runs[1:]:
        assert runs[0].weight.tobytes() == other.weight.tobytes() and runs[0].bias.tobytes() == other.bias.tobytes()
    assert {tuple(k) for k in runs[0].cache_keys[0].tolist()} == planted
    positives = 12 * 2 * 4                                   # 12 float32 positives of 2 dims
    assert runs[0].peak_bytes - positives == 256 * (2 * 2 + 16)  # one buffer of 256 float16 rows + their keys
    assert runs[1].peak_bytes - positives == 256 * (2 * 4 + 16)
