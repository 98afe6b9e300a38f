"""Module-mode helpers shared by the three pipelines' ``predict`` and the engine's ``evaluate``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and give it back its previous mode, even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
