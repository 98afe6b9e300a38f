"""detect.fast_inference: compiled fp32 equals eager; bf16 within its rounding; int8 and bf16 refusals/notes.

The compiled test is marked ``slow`` (inductor builds C++ kernels: ~1-2 min on 2 busy cores the first
time, seconds once its on-disk cache holds them); ``pytest -m "not slow"`` leaves it out.
"""

import pytest
import torch

from detect import build_model, load_config
from detect.fast_inference import FastInferenceError, bf16_note, compile_count, cpu_flags, optimize

NAMES = ["circle", "square", "triangle", "star", "ring"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/faster_rcnn/tiny_synthetic.yaml", ["model.rpn.post_nms_top_n_test=50",
                                                                  f"model.num_classes={len(NAMES)}"])
    torch.manual_seed(0)
    return build_model(cfg, class_names=NAMES).eval()


def _images(*sizes):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.slow
def test_compiled_fp32_gives_eager_detections_on_new_sizes_without_recompiling(tiny):
    # Catches: a compiled path that changes the numbers, and one that retraces per image size (dynamic=False).
    fast = optimize(tiny, precision="fp32", compile=True)
    first, second = _images((200, 300), (300, 220))
    expected = [tiny.predict([im])[0] for im in (first, second)]
    got = [fast.predict([first])[0]]
    graphs = compile_count()
    got.append(fast.predict([second])[0])
    assert compile_count() == graphs           # a second size reuses the dynamic-shape graphs
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        assert torch.equal(e["labels"], g["labels"])
        assert (e["boxes"] - g["boxes"]).abs().max() <= 0.5
        assert (e["scores"] - g["scores"]).abs().max() <= 1e-3


def test_bf16_head_outputs_within_bf16_rounding(tiny):
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per op). On this model the class
    # probabilities moved by 2e-4 and the regressed boxes by 0.003 px; 5e-3 and 0.5 px leave ~25x for
    # other CPUs' kernels while a wrong-layer error (features left in bf16 into fp32 box decoding, a
    # skipped layer) moves them by far more.
    image = _images((240, 320))[0]
    boxes = [torch.tensor([[10.0, 20.0, 120.0, 150.0], [50.0, 40.0, 300.0, 230.0], [0.0, 0.0, 64.0, 64.0]])]
    (s32, b32), = tiny.score_boxes([image], boxes)
    fast = optimize(tiny, precision="bf16", compile=False)
    (s16, b16), = fast.score_boxes([image], boxes)
    assert s16.dtype == torch.float32
    assert 0 < (s32 - s16).abs().max() <= 5e-3     # not bit-equal: bf16 did run
    assert (b32 - b16).abs().max() <= 0.5


def test_optimize_leaves_the_original_detector_unchanged(tiny):
    image = _images((200, 260))[0]
    before = tiny.predict([image])[0]
    optimize(tiny, precision="bf16", compile=False)
    after = tiny.predict([image])[0]
    assert torch.equal(before["boxes"], after["boxes"]) and torch.equal(before["scores"], after["scores"])
    assert type(tiny.backbone.trunk).__name__ == "Sequential"


def test_int8_quantizes_the_trunk_and_rpn_head_on_their_own_inputs_and_keeps_the_roi_layers(tiny):
    # Catches: a whole-image stage left in fp32 (no quantize nodes), the per-RoI layers or the predictor
    # quantized, and a stage calibrated on other tensors than it sees (its scales clip the features).
    pytest.importorskip("torchao")
    from detect.transforms import check_images

    fast = optimize(tiny, precision="int8", compile=False, calibration_images=_images((200, 300), (256, 240)))

    def quantize_nodes(module):
        return sum("quantize_per_tensor" in str(node.target) for node in module.graph.nodes)

    assert quantize_nodes(fast.backbone.trunk) >= 5 and quantize_nodes(fast.proposals.head) >= 1
    assert type(fast.head.box_head).__name__ == "Sequential" and type(fast.head.predictor) is type(tiny.head.predictor)
    batch, _ = tiny.transform_for_test(check_images(_images((220, 280))), training=False)
    with torch.no_grad():
        features = tiny.backbone(batch.tensor)
        want = tiny.proposals.head(features)
        got = fast.proposals.head(fast.backbone.trunk(batch.tensor.contiguous(memory_format=torch.channels_last)))
    for w, g in zip(want, got):
        error = (w - g).abs().max() / w.abs().max()
        assert 0 < error <= 0.05, error        # int8 did run, and within its rounding


def test_int8_without_calibration_images_is_refused(tiny):
    with pytest.raises(FastInferenceError, match="int8 quantization needs calibration images"):
        optimize(tiny, precision="int8", calibration_images=[])


def test_unknown_precision_is_refused(tiny):
    with pytest.raises(FastInferenceError, match="precision must be one of fp32, bf16, int8, got 'fp16'"):
        optimize(tiny, precision="fp16")


def test_bf16_note_names_the_missing_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx", "avx2"}
    note = bf16_note(cpu_flags(info))
    assert note.startswith("bf16: this CPU has neither AVX512-BF16 nor AMX-BF16")
    assert bf16_note({"avx2", "avx512_bf16"}) is None
    assert bf16_note({"amx_bf16"}) is None


def test_reused_relu_of_a_resnet_block_becomes_one_partition_per_call():
    # torchvision's Bottleneck calls one self.relu three times; the int8 quantizer's conv + add + ReLU
    # pattern needs each call to be a partition with one output (it raised on ResNet-50-C4 before).
    from torch.export import Dim, export
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions
    from torchvision.models.resnet import Bottleneck

    from detect.fast_inference import split_reused_activations

    block = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), Bottleneck(64, 16)).eval()
    graph = export(block, (torch.randn(1, 3, 24, 32),),
                   dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)).module()
    before = get_source_partitions(graph.graph, [torch.nn.ReLU])[torch.nn.ReLU]
    assert [len(p.output_nodes) for p in before] == [3]
    assert split_reused_activations(graph) == 3
    after = get_source_partitions(graph.graph, [torch.nn.ReLU])[torch.nn.ReLU]
    assert [len(p.output_nodes) for p in after] == [1, 1, 1]
    assert len({p.output_nodes[0] for p in after}) == 3
    assert split_reused_activations(graph) == 0          # already one name per call
    x = torch.randn(1, 3, 40, 24)
    torch.testing.assert_close(graph(x), block(x))         # the graph itself is untouched


def test_int8_quantizes_a_resnet_block_with_a_reused_relu():
    pytest.importorskip("torchao")
    from torchvision.models.resnet import Bottleneck

    from detect.fast_inference import quantize_int8

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), Bottleneck(64, 16)).eval()
    examples = [torch.randn(1, 3, 24 + 8 * i, 32) for i in range(4)]
    quantized = quantize_int8(block, examples)
    with torch.no_grad():
        want, got = block(examples[1]), quantized(examples[1])
    assert got.shape == want.shape
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()
