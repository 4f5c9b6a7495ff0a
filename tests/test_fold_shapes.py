"""export.fold_shapes: what a graph computes from its input's shape alone becomes constants
where it is the same at every batch size; what depends on the batch stays computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.fold_shapes import fold_batch_independent


def toy(path: Path) -> None:
    """y = x * (width of x) reshaped to [batch, 8]: the width is fixed, the batch is not."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "width_f"], ["scaled"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "eight"], ["target"], axis=0),
        helper.make_node("Reshape", ["scaled", "target"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("two", 2), ("zero", 0), ("axes", [0]), ("eight", [8]))]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["images", 2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["images", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_fixed_width_folds_and_the_batch_stays(tmp_path):
    path = tmp_path / "toy.onnx"
    toy(path)
    xs = [np.random.default_rng(b).standard_normal((b, 2, 4)).astype(np.float32) for b in (1, 5)]
    want = [run(path, x) for x in xs]
    assert fold_batch_independent(path, "x") == (8, 6)  # the width's Gather and Cast are gone
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops == ["Shape", "Mul", "Gather", "Unsqueeze", "Concat", "Reshape"]
    for x, expected in zip(xs, want, strict=True):
        np.testing.assert_array_equal(run(path, x), expected)


def test_an_export_folds_its_vision_graph(exported, tmp_path):
    """A fixed-resolution export has already been folded: nothing shape-only is left to fold."""
    import shutil

    copy = tmp_path / "vision.onnx"
    shutil.copy(exported("--vis-proj", "perceiver") / "vision.onnx", copy)
    before, after = fold_batch_independent(copy, "pixel_values")
    assert before == after
