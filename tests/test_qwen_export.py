"""python -m export.vision / export.all on the ``qwen-tiny`` preset (Qwen-VL's ViT, DSVL's qwen-clip).

ONNX Runtime against the eager PyTorch reference (``F.interpolate`` position tables and the
resampler's ``nn.MultiheadAttention``: none of the graph-friendly code the export traces), at two
resolutions and with 1 and 3 images, so a size frozen by the tracer shows up; then the runtime's
greedy generation against the PyTorch reference, token for token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export.vision as ev
from dsvl.generate import generate
from dsvl.loading import WeightSource, load_model, load_vision
from export.common import ort_session
from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions

PROJS = ("baseline", "vit")
SIZES = (56, 84)  # the preset's 4x4 patch grid, and 6x6
LANG_DIM = 128
FP32_REL_TOL = 1e-4


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def pixels(images: int, size: int) -> np.ndarray:
    return np.random.default_rng(100 * images + size).standard_normal((images, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def get(vis_proj: str, precision: str = "fp32") -> Path:
        if (vis_proj, precision) not in cache:
            out = tmp_path_factory.mktemp(f"qwen-{vis_proj}-{precision}")
            assert ev.main(["--preset", "qwen-tiny", "--vis-proj", vis_proj, "--precision", precision,
                            "--dynamic-resolution", "--out", str(out)]) == 0
            cache[(vis_proj, precision)] = out
        return cache[(vis_proj, precision)]

    return get


@pytest.fixture(scope="module")
def reference() -> Callable[[str], torch.nn.Module]:
    cache: dict[str, torch.nn.Module] = {}

    def get(vis_proj: str) -> torch.nn.Module:
        if vis_proj not in cache:
            cache[vis_proj] = load_vision(WeightSource(preset="qwen-tiny", vis_proj=vis_proj))[0].eval()
        return cache[vis_proj]

    return get


def session(path: Path, precision: str = "fp32") -> ort.InferenceSession:
    if precision == "fp16":
        return ort_session(path, precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("vis_proj", PROJS)
def test_fp32_parity_two_resolutions_two_image_counts(vis_proj, vision_export, reference):
    out = vision_export(vis_proj)
    sess = session(out / "vision.onnx")
    for size in SIZES:
        for images in (1, 3):
            x = pixels(images, size)
            got = sess.run(None, {"pixel_values": x})[0]
            with torch.no_grad():
                want = reference(vis_proj)(torch.from_numpy(x)).numpy()
            assert got.shape == want.shape == (images, 256, LANG_DIM)
            err = rel_err(got, want)
            print(f"qwen {vis_proj} {images}x{size}px: rel err {err:.2e}")
            assert err <= FP32_REL_TOL


@pytest.mark.parametrize("vis_proj", PROJS)
def test_graph_and_manifest(vis_proj, vision_export):
    out = vision_export(vis_proj)
    model = onnx.load(str(out / "vision.onnx"))
    (inp,), (outp,) = model.graph.input, model.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert in_dims[1] == 3 and all(isinstance(d, str) for d in (in_dims[0], in_dims[2], in_dims[3]))
    assert out_dims[1:] == [256, LANG_DIM]  # the resampler's 256 queries at any resolution
    assert not [n for n in model.graph.node if n.op_type in ("Resize", "Einsum")]
    # a non-square grid fails as in DSVL (int(sqrt(tokens)) squared positions), never silently
    with pytest.raises(Exception, match="(?i)broadcast"):
        session(out / "vision.onnx").run(None, {"pixel_values": pixels(1, 56)[..., :42]})
    vision = json.loads((out / "manifest.json").read_text())["vision"]
    assert vision["vision_encoder"] == "qwen" and vision["vis_proj"] == vis_proj
    assert vision["image_tokens"] == 256 and vision["vis_dim"] == 256
    assert vision["image_size"] == 56 and vision["patch_size"] == 14
    names = [r["name"] for r in vision["parity"]["results"]]
    assert names == ["1 image(s) @ 56x56", "3 image(s) @ 56x56", "1 image(s) @ 84x84",
                     "3 image(s) @ 84x84"]
    assert all(r["max_rel_err"] <= FP32_REL_TOL for r in vision["parity"]["results"])


@pytest.mark.parametrize("vis_proj", PROJS)
def test_fp16_export(vis_proj, vision_export, reference):
    out = vision_export(vis_proj, "fp16")
    vision = json.loads((out / "manifest.json").read_text())["vision"]
    assert vision["precision"] == "fp16" and len(vision["parity"]["results"]) == 4
    sess = session(out / "vision.onnx", "fp16")
    for size in SIZES:
        x = pixels(3, size)
        got = sess.run(None, {"pixel_values": x.astype(np.float16)})[0]
        with torch.no_grad():
            want = reference(vis_proj)(torch.from_numpy(x)).numpy()
        assert got.dtype == np.float16 and np.isfinite(got).all()
        err = rel_err(got, want)
        print(f"qwen fp16 {vis_proj} 3x{size}px: rel err {err:.2e}")
        assert err <= 1e-2  # measured ~1e-3


# ------------------------------------------------------------------ runtime, token-exact
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """PNGs of other sizes and aspect ratios: the runtime resizes and crops them to 56 px."""
    root = tmp_path_factory.mktemp("qwen-images")
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(60, 90), (100, 70)]):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("vis_proj", PROJS)
def test_runtime_generation_is_token_exact(vis_proj, exported, images):
    """export.all + the torch-free runtime (ONNX Runtime) against dsvl.generate, 1 and 2 images."""
    out = exported("--preset", "qwen-tiny", "--vis-proj", vis_proj)
    pipe = Pipeline.from_artifacts(out, threads=2)
    assert pipe.artifacts.vision.image_tokens == 256
    model, tokenizer, _ = load_model(WeightSource(preset="qwen-tiny", vis_proj=vis_proj))
    question = "Describe the image in detail."
    for used in (images[:1], images):
        result = pipe.generate(used, question, SamplingOptions(max_new_tokens=24))
        ids = tokenizer(format_round(question, len(used))).input_ids
        assert result.prompt_ids == ids
        pixels = torch.from_numpy(pipe.artifacts.preprocessor(used))
        assert pixels.shape[-2:] == (56, 56)
        ref = generate(model, torch.tensor(ids), pixels,
                       SamplingOptions(max_new_tokens=24), eos_token_id=tokenizer.eos_token_id)
        print(f"qwen {vis_proj} {len(used)} image(s): {len(ref.tokens)} tokens")
        assert len(ref.tokens) >= 8
        assert result.tokens == ref.tokens, f"ORT {result.tokens}\nPyTorch {ref.tokens}"
