"""The R-CNN family toolkit: R-CNN, Fast R-CNN and Faster R-CNN on PyTorch.

    from detect import Detector
    det = Detector.from_checkpoint("runs/x/model_final.pt", device="cpu")
    results = det.predict(["a.jpg"])

``import detect`` stays light (configs only); ``Detector`` and ``build_model`` load torch on first use.
"""

from detect.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "Detector", "build_model", "load_config", "__version__"]


def __getattr__(name: str):
    # Lazy (PEP 562): keeps torch out of `import detect` for the tools that only read configs or results.
    if name in ("Detector", "build_model"):
        from detect import build

        return getattr(build, name)
    raise AttributeError(f"module 'detect' has no attribute {name!r}")
