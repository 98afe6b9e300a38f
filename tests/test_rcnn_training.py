"""R-CNN's stages 2-4 helpers: region features independent of the call that computed them (padded batches)."""

from pathlib import Path

import torch

from detect import build_model, load_config
from detect.rcnn_training import PAD_ROWS, rcnn_parts

TINY = Path(__file__).resolve().parents[1] / "configs" / "rcnn" / "tiny_synthetic.yaml"


def test_region_features_are_the_same_whichever_call_computes_them():
    """Catches calls the CNN sees with 1-3 rows (the CPU's small-batch kernels round fc7 otherwise: the streaming
    mode's ground-truth rows would then differ in the last bits from the cached mode's)."""
    torch.manual_seed(0)
    cfg = load_config(TINY, ["rcnn.proposal_source=ground_truth", "rcnn.crop_size=32", "rcnn.context_padding=2",
                             "rcnn.window_batch=16"])
    model = build_model(cfg, class_names=["a", "b"]).eval()
    parts = rcnn_parts(model)
    seen = []
    region_features = parts.region_features
    parts.region_features = lambda image, boxes: (seen.append(len(boxes)), region_features(image, boxes))[1]
    image = torch.rand(3, 90, 120)
    xy = torch.rand(37, 2) * 60
    boxes = torch.cat([xy, xy + 8 + torch.rand(37, 2) * 40], dim=1)
    with torch.no_grad():
        pool5, fc7 = parts.features(image, boxes)
        assert pool5.shape[0] == fc7.shape[0] == 37
        for rows in (slice(0, 1), slice(0, 2), slice(0, 3), slice(5, 21), slice(36, 37)):
            p, f = parts.features(image, boxes[rows])
            assert torch.equal(f, fc7[rows]) and torch.equal(p, pool5[rows])
        empty_pool5, empty = parts.features(image, boxes[:0])
    assert empty.shape == (0, fc7.shape[1]) and empty_pool5.shape == (0, pool5.shape[1])
    assert all(n % PAD_ROWS == 0 for n in seen[:-1]) and seen[-1] == 0      # every call padded; the empty one not
