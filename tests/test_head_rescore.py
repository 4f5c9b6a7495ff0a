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
from runtime.contract import DECODER_FILE, LOGITS, NEXT_TOKEN
from runtime.manifest import read_manifest

HIDDEN, VOCAB, BLOCK, POSITIONS = 256, 500, 32, 40


def head_model(weight_kn: np.ndarray, identity: bool = False) -> onnx.ModelProto:
    """hidden [1, S, K] -> MatMul -> logits, like the decoder's tail (``identity``: through an
    Identity, as exports made before the head wrote ``logits`` itself)."""
    nodes = [oh.make_node("MatMul", ["hidden", "lm_head.weight"], ["/lm_head/out" if identity else LOGITS],
                          name="/lm_head/MatMul")]
    if identity:
        nodes.append(oh.make_node("Identity", ["/lm_head/out"], [LOGITS]))
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


@pytest.mark.parametrize("identity", [False, True], ids=["head-writes-logits", "through-identity"])
def test_rescored_logits_are_the_8bit_rows_times_the_hidden_state(weights, identity):
    weight, hidden = weights
    # the head's own 4-bit pass has 128-wide blocks (it only picks candidates and gives the tail)
    plain, _ = q.quantize_model(head_model(weight, identity), 4, APPROX_HEAD_BLOCK, 4)
    rescored, _ = q.quantize_model(head_model(weight, identity), 4, BLOCK, 4, rescore_top_k=5)
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
        nodes = onnx.load(str(out / DECODER_FILE)).graph.node
        ops = {n.op_type for n in nodes}
        assert ("GatherBlockQuantized" in ops) == (top_k is not None)
        assert read_manifest(out).decoder.quantization.lm_head_rescore_top_k == top_k
        # the greedy pick: from the rescoring's candidates, else the ArgMax of the fp32 export
        pick, = [n for n in nodes if NEXT_TOKEN in n.output]
        assert pick.op_type == ("ReduceMin" if top_k else "ArgMax") and ("ArgMax" in ops) == (top_k is None)


def test_negative_rescore_count_is_a_one_line_error(tiny_export: Path, tmp_path: Path):
    with pytest.raises(q.ExportError, match="--lm-head-rescore -1"):
        q.main(["--artifacts", str(tiny_export), "--out", str(tmp_path / "x"), "--lm-head-rescore", "-1"])
    vocab = read_manifest(tiny_export).decoder.vocab_size
    with pytest.raises(q.ExportError, match=f"rescore fewer candidates than the vocabulary's {vocab} tokens"):
        q.main(["--artifacts", str(tiny_export), "--out", str(tmp_path / "x"), "--lm-head-rescore", str(vocab)])


def greedy_model(weight_kn: np.ndarray, top_k: int) -> onnx.ModelProto:
    """The rescoring nodes alone, the 4-bit logits as an input: approx, hidden -> logits, next_token."""
    from export.head_rescore import RescoreNames, rescore_nodes

    rows, scales = rescore_weights(weight_kn, BLOCK)
    names = RescoreNames(hidden="hidden", approx="approx", logits=LOGITS, rows="rows", scales="scales",
                         greedy=NEXT_TOKEN)
    nodes, consts = rescore_nodes(names, top_k, BLOCK)
    k, v = weight_kn.shape
    graph = oh.make_graph(nodes, "rescore", [oh.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", k]),
                                             oh.make_tensor_value_info("approx", TensorProto.FLOAT, [1, "S", v])],
                          [oh.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, "S", v]),
                           oh.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, [1, "S"])],
                          [onnx.numpy_helper.from_array(rows, "rows"), onnx.numpy_helper.from_array(scales, "scales"),
                           *consts])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)],
                         ir_version=8)


def test_the_graphs_greedy_pick_is_the_rescored_argmax_ties_included():
    """next_token equals numpy's argmax of the rescored logits (the first index of the
    maximum) without scanning them: ties between a rescored logit and the best 4-bit one on
    either side, between 4-bit ones at the candidates' edge, and between rescored ones."""
    rng = np.random.default_rng(1)
    top_k, vocab = 4, 64
    weight = rng.standard_normal((BLOCK, vocab)).astype(np.float32) * 0.1
    weight[:, 20] = weight[:, 10]  # tokens 10 and 20 rescore to the same logit
    hidden = rng.standard_normal((1, 5, BLOCK)).astype(np.float32)
    hidden[0, 4] = 10 * weight[:, 10]  # tokens 10 and 20 rescore highest at position 4
    approx = rng.uniform(-1, 0, (1, 5, vocab)).astype(np.float32)
    candidates = [[40, 41, 42, 43], [40, 41, 42, 43], [40, 41, 42, 43], [40, 41, 42, 43], [10, 20, 41, 42]]
    for position, ids in enumerate(candidates):
        approx[0, position, ids] = 50 + np.arange(top_k)
    session = ort.InferenceSession(greedy_model(weight, top_k).SerializeToString(), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"hidden": hidden, "approx": approx})
    exact = logits[0]  # the rescored candidates' logits: they depend on hidden only
    best = [exact[p, ids].max() for p, ids in enumerate(candidates)]
    approx[0, 1, 3] = best[1]  # a 4-bit logit level with the best rescored one, at a lower id
    approx[0, 2, 60] = best[2]  # ... at a higher id
    approx[0, 3, [7, 5]] = best[3] + 1  # two 4-bit logits above every rescored one, tied
    logits, picks = session.run(None, {"hidden": hidden, "approx": approx})
    np.testing.assert_array_equal(picks, logits.argmax(-1))
    rescored_best = candidates[2][int(np.argmax(exact[2, candidates[2]]))]
    assert exact[4, 10] == exact[4, 20] > exact[4, [41, 42]].max()
    assert picks[0, 1:].tolist() == [3, rescored_best, 5, 10]
