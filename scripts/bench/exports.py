"""The artefacts a bench measures: export.all (perceiver), vision-only exports of the other
projectors and quantized copies, all written to a temporary directory with their export times."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from dsvl.config import VIS_PROJS
from dsvl.loading import WeightSource, load_vision
from export import all as export_all
from export import quantize as q
from export import vision as export_vision
from export.common import DEFAULT_OPSET, Progress
from runtime import contract as c
from scripts.bench.settings import QUANTIZED, Settings


def make_exports(settings: Settings, work: Path) -> dict:
    """export.all (perceiver) + vision-only exports of the other projectors + quantized copies."""
    out: dict = {"dirs": {}, "vision_files": {}, "vision_sections": {}, "torch_vision": {}, "export_s": {}}
    art = work / "artifacts"
    start = time.perf_counter()
    if export_all.main(["--preset", settings.preset, "--kv-cache", settings.kv_cache,
                        "--out", str(art)]) != 0:
        raise SystemExit("export.all failed its parity check")
    out["export_s"]["export.all (perceiver)"] = time.perf_counter() - start
    out["dirs"]["fp32"] = art
    out["vision_files"]["perceiver"] = art / c.VISION_FILE
    for vis_proj in VIS_PROJS:
        if vis_proj == "perceiver":
            continue
        start = time.perf_counter()
        module, loaded = load_vision(WeightSource(preset=settings.preset, vis_proj=vis_proj))
        stage = work / f"vision-{vis_proj}"
        stage.mkdir()
        result = export_vision.export_vision(module, loaded, stage, "fp32", DEFAULT_OPSET, False, 0,
                                             Progress(total=2))
        if not result.ok:
            raise SystemExit(f"export.vision ({vis_proj}) failed its parity check")
        out["export_s"][f"export.vision ({vis_proj})"] = time.perf_counter() - start
        out["vision_files"][vis_proj] = stage / c.VISION_FILE
        out["vision_sections"][vis_proj] = result.manifest_section
        out["torch_vision"][vis_proj] = module.eval()
    for name, (bits, level) in QUANTIZED.items():
        start = time.perf_counter()
        target = work / f"artifacts-{name}"
        q.quantize_artifacts(art, target, bits, q.DEFAULT_BLOCK_SIZE, level, False, 0, Progress(total=2))
        out["export_s"][f"export.quantize ({name})"] = time.perf_counter() - start
        out["dirs"][name] = target
    return out


def decoder_weight_bytes(path: Path) -> int:
    """Bytes of the weights one decode step reads: every MatMul's constant weight (the linear
    layers and the LM head) in the file's dtype, or MatMulNBits' packed weights + scales."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            total += sum(sizes.get(name, 0) for name in node.input)
        elif node.op_type == q.METHOD:
            total += sum(sizes.get(name, 0) for name in node.input[1:])
    return total


def sizes_mb(exports: dict) -> dict:
    sizes = {f"vision.onnx ({p})": path.stat().st_size / 1e6 for p, path in exports["vision_files"].items()}
    for name, root in exports["dirs"].items():
        sizes[f"decoder.onnx ({name})"] = sum(f.stat().st_size for f in root.glob(c.DECODER_FILE + "*")) / 1e6
    fp32 = exports["dirs"]["fp32"]
    sizes["embedding tables (2 x .npy)"] = sum((fp32 / n).stat().st_size
                                                for n in (c.PROMPT_EMBED_FILE, c.DECODER_EMBED_FILE)) / 1e6
    return sizes
