"""Export a trained detector as an ONNX file or a torch.export program (``.pt2``), checked against eager.

    export_checkpoint("runs/x/model_final.pt", "model.onnx")        # or "model.pt2"

What the file holds (the test-time path of ONE image of any size, :mod:`detect.export_graphs`):

* Faster R-CNN: ``image`` (3, H, W) -> ``boxes`` (D, 4) in its pixels, ``scores`` (D,), ``labels`` (D,);
  resize, normalisation, trunk, RPN (anchors of the actual grid, top-k, NMS), RoI pooling, head,
  per-class NMS and the scaling back to input pixels are all inside;
* Fast R-CNN: the same with the proposals as a second input ``proposals`` (R, 4): selective search is
  not a tensor program, so it stays outside (:mod:`detect.runtime` runs the config's source);
* R-CNN: the region scorer ``crops`` (R, 3, S, S), ``regions`` (R, 4) -> ``scores`` (R, C), ``boxes`` (R, C, 4).

Image sides (1 to :data:`MAX_SIDE`) and the number of boxes are dynamic: one program, one ONNX
file with symbolic axes, no retrace per size. The ONNX file is translated from the same
``torch.export`` program (NMS -> NonMaxSuppression, RoI pooling -> MaxRoiPool / RoiAlign).
Before a file is written, :func:`check_export` runs its bytes through :mod:`detect.runtime` and
compares the detections with the eager model's on image sizes the trace never saw.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from detect.build import model_from_checkpoint
from detect.config import config_to_dict
from detect.errors import ExportError
from detect.export_graphs import GRAPHS, Parts, RegionScorerGraph, model_parts
from detect.runtime import FORMAT, META_FILE, META_KEY, SUFFIXES, VERSION, match_detections, open_exported
from detect.utils.io import atomic_write_bytes

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
MAX_SIDE = 1 << 14
BOX_TOL, SCORE_TOL = 0.5, 1e-3           # what "equal to eager" means for the check (pixels, score)
SIGNATURES = {
    "faster_rcnn": (["image"], ["boxes", "scores", "labels"]),
    "fast_rcnn": (["image", "proposals"], ["boxes", "scores", "labels"]),
    "rcnn": (["crops", "regions"], ["scores", "boxes"]),
}


# --------------------------------------------------------------------------- accessors of the eager model


def eager_detections(model: nn.Module, parts: Parts, image: Tensor, boxes: Tensor | None = None) -> dict:
    """The eager model's detections of one float image (Fast R-CNN: on the given proposals)."""
    if parts.kind == "faster_rcnn":
        return model.predict([image])[0]
    saved = model.proposals.source
    model.proposals.source = lambda images, image_ids=None, **_: [boxes]
    try:
        return model.predict([image])[0]
    finally:
        model.proposals.source = saved


# --------------------------------------------------------------------------- trace


@contextmanager
def _nms_may_keep_nothing() -> Iterator[None]:
    """Trace torchvision's NMS as returning 0 or more boxes.

    Its fake kernel sizes the output with the deprecated ``create_unbacked_symint`` whose lower bound
    is 2, so an exported program asserts "at least 2 boxes kept" at run time and fails on any image
    with fewer detections (one of the ways torchvision's own export breaks, pytorch/vision#9395).
    """
    with torch.library._scoped_library("torchvision", "FRAGMENT") as lib:
        def fake_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
            kept = torch.library.get_ctx().new_dynamic_size(min=0)
            return boxes.new_empty(kept, dtype=torch.int64)

        torch.library.register_fake("torchvision::nms", fake_nms, lib=lib)
        yield


def example_inputs(parts: Parts, input_dtype: str) -> tuple[tuple, dict]:
    """Inputs to trace with and their dynamic axes."""
    side = torch.export.Dim("height", min=1, max=MAX_SIDE), torch.export.Dim("width", min=1, max=MAX_SIDE)
    count = torch.export.Dim("regions", min=0, max=1 << 20)
    generator = torch.Generator().manual_seed(0)
    if parts.kind == "rcnn":
        size = parts.regions.crop_size
        crops = torch.randn(5, 3, size, size, generator=generator)
        return (crops, _random_boxes(5, size, size, generator)), {"crops": {0: count}, "regions": {0: count}}
    h = parts.transform.test_min_size
    image = torch.randint(0, 256, (3, h, h * 4 // 3), dtype=torch.uint8, generator=generator)
    image = image if input_dtype == "uint8" else image.float() / 255
    if parts.kind == "faster_rcnn":
        return (image,), {"image": {1: side[0], 2: side[1]}}
    boxes = _random_boxes(7, h, h * 4 // 3, generator)
    return (image, boxes), {"image": {1: side[0], 2: side[1]}, "proposals": {0: count}}


def _random_boxes(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    wh = 4 + torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.5, height * 0.5])
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(width), float(height)]))], dim=1)


def trace(parts: Parts, *, input_dtype: str = "float32") -> torch.export.ExportedProgram:
    """One ``torch.export`` program of the kind's graph with dynamic sizes.

    Raises:
        ExportError: the tracer failed (the first line of its message names the operation).
    """
    if input_dtype not in ("float32", "uint8"):
        raise ExportError(f"input dtype must be 'float32' or 'uint8', got {input_dtype!r}")
    graph = GRAPHS[parts.kind](parts).eval()
    args, dynamic = example_inputs(parts, input_dtype)
    try:
        # backed_size_oblivious: a count of 0 or 1 (proposals, image sides) is a size like any other,
        # instead of being specialised away by the tracer's 0/1 rule.
        with _nms_may_keep_nothing(), torch.no_grad(), \
                torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(graph, args, dynamic_shapes=dynamic)
    except Exception as exc:       # the tracer's errors are many and long: one line naming the step
        raise ExportError(f"torch.export could not trace the {parts.kind} graph: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """The tracer's own words in one line: its first line, and the first detail under it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    detail = next((line for line in lines[1:] if line.startswith("- ")), "")
    return (lines[0] + (f" {detail}" if detail else ""))[:400]


# --------------------------------------------------------------------------- serialise


def _onnx_roi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    """``torchvision::roi_pool`` as ONNX MaxRoiPool (onnxscript's own translation has the wrong signature).

    The second output, torchvision's argmax, only serves the backward pass; nothing reads it.
    """
    import onnxscript
    from onnxscript import opset18 as op

    pooled = op.MaxRoiPool(input, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
    return pooled, op.Cast(pooled, to=onnxscript.INT64.dtype)


def _adaptive_max_pool_by_slices(x: Tensor, output_size: list[int]) -> tuple[Tensor, Tensor]:
    """``aten.adaptive_max_pool2d`` (R-CNN's pool5) as maxima over slices, which ONNX has and it lacks.

    The window of output cell i is ``[floor(i * n / m), ceil((i + 1) * n / m))`` along each axis, and the
    maximum of a rectangle is the maximum over its rows of the maxima over its columns: exact. The input
    size must be static (R-CNN's crops are). The second output (argmax) only serves the backward pass.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rows = [x[..., i * h // output_size[0]: -(-(i + 1) * h // output_size[0]), :].amax(-2, keepdim=True)
            for i in range(output_size[0])]
    x = torch.cat(rows, dim=-2)
    cols = [x[..., j * w // output_size[1]: -(-(j + 1) * w // output_size[1])].amax(-1, keepdim=True)
            for j in range(output_size[1])]
    out = torch.cat(cols, dim=-1)
    return out, torch.zeros_like(out, dtype=torch.int64)


def serialize(program: torch.export.ExportedProgram, fmt: str, meta: dict) -> bytes:
    """The bytes of a ``.pt2`` (meta as extra file) or ``.onnx`` file (meta in ``metadata_props``)."""
    text = json.dumps(meta)
    if fmt == "torch-export":
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={META_FILE: text})
        return buffer.getvalue()
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's ONNX builder)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript (pip install -e '.[export]')") from None
    inputs, outputs = SIGNATURES[meta["kind"]]
    try:
        with _nms_may_keep_nothing():
            pool = torch.ops.aten.adaptive_max_pool2d.default
            if any(node.target == pool for node in program.graph.nodes):
                table = torch.export.default_decompositions()
                table[pool] = _adaptive_max_pool_by_slices
                program = program.run_decompositions(table)
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=inputs, output_names=outputs, verbose=False,
                custom_translation_table={torch.ops.torchvision.roi_pool.default: _onnx_roi_pool})
    except Exception as exc:
        raise ExportError(f"ONNX translation of the {meta['kind']} graph failed: {_first_line(exc)}") from exc
    onnx_program.model.metadata_props[META_KEY] = text
    return onnx_program.model_proto.SerializeToString()


def metadata(parts: Parts, *, config: dict, input_dtype: str, source: str, notes: list[str]) -> dict:
    """What :mod:`detect.runtime` needs to run the file and refuse a wrong one."""
    inputs, outputs = SIGNATURES[parts.kind]
    return {"format": FORMAT, "version": VERSION, "kind": parts.kind, "class_names": list(parts.class_names),
            "config": config, "input_dtype": input_dtype, "inputs": inputs, "outputs": outputs,
            "test_proposals": parts.test_proposals, "source": source, "notes": notes, "torch": torch.__version__}


# --------------------------------------------------------------------------- check


def check_image(height: int, width: int, seed: int) -> Tensor:
    """A uint8 (3, H, W) image of random-coloured blocks (edges and regions for the detector to fire on).

    Each pixel gets a little noise, as a photo's do: on perfectly flat regions many anchors score the
    same up to float rounding, and onnxruntime's convolutions (1e-5 from PyTorch's) rank such near-ties
    differently, so the RPN proposes other boxes there (torch.export runs PyTorch's kernels: no such gap).
    """
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 256, (3, max(1, height // 24), max(1, width // 24)), generator=generator)
    image = torch.nn.functional.interpolate(cells[None].float(), size=(height, width), mode="nearest")[0]
    noise = torch.randint(-3, 4, image.shape, generator=generator)
    return (image + noise).clamp(0, 255).to(torch.uint8)


def check_sizes(parts: Parts) -> list[tuple[int, ...]]:
    """Image sizes the trace never saw: wide (the max-size bound wins), tall, small square (upscaled), odd.

    R-CNN's scorer: region counts, including none and one.
    """
    if parts.kind == "rcnn":
        return [(0,), (1,), (9,), (40,)]
    s = parts.transform.test_min_size
    return [(round(0.6 * s), round(1.9 * s)), (round(1.5 * s), round(0.7 * s)), (s // 2 + 3, s // 2 + 3),
            (s + 37, s + 101)]


def check_export(model: nn.Module, parts: Parts, data: bytes, fmt: str, *, where: str,
                 sizes: list[tuple[int, ...]] | None = None) -> list[dict]:
    """Run the exported bytes and the eager model on several sizes; refuse any difference.

    Returns:
        One record per size: "size", "detections", "max_box_diff", "max_score_diff", "eager_s", "exported_s".

    Raises:
        ExportError: naming the size and the first detection that differs.
    """
    exported = open_exported(data, fmt, where=where)
    one = _check_regions if parts.kind == "rcnn" else _check_image
    records = []
    for index, size in enumerate(sizes or check_sizes(parts)):
        record, problem = one(model, parts, exported, size, torch.Generator().manual_seed(index))
        if problem:
            what = f"{size[0]} regions" if parts.kind == "rcnn" else f"a {size[0]}x{size[1]} image"
            raise ExportError(f"{where}: the {fmt} export differs from the eager model on {what}: {problem}; "
                              "not written")
        records.append(record)
    return records


def _timed(fn, *args):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return out, time.perf_counter() - start


def _check_image(model, parts: Parts, exported, size: tuple, generator: torch.Generator) -> tuple[dict, str | None]:
    image = check_image(*size, seed=int(generator.initial_seed())).float() / 255
    boxes = _random_boxes(60, *size, generator) if parts.kind == "fast_rcnn" else None
    want, eager_s = _timed(eager_detections, model, parts, image, boxes)
    got, exported_s = _timed(lambda: exported.predict([image], boxes=None if boxes is None else [boxes])[0])
    problem, box_diff, score_diff = match_detections(want, got, box_tol=BOX_TOL, score_tol=SCORE_TOL)
    return {"size": list(size), "detections": len(want["scores"]), "max_box_diff": box_diff,
            "max_score_diff": score_diff, "eager_s": eager_s, "exported_s": exported_s}, problem


def _check_regions(model, parts: Parts, exported, size: tuple, generator: torch.Generator) -> tuple[dict, str | None]:
    crop, count = parts.regions.crop_size, size[0]
    crops, regions = torch.randn(count, 3, crop, crop, generator=generator), _random_boxes(count, 64, 64, generator)
    want, eager_s = _timed(RegionScorerGraph(parts).eval(), crops, regions)
    got, exported_s = _timed(exported.score_regions, crops, regions)
    scores = (want[0] - got[0]).abs().nan_to_num(0.0)   # -inf - -inf: a class without an SVM on both sides
    boxes = (want[1] - got[1]).abs()
    score_diff = float(scores.max()) if scores.numel() else 0.0
    box_diff = float(boxes.max()) if boxes.numel() else 0.0
    problem = None
    if want[0].shape != got[0].shape or score_diff > SCORE_TOL or box_diff > BOX_TOL:
        problem = f"scores differ by {score_diff:.2e}, boxes by {box_diff:.3f} px"
    return {"size": [count], "detections": count, "max_box_diff": box_diff, "max_score_diff": score_diff,
            "eager_s": eager_s, "exported_s": exported_s}, problem


# --------------------------------------------------------------------------- the whole export


def resolve_format(out: Path, fmt: str | None) -> str:
    """The format from ``fmt`` or the file suffix; refuses a suffix that contradicts it."""
    by_suffix = SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        if by_suffix is None:
            raise ExportError(f"{out}: cannot tell the format from the suffix: use .onnx or .pt2, or --format")
        return by_suffix
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (onnx, torch-export)")
    if by_suffix != fmt:
        what = {"onnx": "an ONNX", "torch-export": "a torch.export"}[fmt]
        raise ExportError(f"{out}: {what} export is written as {FORMATS[fmt]}, not {out.suffix or 'no suffix'}")
    return fmt


def export_model(model: nn.Module, out: str | Path | list, *, fmt: str | None = None, config: dict | None = None,
                 input_dtype: str = "float32", check: bool = True, source: str = "",
                 notes: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Trace once, then serialise, check against eager and write (atomically) each output file.

    Args:
        out: a file, or a list of files (one trace for all, each in the format of its suffix).
        fmt: the format of a single ``out`` (default: from its suffix).

    Returns:
        {"out", "format", "kind", "bytes", "export_s", "check": per-size records, "notes", "inputs", "outputs"}
        for a single file; {"files": [one such dict per file]} for a list.
    """
    outs = [Path(p) for p in out] if isinstance(out, (list, tuple)) else [Path(out)]
    formats = [resolve_format(p, fmt if len(outs) == 1 else None) for p in outs]
    parts = model_parts(model)
    model.eval()
    start = time.perf_counter()
    program = trace(parts, input_dtype=input_dtype)
    trace_s = time.perf_counter() - start
    meta = metadata(parts, config=config or {}, input_dtype=input_dtype, source=source, notes=list(notes or []))
    reports, files = [], []
    for path, kind in zip(outs, formats):      # every file is checked before any is written
        start = time.perf_counter()
        data = serialize(program, kind, meta)
        export_s = trace_s + time.perf_counter() - start
        records = check_export(model, parts, data, kind, where=str(path)) if check else []
        files.append((path, data))
        reports.append({"out": str(path), "format": kind, "kind": parts.kind, "bytes": len(data), "export_s": export_s,
                        "check": records, "notes": meta["notes"], "inputs": meta["inputs"], "outputs": meta["outputs"]})
    for path, data in files:
        atomic_write_bytes(path, data)
    for report in reports:
        for r in report["check"]:
            log(f"check {'x'.join(map(str, r['size']))} ({report['format']}): {r['detections']} detections, boxes "
                f"within {r['max_box_diff']:.1e} px, scores within {r['max_score_diff']:.1e} (eager "
                f"{r['eager_s'] * 1000:.0f} ms, exported {r['exported_s'] * 1000:.0f} ms)")
    return reports[0] if not isinstance(out, (list, tuple)) else {"files": reports}


def pipeline_notes(cfg) -> list[str]:
    """What of the checkpoint's test-time pipeline stays outside the exported graph, in words."""
    p = cfg.model.pipeline
    if p == "fast_rcnn":
        source = cfg.fast_rcnn.proposal_source
        how = {"stored": f"looked up in the proposal store {cfg.proposals.store!r}",
               "selective_search": "computed on the fly by selective search (not a tensor program)",
               "ground_truth": "the ground-truth boxes"}.get(source, source)
        return [f"proposals are an input ('proposals', R x 4 in image pixels): fast_rcnn.proposal_source={source} "
                f"({how}) stays outside the graph; detect.runtime finds them the same way when not given"]
    if p == "rcnn":
        return ["R-CNN: only the region scorer is exported (warped crops + boxes in, SVM scores and regressed "
                "boxes out); proposals, warping, thresholds and NMS stay outside the graph"]
    return []


def export_checkpoint(checkpoint: str | Path, out: str | Path | list | None = None, *, fmt: str | None = None,
                      overrides: list[str] | None = None, input_dtype: str = "float32", check: bool = True,
                      log: Callable[[str], None] = print) -> dict:
    """:func:`export_model` for a checkpoint file (or run folder); ``out`` defaults to ``<checkpoint>.onnx``."""
    model, cfg, ckpt = model_from_checkpoint(checkpoint, overrides=overrides)
    if out is None:
        out = Path(ckpt["path"]).with_suffix(FORMATS[fmt or "onnx"])
    notes = pipeline_notes(cfg)
    for note in notes:
        log(f"note: {note}")
    return export_model(model, out, fmt=fmt, config=config_to_dict(cfg), input_dtype=input_dtype, check=check,
                        source=str(ckpt["path"]), notes=notes, log=log)
