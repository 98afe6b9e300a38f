"""4-step alternating training of Faster R-CNN (Ren et al., Sec. 3.2), on top of :func:`detect.engine.fit`.

1. train the RPN (trunk + RPN layers) from the backbone's initial weights;
2. train a *separate* network's trunk + Fast R-CNN head on the frozen step-1 RPN's proposals;
3. take the step-2 network, put the step-1 RPN layers on it, fix the trunk and train the RPN layers only;
4. keep the trunk fixed and fine-tune the head on the network's own proposals.

The model says which parameters train in each step (``apply_alternating_step``) and
which loss terms a stage computes (``loss(..., stage=...)``). Each step is one ordinary
``fit`` run, in ``<out>/step<k>``, with the ``train`` schedule; a finished step leaves
``model_final.pt`` there, so ``--resume`` skips finished steps and resumes the current one
from its newest checkpoint. The final model is copied to ``<out>/model_final.pt``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from detect import checkpoint as ckpt_io
from detect import distributed
from detect.config import Config, config_to_dict
from detect.data.loader import DetectionDataset
from detect.detector import Detector, Stage
from detect.engine import fit


@dataclass(frozen=True)
class AlternatingStep:
    """One step of the paper's 4-step alternating training (Sec. 3.2).

    Attributes:
        step: 1-4.
        stage: the ``stage`` argument for :meth:`detect.detector.Detector.loss`.
        trains: parameter groups (see :func:`parameter_groups`) that learn in this step.
        init: where the model's weights come from at the start of the step.
        proposals: "none", "step1" (a frozen copy of the step-1 model proposes) or "own" (this model's RPN).
    """

    step: int
    stage: Stage
    trains: tuple[str, ...]
    init: str
    proposals: str


ALTERNATING_STEPS = (
    AlternatingStep(1, "rpn", ("trunk", "rpn"), init="backbone weights (ImageNet)", proposals="none"),
    AlternatingStep(2, "head", ("trunk", "head"), init="backbone weights (ImageNet), a separate network",
                    proposals="step1"),
    AlternatingStep(3, "rpn", ("rpn",), init="step 2 model (trunk, head) + step 1 RPN layers", proposals="none"),
    AlternatingStep(4, "head", ("head",), init="step 3 model (trunk and RPN now shared)", proposals="own"),
)


def parameter_groups(model: Detector) -> dict[str, list[nn.Parameter]]:
    """The model's parameters as "trunk" (shared convs), "rpn" (RPN-only layers) and "head" (fc / res5 + predictor).

    Parameters that ``freeze_at`` fixes are left out: they never train.
    """
    frozen = {id(p) for p in model.backbone.frozen_parameters()}
    return {"trunk": [p for p in model.backbone.parameters() if id(p) not in frozen],
            "rpn": list(model.proposals.parameters()),
            "head": list(model.head.parameters())}


def apply_alternating_step(model: Detector, step: int) -> AlternatingStep:
    """Set ``requires_grad`` for step 1-4 of alternating training and return the step's description.

    Steps 3 and 4 fix the shared trunk, so at the end RPN and detector share one set of conv layers.
    """
    if step not in (1, 2, 3, 4):
        raise ValueError(f"alternating training has steps 1-4, got {step}")
    spec = ALTERNATING_STEPS[step - 1]
    for group, params in parameter_groups(model).items():
        for p in params:
            p.requires_grad_(group in spec.trains)
    return spec


def apply_joint_training(model: Detector) -> None:
    """Make every parameter trainable except those ``freeze_at`` fixes (approximate joint training)."""
    for params in parameter_groups(model).values():
        for p in params:
            p.requires_grad_(True)



def _finished_step(step_dir: Path, model: nn.Module) -> int | None:
    """Load a finished step's weights into ``model`` and return its iterations; None if unfinished."""
    final = step_dir / "model_final.pt"
    if not final.is_file():
        return None
    ckpt = ckpt_io.load_checkpoint(final)
    ckpt_io.load_model_weights(model, ckpt)
    return int(ckpt["iteration"])


def fit_alternating(build: Callable[[], nn.Module], train_set: DetectionDataset, cfg: Config, *,
                    out_dir: str | Path, device: torch.device, val_set: DetectionDataset | None = None,
                    resume: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the four steps; ``build()`` returns a freshly initialised detector (same seed, same weights).

    Returns:
        ``{"model": the step-4 detector, "final_checkpoint": path, "iteration": total iterations}``.
    """
    out_dir = Path(out_dir)
    models: dict[int, nn.Module] = {}
    total = 0
    for step in (1, 2, 3, 4):
        step_dir = out_dir / f"step{step}"
        if step in (1, 2):
            model = build()          # steps 1 and 2 both start from the backbone's initial weights
        else:
            model = models[step - 1]
            if step == 3:            # the step-2 trunk and head, with the step-1 RPN layers
                model.proposals.load_state_dict(models[1].proposals.state_dict())
        spec = apply_alternating_step(model, step)
        log(f"alternating training, step {step}: stage '{spec.stage}', training {', '.join(spec.trains)}")
        models[step] = model
        done = _finished_step(step_dir, model) if resume else None
        if done is not None:
            log(f"step {step} already finished ({step_dir / 'model_final.pt'})")
            total += done
            continue
        loss_kwargs: dict | Callable = {"stage": spec.stage}
        if spec.proposals == "step1":
            proposer = copy.deepcopy(models[1]).to(device).eval()
            for p in proposer.parameters():
                p.requires_grad_(False)
            loss_kwargs = _fixed_proposals(proposer, spec.stage)

        # The step's folder, not its newest file: a damaged newest checkpoint then falls back to the one before.
        resume_from = step_dir if resume and ckpt_io.latest_checkpoint(step_dir) else None
        result = fit(model, train_set, cfg, out_dir=step_dir, device=device, val_set=val_set, resume=resume_from,
                     log=log, progress=progress, loss_kwargs=loss_kwargs)
        total += result["iteration"]
    final = None
    if distributed.is_main():
        final = ckpt_io.save_checkpoint(out_dir / "model_final.pt", model=models[4], config=config_to_dict(cfg),
                                        class_names=train_set.class_names, iteration=total)
    distributed.barrier()
    return {"model": models[4], "final_checkpoint": final, "iteration": total}


def _fixed_proposals(proposer, stage: str) -> Callable:
    """``loss_kwargs`` for the steps that train on a frozen step-1 model's proposals."""
    def loss_kwargs(images):
        boxes, _ = proposer.propose(images, training=True)
        return {"stage": stage, "proposals": [b.clone() for b in boxes]}
    return loss_kwargs
