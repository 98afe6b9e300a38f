"""Reference losses and detections of the three pipelines, from the code before the One Detector refactor.

Run once at commit 49fa172 (the last commit with ``FasterRCNN`` / ``FastRCNN`` / ``RCNN`` as three classes):

    git worktree add /tmp/old 49fa172 && cd /tmp/old && PYTHONPATH=. python <this file> OUT.pt

``tests/test_one_detector.py`` rebuilds the same inputs (:func:`inputs`, imported from here, so both
sides draw them alike), gives today's ``Detector`` the same weights and checks that its losses and
detections equal these bitwise. The weights are not stored (megabytes): :func:`seeded_weights` draws
them from a seed in the order of the OLD state-dict keys, and the test maps those keys to today's
names with the checkpoint loader's own mapping, so it also proves that old checkpoints still load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["circle", "square", "triangle"]
PIPELINES = ("faster_rcnn", "fast_rcnn", "rcnn")


def inputs() -> tuple[list[torch.Tensor], list[dict], dict[str, torch.Tensor]]:
    """Two images of different sizes, their targets (with ids) and 300 seeded proposals per image."""
    g = torch.Generator().manual_seed(1234)
    images = [torch.rand(3, 120, 160, generator=g), torch.rand(3, 96, 72, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [90.0, 20.0, 150.0, 60.0]]),
         "labels": torch.tensor([0, 2]), "image_id": "img0"},
        {"boxes": torch.tensor([[5.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1]), "image_id": "img1"},
    ]
    proposals = {}
    for image, target in zip(images, targets):
        h, w = image.shape[-2:]
        xy = torch.rand(300, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
        wh = 4 + torch.rand(300, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
        proposals[target["image_id"]] = boxes
    return images, targets, proposals


def config(pipeline: str, extra: list[str] = ()):
    from detect import load_config

    overrides = ["model.backbone.weights=none", *extra]
    if pipeline != "faster_rcnn":
        overrides.append(f"{pipeline}.proposal_source=selective_search")   # replaced by fixed boxes below
    return load_config(ROOT / "configs" / pipeline / "tiny_synthetic.yaml", overrides)


def seeded_weights(keys_and_tensors: list[tuple[str, torch.Tensor]], seed: int = 5) -> dict[str, torch.Tensor]:
    """Seeded values for every floating-point entry of a state dict, drawn in sorted key order.

    Weights get N(0, 1/fan_in) (activations stay O(1) through the layers), BatchNorm variances
    U(0.5, 1.5); integer and boolean buffers keep their values.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in sorted(keys_and_tensors):
        if not tensor.is_floating_point():
            out[key] = tensor.clone()
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(tensor.shape, generator=g)
        else:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 10
            out[key] = torch.randn(tensor.shape, generator=g) / fan_in ** 0.5
    return out


def svm_weights(model_svm, model_reg, seed: int = 7) -> None:
    """Give R-CNN's SVMs and box regressors seeded non-zero weights, as if stages 3-4 had run."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head, std in ((model_svm, 0.05), (model_reg, 0.001)):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * std)
            head.fitted.fill_(True)


def main(out: str) -> None:
    from detect import build_model
    from detect.proposal_sources import FixedProposals

    images, targets, proposals = inputs()
    ids = [t["image_id"] for t in targets]
    golden = {}
    for pipeline in PIPELINES:
        torch.manual_seed(0)
        model = build_model(config(pipeline), class_names=NAMES)
        model.load_state_dict(seeded_weights(list(model.state_dict().items())))
        if pipeline != "faster_rcnn":
            model.proposals = FixedProposals(boxes_by_id={k: v.numpy() for k, v in proposals.items()})
        entry = {"losses": {}}
        model.train()
        stages = ("joint", "rpn", "head") if pipeline == "faster_rcnn" else ("joint",)
        for stage in stages:
            torch.manual_seed(11)
            kw = {"stage": stage} if pipeline == "faster_rcnn" else {}
            entry["losses"][stage] = {k: v.detach().clone() for k, v in model.loss(images, targets, **kw).items()}
        if pipeline == "faster_rcnn":   # alternating step 2: another model's proposals, in the images' pixels
            torch.manual_seed(13)
            given = [proposals[i][:50] for i in ids]
            entry["losses"]["given"] = {k: v.detach().clone()
                                        for k, v in model.loss(images, targets, stage="head", proposals=given).items()}
        torch.manual_seed(12)
        kw = {} if pipeline == "faster_rcnn" else {"image_ids": ids}
        entry["detections"] = model.predict(images, **kw)
        if pipeline == "rcnn":
            svm_weights(model.svm, model.box_regressor)
            entry["detections_svm"] = model.predict(images, **kw)
        if pipeline == "fast_rcnn":      # multi-scale testing (Sec. 5.2)
            multi = build_model(config(pipeline, ["fast_rcnn.test_scales=[64,128]"]), class_names=NAMES)
            multi.load_state_dict(model.state_dict())
            multi.proposals = model.proposals
            entry["detections_multiscale"] = multi.predict(images, image_ids=ids)
        golden[pipeline] = entry
    torch.save(golden, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
