"""python -m export.vision on the tiny preset: ONNX Runtime against the PyTorch reference.

The exports run in-process through ``export.vision.main`` (the CLI's own entry point, so the
staging, publishing and manifest code is exercised), once per configuration for the session.
The reference is ``DSVLVision`` in eager mode, built independently by ``load_vision`` with the
same seed: transformers' own position interpolation, ``F.interpolate`` for the perceiver's key
positions and ``nn.MultiheadAttention`` — none of the graph-friendly code the export traces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.vision as ev
from dsvl.config import CLIP_MEAN, CLIP_STD
from dsvl.loading import WeightSource, load_vision
from dsvl.vision import DSVLVision
from export.common import ort_session

PROJS = ("baseline", "vit", "perceiver")
PATCH = 14
SIZE = 56  # the tiny preset's image size
LANG_DIM = 128
FP32_REL_TOL = 1e-4
ARTEFACTS = {"manifest.json", "preprocessor_config.json", "vision.onnx"}

# measured errors, printed at the end of the session (pytest -s shows them)
MEASURED: dict[str, float] = {}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def expected_tokens(vis_proj: str, height: int, width: int) -> int:
    return 256 if vis_proj == "perceiver" else (height // PATCH) * (width // PATCH) + 1


def pixels(images: int, height: int, width: int, seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed + 7 * images + height + 3 * width)
    return rng.standard_normal((images, 3, height, width)).astype(np.float32)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Callable[..., Path]:
    """``exported(vis_proj, dynamic=True, precision="fp32")`` -> the artefact dir (cached)."""
    cache: dict[tuple, Path] = {}

    def get(vis_proj: str, dynamic: bool = True, precision: str = "fp32") -> Path:
        key = (vis_proj, dynamic, precision)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{vis_proj}-{precision}-{'dyn' if dynamic else 'fixed'}")
            argv = ["--preset", "tiny", "--vis-proj", vis_proj, "--precision", precision,
                    "--out", str(out)] + (["--dynamic-resolution"] if dynamic else [])
            assert ev.main(argv) == 0
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference() -> Callable[[str], DSVLVision]:
    cache: dict[str, DSVLVision] = {}

    def get(vis_proj: str) -> DSVLVision:
        if vis_proj not in cache:
            model, _ = load_vision(WeightSource(preset="tiny", vis_proj=vis_proj))
            cache[vis_proj] = model.eval()
        return cache[vis_proj]

    return get


@pytest.fixture(scope="session")
def sessions() -> Callable[[Path, str], ort.InferenceSession]:
    cache: dict[Path, ort.InferenceSession] = {}

    def get(out: Path, precision: str = "fp32") -> ort.InferenceSession:
        if out not in cache:
            path = out / "vision.onnx"
            if precision == "fp32":  # as a runtime would open it: default optimisations
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1  # idle pools must not spin against the exports
                cache[out] = ort.InferenceSession(str(path), options,
                                                  providers=["CPUExecutionProvider"])
            else:  # the exporter's own options (ORT's extended fp16 fusions are unsafe)
                cache[out] = ort_session(path, precision)
        return cache[out]

    return get


@pytest.fixture(scope="session", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nmeasured max|ORT - PyTorch| / max|PyTorch|:")
        for name, err in sorted(MEASURED.items()):
            print(f"  {name:<40} {err:.3e}")


def run_reference(model: DSVLVision, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_clean(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert names == ARTEFACTS, f"unexpected files in {out}: {sorted(names - ARTEFACTS)}"
    assert not list(out.glob(".partial-*"))


# ------------------------------------------------------------------ fp32, dynamic
SIZES = [(56, 56), (84, 84), (56, 84)]
# the perceiver's key grid is int(sqrt(tokens)) squared, as in DSVL: square inputs only
PARITY_CASES = [(p, h, w) for p in PROJS for h, w in SIZES if p != "perceiver" or h == w]


@pytest.mark.parametrize("images", [1, 3])
@pytest.mark.parametrize(("vis_proj", "height", "width"), PARITY_CASES,
                         ids=[f"{p}-{h}x{w}" for p, h, w in PARITY_CASES])
def test_dynamic_fp32_parity(vis_proj, height, width, images, exported, reference, sessions):
    out = exported(vis_proj)
    x = pixels(images, height, width)
    got = sessions(out).run(None, {"pixel_values": x})[0]
    want = run_reference(reference(vis_proj), x)
    tokens = expected_tokens(vis_proj, height, width)
    assert want.shape == (images, tokens, LANG_DIM)
    assert got.shape == want.shape
    assert got.dtype == np.float32
    err = rel_err(got, want)
    MEASURED[f"fp32 {vis_proj} {images}x{height}x{width}"] = err
    assert err <= FP32_REL_TOL


@pytest.mark.parametrize("vis_proj", PROJS)
def test_dynamic_graph_io(vis_proj, exported):
    model = onnx.load(str(exported(vis_proj) / "vision.onnx"), load_external_data=False)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "pixel_values" and outp.name == "image_embeds"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert in_dims[1] == 3 and all(isinstance(d, str) for d in (in_dims[0], in_dims[2], in_dims[3]))
    assert out_dims[0] == in_dims[0] and out_dims[2] == LANG_DIM
    # no cubic Resize: the position tables are resized with plain MatMuls
    assert not [n for n in model.graph.node if n.op_type == "Resize"]


@pytest.mark.parametrize("vis_proj", PROJS)
def test_manifest_and_files(vis_proj, exported):
    out = exported(vis_proj)
    assert_clean(out)
    manifest = manifest_of(out)
    assert manifest["format"] == "dsvl-edge"
    vision = manifest["vision"]
    assert vision["vis_proj"] == vis_proj
    assert vision["image_tokens"] == expected_tokens(vis_proj, SIZE, SIZE)
    assert vision["image_size"] == SIZE and vision["patch_size"] == PATCH
    assert vision["lang_dim"] == LANG_DIM and vision["vis_dim"] == 64
    assert vision["dynamic_resolution"] is True
    assert vision["precision"] == "fp32" and vision["io_dtype"] == "float32"
    assert vision["random_weights"] is True
    file = vision["file"]
    assert file["path"] == "vision.onnx"
    data = (out / "vision.onnx").read_bytes()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()
    assert file["bytes"] == len(data)
    assert "external_data" not in file  # tiny model: one file
    assert (out / vision["preprocessor"]).is_file()
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(CLIP_MEAN) and pre["image_std"] == pytest.approx(CLIP_STD)
    assert pre["crop_size"] == {"height": SIZE, "width": SIZE}
    # the exporter's own check covered both resolutions and both batch sizes, within tolerance
    parity = vision["parity"]
    assert parity["tolerance_rel"] == FP32_REL_TOL
    names = [r["name"] for r in parity["results"]]
    assert names == ["1 image(s) @ 56x56", "3 image(s) @ 56x56", "1 image(s) @ 84x84",
                     "3 image(s) @ 84x84"]
    assert all(r["finite"] and r["max_rel_err"] <= FP32_REL_TOL for r in parity["results"])
    assert set(manifest["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "opset"}


# ------------------------------------------------------------------ fixed resolution
def test_fixed_resolution_rejects_other_sizes(exported, reference, sessions):
    vis_proj = "perceiver"  # ORT checks the input dims: the projector does not matter
    out = exported(vis_proj, dynamic=False)
    assert_clean(out)
    assert manifest_of(out)["vision"]["dynamic_resolution"] is False
    session = sessions(out)
    assert session.get_inputs()[0].shape[1:] == [3, SIZE, SIZE]
    # the image count stays dynamic
    x = pixels(3, SIZE, SIZE)
    got = session.run(None, {"pixel_values": x})[0]
    assert got.shape == (3, expected_tokens(vis_proj, SIZE, SIZE), LANG_DIM)
    assert rel_err(got, run_reference(reference(vis_proj), x)) <= FP32_REL_TOL
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):
        session.run(None, {"pixel_values": pixels(1, 84, 84)})


# ------------------------------------------------------------------ fp16
# perceiver: attention + fp32 softmax/LayerNorm islands; vit: the eps=1e-12 LayerNorm over a
# dynamic token count (baseline's Linear + LayerNorm is vit's tail, so it is covered too)
@pytest.mark.parametrize("vis_proj", ["perceiver", "vit"])
def test_fp16_export(vis_proj, exported, reference, sessions):
    out = exported(vis_proj, precision="fp16")
    assert_clean(out)
    vision = manifest_of(out)["vision"]
    assert vision["precision"] == "fp16" and vision["io_dtype"] == "float16"
    parity = vision["parity"]
    assert len(parity["results"]) == 4
    for r in parity["results"]:
        assert r["finite"] is True
        assert 0 <= r["max_rel_err"] <= parity["tolerance_rel"]
        MEASURED[f"fp16 {vis_proj} manifest {r['name']}"] = r["max_rel_err"]
    session = sessions(out, "fp16")
    assert session.get_inputs()[0].type == "tensor(float16)"
    for height in (56, 84):
        x = pixels(3, height, height)
        got = session.run(None, {"pixel_values": x.astype(np.float16)})[0]
        want = run_reference(reference(vis_proj), x)
        assert got.dtype == np.float16 and got.shape == want.shape
        assert np.isfinite(got).all()
        err = rel_err(got, want)
        MEASURED[f"fp16 {vis_proj} 3x{height}x{height}"] = err
        assert err <= parity["tolerance_rel"]


# ------------------------------------------------------------------ failure leaves nothing
def test_parity_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "FP32_REL_TOL", -1.0)  # any error at all is "beyond tolerance"
    out = tmp_path / "out"
    assert ev.main(["--vis-proj", "baseline", "--out", str(out)]) == 1
    assert "nothing was written" in capsys.readouterr().out
    assert list(out.iterdir()) == []  # no vision.onnx, manifest.json or .partial-* dir
