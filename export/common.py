"""Export machinery: ONNX export and saving (external data for large models), artefact file
entries, parity comparison and ONNX Runtime sessions. torch loads only inside the functions
that trace. CLI plumbing lives in export/cli.py (re-exported here); fp16 islands in
export/fp16.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from export.cli import (  # noqa: F401  (re-exported)
    DEFAULT_OPSET,
    USER_ERRORS,
    ExportError,
    Progress,
    add_output_flags,
    add_weight_flags,
    check_writable,
    publish,
    run_cli,
    staged,
    weight_source,
)
from export.torch_onnx import EXTERNAL_DATA_THRESHOLD
from runtime import contract as c
from runtime.manifest import Comparison


def versions(opset: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    from export import __version__

    return {"dsvl_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset}


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """One file, or one file plus one external data file when the weights are large."""
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + c.EXTERNAL_DATA_SUFFIX, size_threshold=1024)


def compare(name: str, got: np.ndarray, want: np.ndarray) -> dict:
    """Max absolute error, and that error relative to the reference's scale (max |want|): a
    ``Comparison`` record as the manifest keeps it."""
    got32, want32 = got.astype(np.float32), want.astype(np.float32)
    abs_err = float(np.max(np.abs(got32 - want32))) if got32.size else 0.0
    scale = float(np.max(np.abs(want32))) if want32.size else 0.0
    return Comparison(name, list(got.shape), abs_err, abs_err / scale if scale else abs_err, scale,
                      bool(np.isfinite(got32).all())).to_dict()


def print_parity(results: list[dict], tol: float) -> None:
    """One line per compared output: errors, the reference's scale, finiteness, verdict."""
    rows = [Comparison.from_dict(r, "parity") for r in results]
    width = max((len(r.name) for r in rows), default=0) + 2
    for r in rows:
        flag = "ok" if r.within(tol) else "FAIL"
        print(f"      {r.name:<{width}} max|err| {r.max_abs_err:.2e}  rel {r.max_rel_err:.2e} "
              f"(scale {r.ref_max_abs:.2f})  finite={r.finite}  {flag}")


def ort_session(path: Path, precision: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if precision == "fp16":
        # ORT 1.32's extended CPU fusions crash on some fp16 graphs (segfault): basic only.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
