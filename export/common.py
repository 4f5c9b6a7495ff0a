"""Shared export machinery: CLI plumbing, timed progress steps, staged atomic writes, ONNX
saving (external data for large models), fp16 islands and the parity report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dsvl.config import PRESETS, ConfigError
from dsvl.loading import LoadError, WeightSource
from runtime.contract import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArtifactError,
    fingerprint_file,
    sha256_file,
)
from runtime.prompt import PromptError

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a model at 2 GiB; go external well before
DEFAULT_OPSET = 18  # LayerNormalization is one op (TensorRT's normalization layer)


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the problem and the fix."""


USER_ERRORS = (ExportError, LoadError, ConfigError, ArtifactError, PromptError)


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights (none given: the preset's seeded random weights)")
    group.add_argument("--preset", default="tiny", choices=sorted(PRESETS), metavar="NAME",
                       help=f"shapes to use when no weight paths are given: {', '.join(PRESETS)} (default: tiny)")
    group.add_argument("--vision-model-name-or-path", type=Path, metavar="DIR",
                       help="Hugging Face CLIP directory (config, weights, preprocessor_config.json)")
    group.add_argument("--lm-model-name-or-path", type=Path, metavar="DIR",
                       help="LLaMA directory with its tokenizer")
    group.add_argument("--checkpoint-path", type=Path, metavar="PATH",
                       help="DSVL checkpoint: a directory with pytorch_model.bin, or the file; "
                            "overrides the two directories' weights, loaded non-strictly as in DSVL")
    group.add_argument("--vis-proj", choices=("baseline", "vit", "perceiver"),
                       help="projector type (default: inferred from --checkpoint-path, else perceiver)")
    group.add_argument("--enable-mmca-attention", action="store_true",
                       help="the decoder uses DSVL's multi-modal causal attention")
    group.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")


def add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR",
                        help=f"artefact directory (default: {default_out})")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="ONNX weight/activation type; fp16 keeps norms, softmax and masks in "
                             "fp32 (default fp32)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; 17 or newer)")


def weight_source(args: argparse.Namespace) -> WeightSource:
    return WeightSource(preset=args.preset, vision_model=args.vision_model_name_or_path,
                        lm_model=args.lm_model_name_or_path, checkpoint=args.checkpoint_path,
                        vis_proj=args.vis_proj, enable_mmca_attention=args.enable_mmca_attention,
                        seed=args.seed)


def run_cli(main: Callable[[], int]) -> None:
    """Run an entry point: user errors become one line on stderr and exit code 2."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        code = main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        code = 130
    sys.exit(code)


class Progress:
    """Numbered, timed steps: ``[2/5] exporting ONNX ... 3.1 s``."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {what} ...", flush=True)
        start = time.perf_counter()
        yield
        print(f"      done in {time.perf_counter() - start:.1f} s", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as err:
        raise ExportError(f"--out {out} is not writable ({err.strerror}); choose another directory") from None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A private staging directory inside ``out``; files move into ``out`` only via ``publish``.
    On any failure the staging directory is removed, so nothing half-written remains."""
    check_writable(out)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, names: list[str]) -> None:
    """Move staged files into place with atomic renames (same filesystem)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        target = out / name
        source = stage / name
        if source.is_dir():
            if target.exists():
                shutil.rmtree(target)
        else:
            os.chmod(source, 0o666 & ~umask)  # some writers create 0600 files
        os.replace(source, target)


def update_manifest(out: Path, sections: dict) -> dict:
    """Merge ``sections`` into out/manifest.json, written last and atomically."""
    path = out / MANIFEST_NAME
    manifest = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        manifest = {}
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, **sections})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return manifest


def versions(opset: int) -> dict:
    import onnxruntime
    import transformers

    from export import __version__

    return {"dsvl_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset}


def file_entry(stage: Path, name: str) -> dict:
    def describe(path: Path) -> dict:
        return {"path": path.name, "sha256": sha256_file(path), "fingerprint": fingerprint_file(path),
                "bytes": path.stat().st_size}

    entry = describe(stage / name)
    data = stage / (name + ".data")
    if data.exists():
        entry["external_data"] = describe(data)
    return entry


def export_onnx(module: nn.Module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict, opset: int,
                fixed_output_dims: dict[str, dict[int, int]] | None = None) -> None:
    """TorchScript-based export (dynamo=False keeps traced shapes dynamic; see NOTES), then
    re-save with one external data file when the weights are large. ``fixed_output_dims``
    states output sizes the tracer could not infer (the perceiver's 256 tokens)."""
    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: 17 or newer is needed (LayerNormalization)")
    raw = path.with_suffix(".raw")
    raw.mkdir()
    with torch.no_grad():
        torch.onnx.export(module, args, str(raw / path.name), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(raw / path.name))  # pulls in any per-tensor external files
    for output in model.graph.output:
        for axis, size in (fixed_output_dims or {}).get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_value = size
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    shutil.rmtree(raw)


def fp32_islands(module: nn.Module) -> nn.Module:
    """For fp16 export: every LayerNorm computes in fp32 (DSVL's eps=1e-12 underflows in fp16
    and its variance can overflow), casting back to fp16 after."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, Fp32LayerNorm(child))
        else:
            fp32_islands(child)
    return module


class Fp32LayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False) if norm.bias is not None else None

    def _apply(self, fn, recurse=True):  # keep fp32 through .half()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


def compare(name: str, got: np.ndarray, want: np.ndarray) -> dict:
    """Max absolute error, and that error relative to the reference's scale (max |want|)."""
    got32, want32 = got.astype(np.float32), want.astype(np.float32)
    abs_err = float(np.max(np.abs(got32 - want32))) if got32.size else 0.0
    scale = float(np.max(np.abs(want32))) if want32.size else 0.0
    return {"name": name, "shape": list(got.shape), "max_abs_err": abs_err,
            "max_rel_err": abs_err / scale if scale else abs_err, "ref_max_abs": scale,
            "finite": bool(np.isfinite(got32).all())}


def print_parity(results: list[dict], tol: float) -> None:
    """One line per compared output: errors, the reference's scale, finiteness, verdict."""
    width = max((len(r["name"]) for r in results), default=0) + 2
    for r in results:
        flag = "ok" if r["finite"] and r["max_rel_err"] <= tol else "FAIL"
        print(f"      {r['name']:<{width}} max|err| {r['max_abs_err']:.2e}  rel {r['max_rel_err']:.2e} "
              f"(scale {r['ref_max_abs']:.2f})  finite={r['finite']}  {flag}")


def ort_session(path: Path, precision: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if precision == "fp16":
        # ORT 1.32's extended CPU fusions crash on some fp16 graphs (segfault): basic only.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
