"""python -m export.vision: vision encoder (CLIP or Qwen-VL's ViT) + projector -> vision.onnx,
checked on the spot.

Writes vision.onnx (+ vision.onnx.data when large), preprocessor_config.json and the "vision"
section of manifest.json into --out, then runs ONNX Runtime (CPU) on seeded inputs and compares
with PyTorch; above tolerance it exits non-zero.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsvl.presets import PERCEIVER_GRID
from export.cli import (
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
from runtime import graphs as g
from runtime.contract import PREPROCESSOR_NAME, VISION_FILE, VISION_INPUT
from runtime.manifest import Comparison, FileEntry, Manifest, Parity, VisionSection

if TYPE_CHECKING:  # torch, transformers and onnx load only when an export runs (fast --help)
    from dsvl.loading import Loaded
    from dsvl.vision import DSVLVision

# fp32: max |ORT - PyTorch| relative to the output's scale (max |PyTorch|).
FP32_REL_TOL = 1e-4
# fp16 is checked for NaN/Inf and reported; this only catches a broken graph.
FP16_REL_TOL = 5e-2


@dataclass
class VisionExport:
    manifest_section: VisionSection
    parity: list[dict]
    ok: bool


def parity_sizes(loaded: Loaded, dynamic: bool) -> list[tuple[int, int]]:
    """Resolutions to check: the model's own and, for a dynamic export, a second one."""
    size, patch = loaded.config.image_size, loaded.config.patch_size
    if not dynamic:
        return [(size, size)]
    return [(size, size), (size + 2 * patch, size + 2 * patch)]


def fixed_tokens(vis_proj: str, vision_encoder: str = "clip") -> int | None:
    """Tokens per image whatever the resolution: the perceiver's and Qwen's resampler's 256."""
    return PERCEIVER_GRID**2 if vis_proj == "perceiver" or vision_encoder == "qwen" else None


def image_tokens(vis_proj: str, height: int, width: int, patch: int, vision_encoder: str = "clip") -> int:
    fixed = fixed_tokens(vis_proj, vision_encoder)
    return fixed if fixed is not None else (height // patch) * (width // patch) + 1


def export_vision(model: DSVLVision, loaded: Loaded, stage: Path, precision: str, opset: int,
                  dynamic: bool, seed: int, progress: Progress) -> VisionExport:
    """Export ``model`` into ``stage`` and check it; the caller publishes the files."""
    import torch

    from dsvl.vision import DSVLVision
    from export.fold_shapes import fold_batch_independent
    from export.torch_onnx import export_onnx

    size, encoder = loaded.config.image_size, loaded.config.vision_encoder
    dtype = torch.float16 if precision == "fp16" else torch.float32
    with progress.step(f"exporting vision.onnx ({precision}, opset {opset}, "
                       f"{'dynamic' if dynamic else 'fixed'} resolution)"):
        graph = DSVLVision(model.vis_encoder, model.projection, model.vis_proj)
        if precision == "fp16":
            graph = _fp16_copy(graph)
        example = torch.randn(2, 3, size, size, dtype=dtype)
        spec = g.vision_graph(dynamic, fixed_tokens(model.vis_proj, encoder) is not None)
        with graph_friendly(graph):
            export_onnx(graph, (example,), stage / VISION_FILE, spec.input_names, spec.output_names,
                        spec.torch_dynamic_axes(), opset)
        del graph, example  # an fp16 copy of a 2B-parameter tower is 4 GB: free it before the check
        if not dynamic:  # the position tables' resize and the shape arithmetic, as constants
            before, after = fold_batch_independent(stage / VISION_FILE, c.VISION_INPUT)
            print(f"      {before - after} of {before} nodes computed from the input's shape alone: folded")
    with progress.step("checking ONNX Runtime (CPU) against PyTorch"):
        parity = check_vision(model, stage / VISION_FILE, parity_sizes(loaded, dynamic), precision, seed)
    tol = FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL
    ok = all(Comparison.from_dict(r, "parity").within(tol) for r in parity)
    (stage / PREPROCESSOR_NAME).write_text(json.dumps(loaded.preprocessor, indent=2, sort_keys=True))
    section = VisionSection(
        file=FileEntry.describe(stage, VISION_FILE),
        preprocessor=PREPROCESSOR_NAME,
        preprocessor_file=FileEntry.describe(stage, PREPROCESSOR_NAME),
        vis_proj=loaded.config.vis_proj,
        vision_encoder=encoder,
        image_size=size,
        patch_size=loaded.config.patch_size,
        dynamic_resolution=dynamic,
        image_tokens=image_tokens(loaded.config.vis_proj, size, size, loaded.config.patch_size, encoder),
        vis_dim=loaded.config.vis_dim,
        lang_dim=loaded.config.lang_dim,
        precision=precision,
        io_dtype=c.io_dtype(precision),
        weights=loaded.notes[0].removeprefix("weights: "),
        random_weights=loaded.config.preset is not None,
        parity=Parity(tol, parity),
    )
    section.validate("vision")
    return VisionExport(section, parity, ok)


@contextmanager
def graph_friendly(graph: DSVLVision) -> Iterator[None]:
    """Export-only, in the style of Optimum's ``ModelPatcher``: every resize (position
    interpolation, the perceiver's grid) as dynamic matrix products while tracing, the
    reference's own forms again afterwards, whatever the export raised."""
    graph.set_graph_friendly(True)
    try:
        yield
    finally:
        graph.set_graph_friendly(False)


def _fp16_copy(graph: DSVLVision) -> DSVLVision:
    """An fp16 copy whose weights are converted while copying: a deepcopy of the fp32 model first
    would hold a second fp32 model (8 GB more for a 2B-parameter tower). LayerNorm parameters stay
    fp32 and shared (the fp32 islands read them; nothing writes them)."""
    import copy

    from torch import nn

    from export.fp16 import fp32_islands

    norms = {id(p) for m in graph.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(False)}
    memo = {id(p): p if id(p) in norms or not p.is_floating_point()
            else nn.Parameter(p.detach().half(), requires_grad=False) for p in graph.parameters()}
    half = copy.deepcopy(graph, memo)
    fp32_islands(half)
    return half.half()


def check_vision(model: DSVLVision, path: Path, sizes: list[tuple[int, int]], precision: str,
                 seed: int) -> list[dict]:
    """ORT vs the fp32 PyTorch reference (transformers' own position interpolation) on 1 and 3
    seeded images at each size."""
    import torch

    from export.common import compare, ort_session

    session = ort_session(path, precision)
    np_dtype = c.numpy_dtype(c.io_dtype(precision))
    rng = np.random.default_rng(seed)
    results = []
    for height, width in sizes:
        for images in (1, 3):
            pixels = rng.standard_normal((images, 3, height, width)).astype(np.float32)
            with torch.no_grad():
                want = model(torch.from_numpy(pixels)).numpy()
            got = session.run(None, {VISION_INPUT: pixels.astype(np_dtype)})[0]
            if got.shape != want.shape:
                raise ExportError(f"vision.onnx gave shape {got.shape} at {height}x{width}, PyTorch "
                                  f"{want.shape}: the graph baked a size in")
            results.append(compare(f"{images} image(s) @ {height}x{width}", got, want))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.vision",
        description="Export DSVL's vision encoder (CLIP or Qwen-VL's ViT) + projector to ONNX and check it against "
                    "PyTorch with ONNX Runtime. With no weight paths, uses --preset's seeded random weights.")
    add_weight_flags(parser)
    add_output_flags(parser, "artifacts")
    parser.add_argument("--dynamic-resolution", action="store_true",
                        help="height and width become dynamic axes (position embeddings are "
                             "interpolated in the graph); default: the config's image size")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_writable(args.out)  # fail before minutes of loading, not after
    progress = Progress(total=3)
    src = weight_source(args)
    with progress.step("loading weights"):
        from dsvl.loading import load_vision

        model, loaded = load_vision(src)
        for note in loaded.notes:
            print(f"      {note}")
    with staged(args.out) as stage:
        result = export_vision(model, loaded, stage, args.precision, args.opset,
                               args.dynamic_resolution, args.seed, progress)
        tol = result.manifest_section.parity.tolerance_rel
        from export.common import print_parity, versions

        print_parity(result.parity, tol)
        if not result.ok:
            print(f"error: ONNX Runtime differs from PyTorch beyond tolerance (rel {tol:g}); "
                  "nothing was written", flush=True)
            return 1
        publish(stage, args.out, [PREPROCESSOR_NAME] + [e.path for e in result.manifest_section.file.with_data()],
                Manifest(vision=result.manifest_section, versions=versions(args.opset)))
    size = sum(f.stat().st_size for f in args.out.glob(VISION_FILE + "*"))
    print(f"wrote {args.out / VISION_FILE} ({size / 1e6:.1f} MB) in {progress.elapsed():.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
