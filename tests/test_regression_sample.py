"""Stage 4's seeded sample of rows (detect/regression_sample.py): at most k rows per class, order-independent."""

import numpy as np

from detect.regression_sample import RegressionSample, row_keys

GT = np.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0]], np.float32)   # class 0, class 1


def _image(i: int):
    """Image i: the 2 ground-truth rows, 6 proposals near box 0 (IoU > 0.6), 2 near box 1, 1 far (IoU 0).
    Row r's pool5 is (i, r, 0) so a kept row says which it is."""
    near0 = [[0.0, 0.0, 10.0, 9.0 - k / 10] for k in range(6)]
    near1 = [[50.0, 50.0, 70.0, 69.0 - k] for k in range(2)]
    boxes = np.concatenate([GT, np.array(near0 + near1 + [[200.0, 200.0, 210.0, 210.0]], np.float32)])
    return boxes, np.array([[i, r, 0.0] for r in range(len(boxes))], np.float32)


def _sample(max_rows, order, split=False):
    sample = RegressionSample(num_classes=2, dim=3, max_rows=max_rows, min_overlap=0.6, seed=7)
    asked = []
    for i in order:
        boxes, pool5 = _image(i)
        parts = [np.arange(2), np.arange(2, len(boxes))] if split else [np.arange(len(boxes))]
        for rows in parts:
            def features(at, rows=rows):
                asked.extend(pool5[rows[at], 1].tolist())
                return pool5[rows[at]]
            sample.add(image_index=i, image_id=f"im{i}", num_rows=len(boxes), rows=rows, boxes=boxes[rows],
                       gt_boxes=GT, gt_classes=np.array([0, 1]), pool5=features)
    return sample, asked


def test_the_sample_is_each_class_k_smallest_keys_whatever_the_order_or_the_calls():
    """Catches a sample that depends on arrival order (a reservoir drawing from one stream) or on how an
    image's rows are split over calls, keeps more than k rows, or fits them out of image / row order."""
    forward, _ = _sample(5, range(10))
    backward, _ = _sample(5, reversed(range(10)), split=True)
    assert forward.counts() == backward.counts() == [5, 5] and forward.seen.tolist() == [70, 30]
    for a, b in zip(forward.rows(), backward.rows()):
        assert np.array_equal(a, b)
    pool5, _, gt_boxes, classes = forward.rows()
    kept = {(int(i), int(r)) for i, r, _ in pool5}
    expected = set()
    for c, rows in ((0, [0, 2, 3, 4, 5, 6, 7]), (1, [1, 8, 9])):   # the rows IoU > 0.6 of class c, every image
        keys = sorted((row_keys(7, f"im{i}", 11)[r], i, r) for i in range(10) for r in rows)
        expected |= {(i, r) for _, i, r in keys[:5]}
    assert kept == expected
    assert [tuple(x) for x in pool5[:, :2].tolist()] == sorted(kept)          # image order, then row order
    assert np.array_equal(gt_boxes, GT[classes])


def test_without_a_cap_every_eligible_row_is_kept_in_order_and_far_rows_are_never_read():
    """Catches rows below the overlap threshold kept (the far row, IoU 0) or read, and a cap of 0 that drops rows."""
    sample, asked = _sample(0, range(3))
    pool5, boxes, _, classes = sample.rows()
    assert sample.counts() == [21, 9]
    assert pool5[:, :2].tolist() == [[i, r] for i in range(3) for r in range(10)]
    assert classes.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1, 1] * 3
    assert 10 not in asked and sorted(asked) == sorted(list(range(10)) * 3)
    assert sample.nbytes == 30 * (3 * 2 + 16 + 16 + 8 + 16)       # float16 pool5, boxes, gt boxes, key, order
