"""The R-CNN family toolkit: R-CNN, Fast R-CNN and Faster R-CNN on PyTorch."""

from detect.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "build_model", "__version__"]


def build_model(cfg: Config, class_names: list[str] | None = None):
    """Build the detector a config describes (see :mod:`detect.build`)."""
    from detect.build import build_model as _build_model

    return _build_model(cfg, class_names=class_names)
