"""The built decoder graphs (export/decoder_graph.py) against the PyTorch tracer's export.

The tracer is the oracle: it exports dsvl/decoder.py op for op. A built ``standard`` graph must
have the traced graph's inputs, outputs and weight bytes and give the same logits; every built
variant (fused ops, shared or concat cache, MMCA) must give the traced logits within fp32
rounding over a prompt pass and decode steps. MMCA over the in-place cache has no traced form:
it is checked against dsvl/decoder.py directly, over each kind of DSVL's uniform rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsvl.loading import WeightSource, load_model
from export import decoder as dec
from export.cache_feed import CacheFeed
from export.onnx_stream import quantize_nbits
from runtime import contract as c

FP32_ROUNDING = 2e-5  # relative to the logits' scale; different kernels, same math


def _model(preset: str, mmca: bool):
    model, _, _ = load_model(WeightSource(preset=preset, enable_mmca_attention=mmca))
    return model.lang_decoder


def _build(decoder, out: Path, graph: str, kv_cache: str, weights: str = "float") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if graph == "traced":
        dec.trace_decoder(decoder, out, "fp32", 17, kv_cache == "shared")
    else:
        state = decoder.state_dict()
        spec = dec.graph_spec(decoder.config, decoder.mmca, "fp32", graph, kv_cache, weights)
        dec.write_decoder_graph(out, spec, lambda name: state[name].float().numpy())
    return out / c.DECODER_FILE


def _passes(decoder, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeds, mask) of a prompt with text and image positions, then 4 one-token steps."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 9, decoder.config.hidden_size, generator=gen)
    mask = torch.tensor([[1, 1, 2, 2, 2, 1, 1, 1, 1]])
    out = [(embeds.numpy(), mask.numpy())]
    for step in range(4):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        token = decoder.model.embed_tokens.weight[10 + step][None, None].detach()
        out.append((token.numpy(), mask.numpy()))
    return out


def _run(path: Path, decoder, passes, shared: bool) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    length = passes[-1][1].shape[1] if shared else 0
    run = CacheFeed(session, decoder.num_kv_heads, decoder.head_dim, length)
    return [run(embeds, mask) for embeds, mask in passes]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _io(path: Path) -> list[tuple]:
    model = onnx.load(str(path), load_external_data=False)
    def dims(value):
        return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
    return [(v.name, v.type.tensor_type.elem_type, dims(v))
            for v in list(model.graph.input) + list(model.graph.output)]


def _weight_digests(path: Path) -> set[str]:
    """sha256 of every weight-sized initializer (> 1 KiB). A set: the tracer stores identical
    tensors (the all-ones norm weights of a random preset) once."""
    model = onnx.load(str(path))
    arrays = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays if a.nbytes > 1024}


@pytest.fixture(scope="module")
def small():
    return _model("small", mmca=False)


def test_standard_graph_has_the_traced_graphs_io_weights_and_logits(small, tmp_path):
    traced = _build(small, tmp_path / "traced", "traced", "concat")
    built = _build(small, tmp_path / "built", "standard", "concat")
    assert _io(built) == _io(traced)
    assert _weight_digests(built) == _weight_digests(traced)
    passes = _passes(small)
    want, got = _run(traced, small, passes, False), _run(built, small, passes, False)
    for w, g in zip(want, got, strict=True):
        assert _rel(g, w) < FP32_ROUNDING
    # the built graph holds only metadata: every weight sits in decoder.onnx.data
    assert built.stat().st_size < 200_000


def test_fused_shared_graph_gives_the_traced_logits(small, tmp_path):
    traced = _build(small, tmp_path / "traced", "traced", "shared")
    built = _build(small, tmp_path / "built", "fused", "shared")
    assert _io(built)[:3] == _io(traced)[:3]  # inputs_embeds, attention_mask, position_ids
    passes = _passes(small)
    want, got = _run(traced, small, passes, True), _run(built, small, passes, True)
    for w, g in zip(want, got, strict=True):
        assert _rel(g, w) < FP32_ROUNDING
    model = onnx.load(str(built), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert sum(node.op_type == "MatMul" for node in model.graph.node) == 4 * small.num_layers + 1  # qkv, o, gate_up, down; lm_head


@pytest.mark.parametrize("mmca", [False, True], ids=["plain", "mmca"])
@pytest.mark.parametrize("graph", ["fused", "standard"])
def test_concat_graphs_give_the_traced_logits(graph, mmca, tmp_path):
    decoder = _model("tiny", mmca)
    traced = _build(decoder, tmp_path / "traced", "traced", "concat")
    built = _build(decoder, tmp_path / "built", graph, "concat")
    passes = _passes(decoder)
    want, got = _run(traced, decoder, passes, False), _run(built, decoder, passes, False)
    for w, g in zip(want, got, strict=True):
        assert _rel(g, w) < FP32_ROUNDING


# MMCA rounds (each round's mask values, then 3 decode steps): the uniform rows DSVL's two
# softmaxes make, whose average GroupQueryAttention (causal) only partly computes.
MMCA_ROUNDS = {
    # text before the first image: the image softmax's text rows average over later image keys
    "text-then-image": [[1, 1, 2, 2, 2, 1, 1, 1, 1]],
    # an image query with no text before it: the text softmax's image rows average likewise
    "image-first": [[2, 2, 2, 1, 1]],
    # no image key at all: every image-softmax row is uniform, over keys up to the query
    "text-only": [[1] * 7],
    # multi-round chat: a second prompt pass with past > 0 that adds an image
    "second-round-image": [[1, 1, 2, 2, 1], [1, 1, 2, 2, 2, 1]],
    "text-round-then-image": [[1, 1, 1], [1, 2, 2, 1, 1]],
}


@pytest.fixture(scope="module")
def tiny_mmca():
    return _model("tiny", mmca=True)


@pytest.fixture(scope="module")
def mmca_shared(tiny_mmca, tmp_path_factory) -> Path:
    return _build(tiny_mmca, tmp_path_factory.mktemp("mmca-shared"), "fused", "shared")


@pytest.mark.parametrize("rounds", MMCA_ROUNDS.values(), ids=MMCA_ROUNDS.keys())
def test_mmca_shared_graph_gives_pytorchs_logits(tiny_mmca, mmca_shared, rounds):
    """MMCA over the in-place cache (one GroupQueryAttention, query heads duplicated) against
    dsvl/decoder.py, every pass of a conversation: prompt passes and the decode steps after."""
    from dsvl.generate import position_ids_for

    decoder, gen = tiny_mmca, torch.Generator().manual_seed(0)
    session = ort.InferenceSession(str(mmca_shared), providers=["CPUExecutionProvider"])
    run = CacheFeed(session, decoder.num_kv_heads, decoder.head_dim, sum(map(len, rounds)) + 3 * len(rounds))
    past, mask = decoder.empty_cache(), torch.zeros(1, 0, dtype=torch.long)
    for values in rounds:
        for new in [torch.tensor([values])] + [torch.tensor([[c.MASK_TEXT]])] * 3:
            mask = torch.cat([mask, new], 1)
            embeds = torch.randn(1, new.shape[1], decoder.config.hidden_size, generator=gen)
            with torch.no_grad():
                want, past = decoder(embeds, mask, position_ids_for(mask)[:, -new.shape[1]:], past)
            got = run(embeds.numpy(), mask.numpy())
            assert _rel(got, want.numpy()) < FP32_ROUNDING, f"{new.shape[1]} new of {mask.shape[1]}"


def test_mmca_shared_graph_is_one_group_query_attention_per_layer(tiny_mmca, mmca_shared):
    """Twice the query heads on the model's kv heads, each copy's mask as its bias; no Softmax."""
    model = onnx.load(str(mmca_shared), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == tiny_mmca.num_layers
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 2 * tiny_mmca.config.num_attention_heads
        assert attrs["kv_num_heads"] == tiny_mmca.num_kv_heads
        assert len(node.input) == 11 and node.input[10]  # attention_bias


def test_logits_to_keep_returns_the_last_rows(tmp_path):
    decoder = _model("tiny", False)
    path = _build(decoder, tmp_path, "fused", "concat")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds, mask = _passes(decoder)[0]
    feeds = {c.INPUTS_EMBEDS: embeds, c.ATTENTION_MASK: mask,
             c.POSITION_IDS: np.arange(mask.shape[1])[None]}
    empty = np.zeros((1, decoder.num_kv_heads, 0, decoder.head_dim), np.float32)
    feeds |= {name: empty for name in c.decoder_input_names(decoder.num_layers)[3:]}
    every = session.run([c.LOGITS], feeds | {c.LOGITS_TO_KEEP: np.array(0, np.int64)})[0]
    last = session.run([c.LOGITS], feeds | {c.LOGITS_TO_KEEP: np.array(1, np.int64)})[0]
    assert every.shape[1] == mask.shape[1] and last.shape[1] == 1
    np.testing.assert_array_equal(last[0, 0], every[0, -1])


def test_streamed_nbits_is_export_quantizes_layout_and_packs_per_column():
    """quantize_nbits gives MatMulNBitsQuantizer's bytes, and a packed [K, N1+N2] weight is the
    two weights' quantizations stacked (blocks run along K within one output column)."""
    from onnx import TensorProto
    from onnx import helper as oh

    from export.quantize import quantize_model

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 48), np.float32), rng.standard_normal((64, 16), np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
                          [onnx.numpy_helper.from_array(a, "w")])
    model, count = quantize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), 4, 32, 4)
    assert count == 1
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, scales = quantize_nbits(a, 4, 32)
    np.testing.assert_array_equal(packed, tensors["w_Q4"])
    np.testing.assert_array_equal(scales, tensors["w_scales"])
    both_packed, both_scales = quantize_nbits(np.concatenate([a, b], 1), 4, 32)
    b_packed, b_scales = quantize_nbits(b, 4, 32)
    np.testing.assert_array_equal(both_packed, np.concatenate([packed, b_packed]))
    np.testing.assert_array_equal(both_scales, np.concatenate([scales, b_scales]))


def test_graph_choices_that_cannot_work_are_one_line_errors():
    dec.check_graph_choice("fused", "shared", "float", mmca=True)  # GQA over duplicated heads
    with pytest.raises(dec.ExportError, match="--decoder-graph fused"):
        dec.check_graph_choice("traced", "shared", "float", mmca=True)
    for mmca in (False, True):
        with pytest.raises(dec.ExportError, match="--decoder-graph fused"):
            dec.check_graph_choice("standard", "shared", "float", mmca=mmca)
    with pytest.raises(dec.ExportError, match="MatMulNBits"):
        dec.check_graph_choice("traced", "concat", "int4", mmca=False)
    assert dec.resolve_kv_cache("auto", "fused", mmca=False) == "shared"
    assert dec.resolve_kv_cache("auto", "fused", mmca=True) == "shared"
    assert dec.resolve_kv_cache("auto", "standard", mmca=True) == "concat"
    assert dec.resolve_kv_cache("auto", "traced", mmca=False) == "concat"


def test_streamed_export_checks_layer_by_layer_and_quantizes_while_streaming(tmp_path):
    """The bounded-memory path end to end on the tiny preset: int4 weights written as they are
    quantized, the one-layer-at-a-time check, a depth override; the runtime then answers."""
    import json

    from export import all as export_all
    from runtime.pipeline import Pipeline
    from runtime.sampling import SamplingOptions

    out = tmp_path / "int4"
    assert export_all.main(["--preset", "tiny", "--preset-layers", "3", "--weights", "int4",
                            "--parity-check", "layers", "--out", str(out)]) == 0
    decoder = json.loads((out / c.MANIFEST_NAME).read_text())["decoder"]
    assert decoder["num_layers"] == 3 and decoder["graph"] == "fused"
    assert decoder["quantization"]["bits"] == 4 and decoder["parity"]["check"] == "layers"
    assert [r["name"].rsplit(", ", 1)[1] for r in decoder["parity"]["results"]] == \
        ["layer 0"] * 5 + ["layer 2"] * 5
    model = onnx.load(str(out / c.DECODER_FILE), load_external_data=False)
    assert sum(node.op_type == "MatMulNBits" for node in model.graph.node) == 4 * 3 + 1
    assert sum(node.op_type == "GatherBlockQuantized" for node in model.graph.node) == 1  # head rescored
    assert decoder["quantization"]["lm_head_rescore_top_k"] == 16
    assert not (out / ".parity-layers.onnx").exists()
    result = Pipeline.from_artifacts(out).generate([], "Hello", SamplingOptions(max_new_tokens=4))
    assert len(result.tokens) == 4


def test_group_query_attention_is_export_only_and_undone():
    """export/gqa.py swaps the attention only inside its block; MMCA is refused (the traced
    graph has no MMCA form over the in-place cache: the built fused graph has)."""
    from export.gqa import group_query_attention

    decoder = _model("tiny", mmca=False)
    attention = decoder.model.layers[0].self_attn
    with group_query_attention(decoder):
        assert "forward" in vars(attention) and "attention_inputs" in vars(decoder)
    assert "forward" not in vars(attention) and "attention_inputs" not in vars(decoder)
    with pytest.raises(ValueError, match="--kv-cache concat"), group_query_attention(_model("tiny", mmca=True)):
        pass
