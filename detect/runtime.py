"""Run an exported detector as a checkpoint runs: ``.onnx`` through onnxruntime, ``.pt2`` through torch.export.

    detector = load_exported("model.onnx")          # or model.pt2
    detections = detector.predict([image])          # [{"boxes", "scores", "labels"}], as Detector.predict

The file carries the class names, the resolved config and what its graph takes (ONNX
``metadata_props["detect"]``, the ``.pt2`` extra file ``detect.json``), so a file from another
tool, or one made for other classes, is refused with one line. The graph holds the whole
test-time path of ONE image (see :mod:`detect.export_graphs`); :meth:`ExportedDetector.predict`
runs it once per image. A Fast R-CNN file takes the proposals as an input: ``boxes=`` gives
them, else the config's proposal source finds them by image id as the eager model does.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from detect.config import config_from_dict, config_to_dict
from detect.errors import CheckpointError, DetectError
from detect.proposal_sources import build_proposal_source

FORMAT = "detect-export"
VERSION = 1
META_KEY = "detect"              # ONNX metadata_props key
META_FILE = "detect.json"        # .pt2 extra file
SUFFIXES = {".onnx": "onnx", ".pt2": "torch-export"}
KINDS = ("faster_rcnn", "fast_rcnn", "rcnn")


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` names an exported file (by suffix), which :func:`load_exported` runs."""
    return Path(path).suffix.lower() in SUFFIXES


def _onnx_runner(data: bytes | str, threads: int, where: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise DetectError(f"{where}: running an .onnx file needs onnxruntime "
                          "(pip install -e '.[export]')") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:          # onnxruntime raises its own untyped errors for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{where}: not a readable ONNX model ({first[:200]})") from None
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: Tensor) -> list[Tensor]:
        outputs = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        return [torch.from_numpy(o) for o in outputs]

    return run, meta, session


def _pt2_runner(data: bytes | str, where: str):
    import torchvision  # noqa: F401  (registers torchvision::nms / roi_pool / roi_align, which the program calls)

    extra = {META_FILE: ""}
    try:
        program = torch.export.load(io.BytesIO(data) if isinstance(data, bytes) else data, extra_files=extra)
    except Exception as exc:          # a zip that is not an exported program fails in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{where}: not a readable torch.export program ({first[:200]})") from None
    module = program.module()

    def run(*inputs: Tensor) -> list[Tensor]:
        with torch.inference_mode():
            return list(module(*inputs))

    return run, extra[META_FILE] or None, program


def parse_metadata(text: str | None, where: str) -> dict:
    """The export's metadata, or a one-line CheckpointError saying why the file is not usable."""
    if not text:
        raise CheckpointError(f"{where}: not exported by this toolkit (no '{META_KEY}' metadata): its classes and "
                              "input pipeline are unknown; export the checkpoint with detect-export")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: its '{META_KEY}' metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: its '{META_KEY}' metadata is not a {FORMAT} record")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{where}: export version {meta['version']} is newer than this toolkit ({VERSION})")
    for key in ("kind", "class_names", "config", "input_dtype"):
        if key not in meta:
            raise CheckpointError(f"{where}: its '{META_KEY}' metadata has no '{key}'")
    if meta["kind"] not in KINDS:
        raise CheckpointError(f"{where}: exported pipeline '{meta['kind']}' is not one of {list(KINDS)}")
    return meta


class ExportedDetector:
    """An exported file behind the detector interface (``predict``, ``class_names``, ``eval``).

    Attributes:
        path: where it was read from; fmt: "onnx" or "torch-export".
        kind: "faster_rcnn", "fast_rcnn" or "rcnn" (the region scorer).
        class_names: C names; label i is ``class_names[i]``.
        config: the resolved config (a dict) of the checkpoint it was exported from.
        input_dtype: "float32" or "uint8", what the graph's image input is.
        backend: the onnxruntime InferenceSession, or the torch.export ExportedProgram.
    """

    training = False

    def __init__(self, *, path: str, fmt: str, meta: dict, run, backend) -> None:
        self.path, self.fmt, self.meta, self._run, self.backend = path, fmt, meta, run, backend
        self.kind = meta["kind"]
        self.class_names = list(meta["class_names"])
        self.config = meta["config"]
        self.input_dtype = meta["input_dtype"]
        self.test_proposals = int(meta.get("test_proposals", 0))
        self._source = None

    def eval(self) -> "ExportedDetector":
        return self

    def train(self, mode: bool = True) -> "ExportedDetector":
        if mode:
            raise DetectError(f"{self.path}: an exported model cannot be trained")
        return self

    def to(self, device) -> "ExportedDetector":
        if torch.device(device).type != "cpu":
            raise DetectError(f"{self.path}: exported models run on the CPU here, not on {device}")
        return self

    def _image(self, image: Tensor, index: int) -> Tensor:
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise DetectError(f"images[{index}]: expected a (3, H, W) RGB tensor, got {shape}")
        image = image.detach().cpu()
        if self.input_dtype == "uint8":
            return image if image.dtype == torch.uint8 else (image.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return image.float() / 255 if image.dtype == torch.uint8 else image.float().contiguous()

    def proposals(self, images: list[Tensor], image_ids: Sequence[str] | None) -> list[Tensor]:
        """Fast R-CNN's proposals from the config's proposal source, as the eager model finds them."""
        if self._source is None:
            cfg = config_from_dict(dict(self.config), where=f"config stored in {self.path}")
            f = cfg.fast_rcnn
            self._source = build_proposal_source(cfg, f.proposal_source, top_k=max(f.train_proposals, f.test_proposals),
                                                 compute_missing=f.compute_missing)
        return self._source(images, image_ids)

    def predict(self, images: list[Tensor], *, image_ids: Sequence[str] | None = None,
                boxes: Sequence[Tensor] | None = None, timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Detect objects in N (3, H, W) images (float in [0, 1] or uint8).

        Args:
            image_ids: Fast R-CNN: ids to look stored proposals up by.
            boxes: Fast R-CNN: N (R_i, 4) proposals in the images' pixels (instead of the proposal source).
            timings: if given, seconds are added to "exported" (the graph) and "proposals" (found here).

        Returns:
            N dicts: "boxes" (D, 4) in the images' pixels, "scores" (D,), "labels" (D,) int64 0-based.
        """
        if self.kind == "rcnn":
            raise DetectError(f"{self.path}: holds R-CNN's region scorer (warped crops in, scores and boxes out), "
                              "not a whole detector: call score_regions(crops, boxes)")
        images = [self._image(image, i) for i, image in enumerate(images)]
        if self.kind == "fast_rcnn" and boxes is None:
            start = time.perf_counter()
            boxes = self.proposals([i.float() / 255 if i.dtype == torch.uint8 else i for i in images], image_ids)
            if timings is not None:
                timings["proposals"] = timings.get("proposals", 0.0) + time.perf_counter() - start
        if self.kind == "fast_rcnn" and len(boxes) != len(images):
            raise DetectError(f"{self.path}: {len(boxes)} proposal tensors for {len(images)} images")
        results = []
        for i, image in enumerate(images):
            if self.kind == "faster_rcnn":
                inputs = (image,)
            else:       # the best test_proposals, as the eager model keeps them
                given = torch.as_tensor(boxes[i]).detach().cpu().float().reshape(-1, 4)
                inputs = (image, given[: self.test_proposals or None])
            start = time.perf_counter()
            out_boxes, scores, labels = self._run(*inputs)
            if timings is not None:
                timings["exported"] = timings.get("exported", 0.0) + time.perf_counter() - start
            results.append({"boxes": out_boxes, "scores": scores, "labels": labels.to(torch.int64)})
        return results

    def score_regions(self, crops: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """R-CNN: normalised warped crops (R, 3, S, S) and their boxes (R, 4) -> scores (R, C), boxes (R, C, 4)."""
        if self.kind != "rcnn":
            raise DetectError(f"{self.path}: holds a whole {self.kind} detector; call predict(images)")
        scores, out = self._run(crops.detach().cpu().float().contiguous(), boxes.detach().cpu().float())
        return scores, out


def load_exported(path: str | Path, *, class_names: Sequence[str] | None = None, threads: int | None = None,
                  overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> ExportedDetector:
    """Open an exported ``.onnx`` / ``.pt2`` file (what ``Detector.from_checkpoint`` does for these suffixes).

    Args:
        class_names: the classes the caller expects (e.g. the dataset's); other names are refused.
        threads: onnxruntime's intra-op threads (default: torch's thread count).
        overrides: ``key=value`` changes of the stored config outside ``model.*`` (e.g. ``data.root`` or
            Fast R-CNN's proposal source); a ``model.*`` value is baked into the graph and is refused.
        device: only the CPU runs exported files here; another device is refused before the file is read.

    Raises:
        CheckpointError: one line naming the file: missing, unreadable, from another tool (no
            metadata), or exported for other classes.
        DetectError: a device other than the CPU, or an override of the graph's ``model.*`` settings.
    """
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CheckpointError(f"{path}: not an exported model (expected a {' or '.join(SUFFIXES)} file)")
    if torch.device(device).type != "cpu":
        raise DetectError(f"{path}: exported models run on the CPU here, not on {device} (use the checkpoint)")
    if not path.is_file():
        raise CheckpointError(f"exported model not found: {path}")
    detector = open_exported(str(path), fmt, where=str(path), class_names=class_names, threads=threads)
    if overrides:
        detector.config = overridden_config(detector.config, list(overrides), where=str(path))
    return detector


def overridden_config(config: dict, overrides: list[str], *, where: str) -> dict:
    """The stored config with ``overrides`` applied; one that changes a ``model.*`` value is refused.

    The graph was traced with the stored model settings (sizes, thresholds, NMS), so such an override
    would be silently ignored; everything else (data, proposal source) is read outside the graph.
    """
    cfg = config_from_dict(dict(config), where=f"config stored in {where}", overrides=overrides)
    resolved = config_to_dict(cfg)
    stored = config_to_dict(config_from_dict(dict(config), where=f"config stored in {where}"))
    changed = sorted(_changed_keys(stored.get("model", {}), resolved.get("model", {}), "model"))
    if changed:
        raise DetectError(f"{where}: --set {changed[0]} changes a setting baked into the exported graph; "
                          "re-export the checkpoint with it instead")
    return resolved


def _changed_keys(old, new, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in old.keys() | new.keys()
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [] if old == new else [prefix]


def open_exported(data: bytes | str, fmt: str, *, where: str, class_names: Sequence[str] | None = None,
                  threads: int | None = None) -> ExportedDetector:
    """:func:`load_exported` from a file name or the file's bytes (the export's check runs what it will write)."""
    if fmt == "onnx":
        run, text, backend = _onnx_runner(data, threads or torch.get_num_threads(), where)
    else:
        run, text, backend = _pt2_runner(data, where)
    meta = parse_metadata(text, where)
    if class_names is not None and list(class_names) != list(meta["class_names"]):
        raise CheckpointError(f"{where}: exported for classes {meta['class_names']}, but {list(class_names)} are "
                              "expected")
    return ExportedDetector(path=where, fmt=fmt, meta=meta, run=run, backend=backend)


def model_from_exported(path: str | Path, *, overrides: list[str] | None = None):
    """:func:`detect.build.model_from_checkpoint` for an exported file: ``(detector, Config, info)``.

    ``info`` has the checkpoint dict's "path", "class_names" and "config" keys, so a tool reads it as a
    checkpoint's; ``overrides`` change the stored config (e.g. ``data.root``), not the graph
    (see :func:`load_exported`).
    """
    detector = load_exported(path, overrides=overrides or ())
    cfg = config_from_dict(dict(detector.config), where=f"config stored in {path}")
    return detector, cfg, {"path": str(path), "class_names": detector.class_names, "config": detector.meta["config"]}


def match_detections(expected: dict, actual: dict, *, box_tol: float = 0.5,
                     score_tol: float = 1e-3) -> tuple[str | None, float, float]:
    """Pair two detection sets one to one (same label, box within ``box_tol`` px, score within ``score_tol``).

    Order is not compared: detections whose scores tie may come out of NMS in either order.

    Returns:
        (None, or the first difference in words; the largest box and score differences of the pairs).
    """
    eb, es, el = (torch.as_tensor(expected[k]).detach() for k in ("boxes", "scores", "labels"))
    ab, as_, al = (torch.as_tensor(actual[k]).detach() for k in ("boxes", "scores", "labels"))
    if len(es) != len(as_):
        return f"{len(as_)} detections instead of {len(es)}", float("inf"), float("inf")
    box_diff = (eb.double()[:, None] - ab.double()[None]).abs().amax(-1)
    score_diff = (es.double()[:, None] - as_.double()[None]).abs()
    close = (el[:, None] == al[None]) & (box_diff <= box_tol) & (score_diff <= score_tol)
    used = torch.zeros(len(as_), dtype=torch.bool)
    worst_box = worst_score = 0.0
    for i in range(len(es)):
        free = close[i] & ~used
        if not bool(free.any()):
            return (f"detection {i} (label {int(el[i])}, score {float(es[i]):.4f}, box "
                    f"{[round(v, 2) for v in eb[i].tolist()]}) has no counterpart within {box_tol} px / "
                    f"{score_tol} score", float("inf"), float("inf"))
        j = i if bool(free[i]) else int(free.nonzero()[0])
        used[j] = True
        worst_box, worst_score = max(worst_box, float(box_diff[i, j])), max(worst_score, float(score_diff[i, j]))
    return None, worst_box, worst_score
