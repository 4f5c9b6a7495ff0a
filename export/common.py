"""Export machinery: ONNX export and saving (external data for large models), artefact file
entries, parity comparison and ONNX Runtime sessions. torch loads only inside the functions
that trace. CLI plumbing lives in export/cli.py (re-exported here); fp16 islands in
export/fp16.py."""

from __future__ import annotations

import shutil
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
from runtime import contract as c
from runtime.manifest import Comparison

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a model at 2 GiB; go external well before


def versions(opset: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    from export import __version__

    return {"dsvl_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset}


def export_onnx(module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """TorchScript-based export (dynamo=False keeps traced shapes dynamic; see NOTES), then
    re-save with one external data file when the weights are large. Output dims the exporter's
    shape inference left unknown but ``dynamic_axes`` does not declare dynamic (the
    resamplers' 256 tokens, a fixed resolution's patch count, the logits' vocabulary behind
    GroupQueryAttention) are fixed to what the traced module returns: the trace baked them."""
    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: 17 or newer is needed (LayerNormalization)")
    import torch

    raw = path.with_suffix(".raw")
    raw.mkdir()
    with torch.no_grad():
        torch.onnx.export(module, args, str(raw / path.name), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
        traced = module(*args)
    model = onnx.load(str(raw / path.name))  # pulls in any per-tensor external files
    traced = traced if isinstance(traced, (tuple, list)) else (traced,)
    for output, tensor in zip(model.graph.output, traced, strict=True):
        dynamic = dynamic_axes.get(output.name, {})
        for axis, dim in enumerate(output.type.tensor_type.shape.dim):
            if axis not in dynamic and not dim.HasField("dim_value"):
                dim.dim_value = int(tensor.shape[axis])
    save_onnx(model, path)
    shutil.rmtree(raw)


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
