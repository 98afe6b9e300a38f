"""Fast CPU inference for a :class:`detect.detector.Detector`: compiled fp32, bf16 autocast, int8 PT2E.

:func:`optimize` returns a copy of the detector whose heavy layers run faster, with the same
``predict`` / ``score_boxes`` (inference only: do not train the copy). The convolutions are ~90% of
inference time, so only the layers are changed; proposals, RoI pooling, box decoding and NMS stay
eager fp32 (box decoding in bf16 would move a 400 px box by ~2 px: bf16 keeps 8 mantissa bits).

* ``fp32`` + ``compile``: ``torch.compile`` (inductor, with freezing: weights become constants,
  so conv + bias + ReLU fuse and oneDNN weights are pre-packed once) of the trunk, the RPN's conv
  head and the per-RoI layers, with dynamic shapes so a new image size or RoI count does not
  recompile (sizes 0 and 1 are specialised by dynamo, so a batch of 1 then of 2 compiles twice).
* ``bf16``: the same layers under ``torch.autocast("cpu", torch.bfloat16)``, outputs cast back to
  float32. Fast only on CPUs with AVX512-BF16 or AMX (:func:`bf16_note` says when it is not).
* ``int8``: post-training static quantization of the trunk's and the RPN head's convolutions
  (:data:`INT8_STAGES`) with PT2E and the x86 inductor quantizer (``torchao.quantization.pt2e``;
  torch >= 2.10 no longer ships ``torch.ao.quantization.quantize_pt2e``), each calibrated on the
  inputs it sees while the fp32 copy detects on the given training images; then compiled with
  freezing, which lowers the quantize/dequantize pairs to oneDNN int8 convolutions. The per-RoI
  layers and the class/box predictor stay fp32 (compiled).

Written here rather than taken whole from a library because the detector's data-dependent parts
(top-k proposals, NMS, per-image splits) must stay out of the graph; the compiling and
quantizing are torch's and torchao's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Literal

import torch
from torch import Tensor, nn

from detect.errors import DetectError

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS = ("fp32", "bf16", "int8")
# The stages int8 quantizes (see :func:`stages`): the whole-image convolutions. The RPN head's 3x3
# convolution is the widest layer of the tiny trunk's detector (128 -> 128 channels at stride 8).
INT8_STAGES = ("trunk", "rpn_head")
CPUINFO = Path("/proc/cpuinfo")


class FastInferenceError(DetectError, ValueError):
    """A precision or option that cannot be applied to this detector or CPU."""


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it is unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown CPU" where it is unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def bf16_note(flags: set[str] | None = None) -> str | None:
    """None when the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16), else one line saying it lacks it."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512_bf16", "amx_bf16"} & flags:
        return None
    return ("bf16: this CPU has neither AVX512-BF16 nor AMX-BF16 (/proc/cpuinfo flags avx512_bf16, amx_bf16); "
            "bf16 runs emulated and is expected to be slower than fp32")


def stages(detector: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The layers :func:`optimize` replaces, as (parent module, attribute name).

    The one place that reaches into the detector's parts: the trunk, the RPN's conv head (when
    the proposals come from an RPN) and the per-RoI layers of a head on the feature map.
    """
    found = {}
    if isinstance(getattr(detector.backbone, "trunk", None), nn.Module):
        found["trunk"] = (detector.backbone, "trunk")
    if isinstance(getattr(detector.proposals, "head", None), nn.Module):
        found["rpn_head"] = (detector.proposals, "head")
    if getattr(detector.head, "uses_feature_map", False) and isinstance(getattr(detector.head, "box_head", None),
                                                                         nn.Module):
        found["box_head"] = (detector.head, "box_head")
    return found


class Autocast(nn.Module):
    """Runs ``module`` under CPU bf16 autocast; float outputs come back as float32.

    Args:
        module: the layers; takes and returns tensors (or a tuple of them).
    """

    def __init__(self, *, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.module(x)
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


class Compiled(nn.Module):
    """``module`` compiled by inductor with freezing and dynamic shapes (compiles on the first call).

    Freezing makes the weights graph constants, so inductor folds and pre-packs them (oneDNN
    layouts, int8 weight packing) once. It applies only under inference mode / no_grad, which
    ``predict`` runs under. The flag is set around each call rather than process-wide; passed as
    ``torch.compile(options=...)`` it does not reach the int8 weight-packing pass (torch 2.14 +
    torchao 0.18: ``UnsupportedOperatorException: onednn.qconv_prepack``).

    Args:
        module: the layers to compile.
    """

    def __init__(self, *, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, backend="inductor", dynamic=True)

    def forward(self, x: Tensor):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def _compile(module: nn.Module) -> nn.Module:
    return Compiled(module=module)


def _stage_inputs(detector: nn.Module, parts: dict[str, tuple[nn.Module, str]], images: Iterable) -> dict:
    """What each stage's layers take on ``images`` at test time: {stage: [tensor, ...]}.

    Recorded by forward pre-hooks while the fp32 trunk (and the RPN head on its features) runs on
    each image resized, normalised and padded as ``predict`` does it; proposals are not needed, so
    a Fast R-CNN with stored proposals is calibrated on any training image too.
    """
    from detect.data.loader import as_image_tensors
    from detect.transforms import check_images

    recorded: dict[str, list[Tensor]] = {name: [] for name in parts}
    hooks = [getattr(parent, attr).register_forward_pre_hook(
        lambda module, args, name=name: recorded[name].append(args[0].clone())) for name, (parent, attr) in
        parts.items()]
    try:
        with torch.inference_mode():
            for image in images:
                batch, _ = detector.transform_for_test(check_images(as_image_tensors([image], torch.device("cpu"))),
                                                       training=False)
                x = batch.tensor
                if detector.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                features = detector.backbone(x)
                if "rpn_head" in parts:
                    detector.proposals.head(features)
    finally:
        for hook in hooks:
            hook.remove()
    # clones outside inference mode: an inference tensor cannot be exported or observed
    return {name: [x.clone() for x in xs] for name, xs in recorded.items()}


_ACTIVATIONS = ("torch.nn.modules.activation.ReLU", "torch.nn.modules.activation.ReLU6")


def split_reused_activations(graph: torch.fx.GraphModule) -> int:
    """Give each call of a reused activation module its own source partition; returns the calls relabelled.

    torchvision's ResNet blocks call one ``self.relu`` three times. The quantizer groups an exported
    graph's nodes by the module they came from (``nn_module_stack``), so those three ReLU nodes form
    one partition with three outputs, and the x86 inductor quantizer's conv + add + ReLU pattern
    then fails ("Input partition has more than one output node"). An activation call is one node,
    so relabelling each with a numbered name changes only the grouping.
    """
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            fqn, cls = list(stack.values())[-1]
            name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            if name in _ACTIVATIONS:
                calls.setdefault(fqn, []).append(node)
    relabelled = 0
    for fqn, nodes in calls.items():
        if len(nodes) < 2:
            continue
        for i, node in enumerate(nodes):
            stack = dict(node.meta["nn_module_stack"])
            key, (_, cls) = list(stack.items())[-1]
            stack[key] = (f"{fqn}.call{i}", cls)
            node.meta["nn_module_stack"] = stack
            relabelled += 1
    return relabelled


def quantize_int8(module: nn.Module, examples: list[Tensor]) -> nn.Module:
    """PT2E static int8 quantization of ``module`` calibrated on ``examples`` (its (1, C, H, W) inputs).

    Returns the converted (reference, q/dq) graph module; compiling it with freezing lowers it to
    int8 kernels. Raises FastInferenceError naming what failed when torchao or the export is missing.
    """
    try:
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as e:
        raise FastInferenceError(f"int8 needs torchao's PT2E quantization (pip install torchao): {e}") from None
    from torch.export import Dim, export

    dims = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}      # images per batch, feature height and width
    with torch.no_grad():
        graph = export(module.eval(), (examples[0],), dynamic_shapes=(dims,)).module()
        split_reused_activations(graph)
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for x in examples:            # observers record activation ranges
            prepared(x)
        converted = convert_pt2e(prepared)
    # predict() switches every module to eval mode; an exported graph refuses .eval() unless told.
    return allow_exported_model_train_eval(converted)


def optimize(detector: nn.Module, *, precision: Precision = "fp32", compile: bool = True,
             calibration_images: Iterable | None = None) -> nn.Module:
    """A copy of ``detector`` for fast CPU inference (``predict`` as before; the original is unchanged).

    Args:
        detector: a :class:`detect.detector.Detector` on the CPU.
        precision: "fp32", "bf16" (autocast of the layers) or "int8" (PT2E of the trunk's convolutions).
        compile: compile the layers with inductor (freezing, dynamic shapes). int8 is only fast compiled.
        calibration_images: int8 only: training images (tensors, paths, PIL images, arrays) whose
            activation ranges set the quantization scales; required for int8.

    Returns:
        The optimized copy, in eval mode; its BatchNorms are folded (``prepare_for_inference``).
    """
    if precision not in PRECISIONS:
        raise FastInferenceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    calibration = list(calibration_images or [])
    if precision == "int8" and not calibration:
        raise FastInferenceError("int8 quantization needs calibration images (e.g. --calibrate 32 training images)")
    if next(detector.parameters()).device.type != "cpu":
        raise FastInferenceError("optimize: fast inference is for the CPU; move the detector there first")
    fast = copy.deepcopy(detector).eval()
    fast.prepare_for_inference()
    fast.requires_grad_(False)
    parts = stages(fast)
    if precision == "int8":
        if "trunk" not in parts or not getattr(fast.head, "uses_feature_map", False):
            raise FastInferenceError("int8: only detectors with a trunk on the whole image (Faster/Fast R-CNN)")
        chosen = {name: parts.pop(name) for name in INT8_STAGES if name in parts}
        examples = _stage_inputs(fast, chosen, calibration)
        for name, (parent, attr) in chosen.items():
            layers = quantize_int8(getattr(parent, attr), examples[name])
            setattr(parent, attr, _compile(layers) if compile else layers)
    for parent, name in parts.values():
        layers = getattr(parent, name)
        if precision == "bf16":
            layers = Autocast(module=layers)
        if compile:
            layers = _compile(layers)
        setattr(parent, name, layers)
    fast.fast_inference = {"precision": precision, "compiled": compile}
    return fast


def compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
