"""runtime/half.py: ONNX Runtime's Cast gives numpy's astype values, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import half


def test_the_embedded_models_are_onnx_helpers_cast_graphs():
    from onnx import TensorProto, helper

    for model, src, dst, name in ((half.TO_HALF_MODEL, TensorProto.FLOAT, TensorProto.FLOAT16, "to_half"),
                                  (half.TO_FLOAT_MODEL, TensorProto.FLOAT16, TensorProto.FLOAT, "to_float")):
        graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=dst)], name,
                                  [helper.make_tensor_value_info("x", src, None)],
                                  [helper.make_tensor_value_info("y", dst, None)])
        built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7,
                                  producer_name="dsvl-edge")
        assert built.SerializeToString() == model


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit patterns, any NaN equal to any NaN (payloads aside)."""
    nan = np.isnan(a)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and \
        np.array_equal(a[~nan].view(f"u{a.itemsize}"), b[~nan].view(f"u{b.itemsize}"))


def test_every_half_value_widens_as_numpy_does():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    every = np.tile(every, 2)  # above MIN_ELEMENTS: through ONNX Runtime
    assert every.size >= half.MIN_ELEMENTS
    assert same_bits(half.convert(every, np.float32), every.astype(np.float32))


def test_floats_narrow_as_numpy_does():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([65504, 65519.99, 65520, 1e-8, 2.98e-8, 2.9802322e-8, 5.96e-8, 6.1e-5,
                      1.00048828125, 1.000732421875, -0.0, np.inf, -np.inf, np.nan], np.float32)
    values = np.concatenate([bits.view(np.float32), edges,  # every exponent, and the rounding edges
                             rng.standard_normal(2**16).astype(np.float32),
                             (rng.standard_normal(2**16) * 1e-6).astype(np.float32)])  # subnormal halves
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    got = half.convert(values.reshape(-1, 2), np.float16)
    assert got.shape == (values.size // 2, 2) and same_bits(got.ravel(), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_small_arrays_and_same_types_take_numpy(dtype):
    small = np.ones((3, 4), np.float32)
    assert half.convert(small, np.float16).dtype == np.float16
    same = np.ones((200, 200), dtype)
    assert half.convert(same, dtype) is same
    assert half.convert(np.arange(20000, dtype=np.int64), np.float32).dtype == np.float32


def test_bench_casts_reports_every_case_with_the_same_bits(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts import bench_casts

    assert bench_casts.main(["--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert len(report["cases"]) == len(bench_casts.CASES) and all(r["same_bits"] for r in report["cases"])
    assert "| logits row, 32000 (float16 to float32) |" in capsys.readouterr().out
