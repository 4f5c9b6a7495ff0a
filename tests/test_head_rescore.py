"""export/head_rescore.py: a 4-bit LM head whose best logits are recomputed from 8-bit rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh

import export.all as export_all
import export.quantize as q
from export.head_rescore import APPROX_HEAD_BLOCK, rescore_weights
from runtime.contract import DECODER_FILE, LOGITS
from runtime.manifest import read_manifest

HIDDEN, VOCAB, BLOCK, POSITIONS = 256, 500, 32, 40


def head_model(weight_kn: np.ndarray) -> onnx.ModelProto:
    """hidden [1, S, K] -> MatMul -> Identity -> logits, like the decoder's tail."""
    nodes = [oh.make_node("MatMul", ["hidden", "lm_head.weight"], ["/lm_head/out"], name="/lm_head/MatMul"),
             oh.make_node("Identity", ["/lm_head/out"], [LOGITS])]
    graph = oh.make_graph(nodes, "head", [oh.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", HIDDEN])],
                          [oh.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, "S", VOCAB])],
                          [onnx.numpy_helper.from_array(weight_kn, "lm_head.weight")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)  # as the exports


def run(model: onnx.ModelProto, hidden: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([LOGITS], {"hidden": hidden})[0][0]


def dequantized_rows(weight: np.ndarray) -> np.ndarray:
    """The rescoring's 8-bit rows [V, K] as floats: (q - 128) * block scale."""
    rows, scales = rescore_weights(weight, BLOCK)
    return ((rows.astype(np.float32) - 128).reshape(VOCAB, -1, BLOCK) * scales[..., None]).reshape(VOCAB, HIDDEN)


@pytest.fixture(scope="module")
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32) * 0.1
    hidden = rng.standard_normal((1, POSITIONS, HIDDEN)).astype(np.float32)
    return weight, hidden


def test_rescored_logits_are_the_8bit_rows_times_the_hidden_state(weights):
    weight, hidden = weights
    # the head's own 4-bit pass has 128-wide blocks (it only picks candidates and gives the tail)
    plain, _ = q.quantize_model(head_model(weight), 4, APPROX_HEAD_BLOCK, 4)
    rescored, _ = q.quantize_model(head_model(weight), 4, BLOCK, 4, rescore_top_k=5)
    assert [n.op_type for n in rescored.graph.node if n.op_type in ("TopK", "GatherBlockQuantized")] == \
        ["TopK", "GatherBlockQuantized"]
    approx, got = run(plain, hidden), run(rescored, hidden)
    dequant = dequantized_rows(weight)
    top = np.argsort(-approx, axis=-1, kind="stable")[:, :5]
    for position in range(POSITIONS):
        chosen = top[position]
        np.testing.assert_allclose(got[position, chosen], dequant[chosen] @ hidden[0, position], rtol=1e-5, atol=1e-5)
        others = np.setdiff1d(np.arange(VOCAB), chosen)
        np.testing.assert_array_equal(got[position, others], approx[position, others])  # the 4-bit logits


def test_rescoring_gives_the_8bit_heads_top1(weights):
    weight, hidden = weights
    dequant = dequantized_rows(weight)
    want_float, want_8bit = (hidden[0] @ weight).argmax(-1), (hidden[0] @ dequant.T).argmax(-1)
    plain, _ = q.quantize_model(head_model(weight), 4, BLOCK, 4)
    rescored, _ = q.quantize_model(head_model(weight), 4, BLOCK, 4, rescore_top_k=8)
    plain_top1, rescored_top1 = run(plain, hidden).argmax(-1), run(rescored, hidden).argmax(-1)
    np.testing.assert_array_equal(rescored_top1, want_8bit)
    assert (rescored_top1 == want_float).sum() >= POSITIONS - 2 > (plain_top1 == want_float).sum()


def test_only_a_4bit_head_is_rescored(weights):
    weight, _ = weights
    for kwargs in (dict(rescore_top_k=0), dict(lm_head_bits=8, rescore_top_k=8)):
        model, _ = q.quantize_model(head_model(weight), 4, BLOCK, 4, **kwargs)
        assert "TopK" not in {n.op_type for n in model.graph.node}, kwargs


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rescore") / "artifacts"
    assert export_all.main(["--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_export_quantize_rescores_by_default_and_records_it(tiny_export: Path, tmp_path: Path):
    for flags, top_k in (([], 16), (["--lm-head-rescore", "0"], None)):
        out = tmp_path / f"int4-{top_k}"
        assert q.main(["--artifacts", str(tiny_export), "--bits", "4", "--out", str(out), *flags]) == 0
        ops = {n.op_type for n in onnx.load(str(out / DECODER_FILE)).graph.node}
        assert ("GatherBlockQuantized" in ops) == (top_k is not None)
        assert read_manifest(out).decoder.quantization.lm_head_rescore_top_k == top_k


def test_negative_rescore_count_is_a_one_line_error(tiny_export: Path, tmp_path: Path):
    with pytest.raises(q.ExportError, match="--lm-head-rescore -1"):
        q.main(["--artifacts", str(tiny_export), "--out", str(tmp_path / "x"), "--lm-head-rescore", "-1"])
