"""export/engine.py and runtime/backends/trt.py: what can be checked without TensorRT runs here.

Tests that need a GPU are marked ``gpu`` and skip with the reason (no CUDA GPU, no TensorRT,
no cuda-python, no fp16 export to build from).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export import engine as eng
from runtime import contract
from runtime.backends.errors import BackendUnavailable, EngineMismatch, check_engine_metadata

REPO = Path(__file__).resolve().parents[1]


def fake_manifest(max_positions: int = 4096, dynamic: bool = False) -> dict:
    return {
        "format": contract.FORMAT, "format_version": contract.FORMAT_VERSION, "precision": "fp16",
        "vision": {"image_size": 224, "patch_size": 14, "dynamic_resolution": dynamic,
                   "image_tokens": 256, "lang_dim": 512, "vis_proj": "perceiver"},
        "decoder": {"num_layers": 8, "num_heads": 8, "num_kv_heads": 8, "head_dim": 64,
                    "hidden_size": 512, "vocab_size": 32003,
                    "max_position_embeddings": max_positions},
        "tokenizer": {"dir": "tokenizer"},
    }


def write_artifacts(root: Path, manifest: dict | None = None, onnx: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / contract.MANIFEST_NAME).write_text(json.dumps(manifest or fake_manifest()))
    if onnx:
        (root / contract.VISION_FILE).write_bytes(b"not really onnx")
        (root / contract.DECODER_FILE).write_bytes(b"not really onnx")
    return root


def run_cli(args: list[str], tmp_path: Path, block_tensorrt: bool = True
            ) -> subprocess.CompletedProcess:
    """python -m export.engine in a subprocess; optionally with `import tensorrt` failing."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if block_tensorrt:  # a shadowing package makes the test hold where TensorRT is installed
        stub = tmp_path / "no_tensorrt" / "tensorrt"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text("raise ImportError('No module named tensorrt')\n")
        paths.insert(0, str(stub.parent))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "export.engine", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- profile flags --------------------------------------------------------------------------


def test_parse_range_accepts_triples_and_single_values():
    assert eng.parse_range("1,4,8", "--images") == eng.Range(1, 4, 8)
    assert eng.parse_range(" 2 , 2 , 3 ", "--images") == eng.Range(2, 2, 3)
    assert eng.parse_range("5", "--images") == eng.Range(5, 5, 5)


@pytest.mark.parametrize("text, message", [
    ("1,2", "expects MIN,OPT,MAX"),
    ("1,2,3,4", "expects MIN,OPT,MAX"),
    ("a,b,c", "integers"),
    ("0,1,2", "MIN must be >= 1"),
    ("8,1,1", "MIN <= OPT <= MAX"),
    ("1,9,8", "MIN <= OPT <= MAX"),
])
def test_parse_range_rejects_bad_ranges(text, message):
    with pytest.raises(eng.EngineBuildError, match=message) as info:
        eng.parse_range(text, "--prompt-len")
    assert "--prompt-len" in str(info.value)


def test_vision_profile_defaults_to_the_manifest_size():
    profile = eng.vision_profile(fake_manifest()["vision"])
    assert profile.axes == {"images": eng.Range(1, 1, 8), "height": eng.Range(224, 224, 224),
                            "width": eng.Range(224, 224, 224)}


def test_vision_resolution_only_for_dynamic_exports():
    with pytest.raises(eng.EngineBuildError, match="fixed 224 px"):
        eng.vision_profile(fake_manifest()["vision"], resolution=eng.Range(112, 224, 448))
    dynamic = fake_manifest(dynamic=True)["vision"]
    profile = eng.vision_profile(dynamic, resolution=eng.Range(112, 224, 448))
    assert profile.axes["height"] == eng.Range(112, 224, 448)
    with pytest.raises(eng.EngineBuildError, match="multiple of the patch size 14"):
        eng.vision_profile(dynamic, resolution=eng.Range(100, 224, 448))


def test_default_decoder_profiles_from_manifest():
    prefill, decode = eng.decoder_profiles(fake_manifest())
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.axes["seq"] == eng.Range(1, 256 + 64, 4096)
    assert prefill.axes["past"] == eng.Range(0, 0, 4095)
    assert prefill.axes["total"].max == 4096
    assert decode.axes["seq"] == eng.Range(1, 1, 1)
    assert decode.axes["past"] == eng.Range(0, 2048, 4095)
    assert decode.axes["total"] == eng.Range(1, 2049, 4096)


def test_default_max_context_is_capped_by_positions():
    assert eng.default_max_context({"max_position_embeddings": 2048}) == 2048
    assert eng.default_max_context({"max_position_embeddings": 32768}) == 4096
    (single,) = eng.decoder_profiles(fake_manifest(2048), single=True)
    assert single.axes["seq"] == eng.Range(1, 1, 2048) and single.axes["past"].max == 2047


def test_decoder_profile_validation():
    with pytest.raises(eng.EngineBuildError, match="max_position_embeddings"):
        eng.decoder_profiles(fake_manifest(2048), max_context=4096)
    with pytest.raises(eng.EngineBuildError, match="exceeds --max-context 1024"):
        eng.decoder_profiles(fake_manifest(), eng.Range(1, 64, 2048), max_context=1024)
    prefill, _ = eng.decoder_profiles(fake_manifest(), eng.Range(1, 64, 512), max_context=1024)
    assert prefill.axes["seq"] == eng.Range(1, 64, 512) and prefill.axes["past"].max == 1023


def test_profile_shapes_fill_dynamic_dims_and_keep_fixed_ones():
    _, decode = eng.decoder_profiles(fake_manifest(), max_context=1024)
    kv = eng.profile_shapes("past_key_values.3.key", [-1, 8, -1, 64], eng.KV_AXES, decode)
    assert kv == ([1, 8, 0, 64], [1, 8, 512, 64], [1, 8, 1023, 64])
    axes = eng.input_axes("decoder", contract.ATTENTION_MASK)
    assert eng.profile_shapes(contract.ATTENTION_MASK, [-1, -1], axes, decode)[2] == [1, 1024]
    vision = eng.vision_profile(fake_manifest()["vision"])
    shapes = eng.profile_shapes("pixel_values", [-1, 3, 224, 224], eng.VISION_AXES["pixel_values"],
                                vision)
    assert shapes == ([1, 3, 224, 224], [1, 3, 224, 224], [8, 3, 224, 224])


def test_profile_shapes_reject_contract_violations():
    vision = eng.vision_profile(fake_manifest(dynamic=True)["vision"],
                                resolution=eng.Range(112, 224, 448))
    with pytest.raises(eng.EngineBuildError, match="fixed to 224"):
        eng.profile_shapes("pixel_values", [-1, 3, 224, 224], eng.VISION_AXES["pixel_values"],
                           vision)
    _, decode = eng.decoder_profiles(fake_manifest())
    with pytest.raises(eng.EngineBuildError, match="should be fixed"):
        eng.profile_shapes("past_key_values.0.key", [-1, -1, -1, 64], eng.KV_AXES, decode)
    with pytest.raises(eng.EngineBuildError, match="unexpected input 'input_ids'"):
        eng.input_axes("decoder", "input_ids")


# --- manifest update ------------------------------------------------------------------------


def test_update_manifest_merges_engines_and_keeps_other_sections(tmp_path):
    write_artifacts(tmp_path)
    eng.update_manifest(tmp_path, {"vision": {"file": "engines/vision.plan"}})
    eng.update_manifest(tmp_path, {"decoder": {"file": "engines/decoder.plan"},
                                   "timing_cache": "engines/timing.cache"})
    manifest = json.loads((tmp_path / contract.MANIFEST_NAME).read_text())
    original = fake_manifest()
    for section in ("vision", "decoder", "tokenizer", "precision", "format"):
        assert manifest[section] == original[section]
    assert set(manifest["engines"]) == {"vision", "decoder", "timing_cache"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [contract.MANIFEST_NAME, contract.VISION_FILE, contract.DECODER_FILE])


def test_update_manifest_is_atomic(tmp_path, monkeypatch):
    write_artifacts(tmp_path)
    before = (tmp_path / contract.MANIFEST_NAME).read_bytes()

    def killed(*_args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(eng.os, "replace", killed)
    with pytest.raises(OSError):
        eng.update_manifest(tmp_path, {"vision": {"file": "engines/vision.plan"}})
    assert (tmp_path / contract.MANIFEST_NAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


# --- CLI ------------------------------------------------------------------------------------


def test_cli_without_tensorrt_is_one_line(tmp_path):
    artifacts = write_artifacts(tmp_path / "art")
    proc = run_cli(["--artifacts", str(artifacts)], tmp_path)
    assert_one_line_error(proc, "TensorRT is not installed", "pip install tensorrt", "JetPack")
    assert not (artifacts / contract.ENGINES_DIR).exists()


def test_cli_missing_directory_and_onnx(tmp_path):
    proc = run_cli(["--artifacts", str(tmp_path / "nowhere")], tmp_path)
    assert_one_line_error(proc, "not found", "export.all")
    artifacts = write_artifacts(tmp_path / "art", onnx=False)
    proc = run_cli(["--artifacts", str(artifacts)], tmp_path)
    assert_one_line_error(proc, "vision.onnx not found")


def test_cli_bad_flags_are_one_line(tmp_path):
    artifacts = write_artifacts(tmp_path / "art")
    proc = run_cli(["--artifacts", str(artifacts), "--prompt-len", "8,4,2"], tmp_path)
    assert_one_line_error(proc, "--prompt-len", "MIN <= OPT <= MAX")
    proc = run_cli(["--artifacts", str(artifacts), "--max-context", "9000"], tmp_path)
    assert_one_line_error(proc, "--max-context", "4096")


def test_cli_dry_run_prints_profiles_without_tensorrt(tmp_path):
    artifacts = write_artifacts(tmp_path / "art")
    proc = run_cli(["--artifacts", str(artifacts), "--dry-run", "--max-context", "1024",
                    "--images", "1,2,4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plans = json.loads(proc.stdout)
    assert plans["vision"][0]["axes"]["images"] == [1, 2, 4]
    assert [p["name"] for p in plans["decoder"]] == ["prefill", "decode"]
    assert plans["decoder"][1]["axes"]["past"] == [0, 512, 1023]


# --- engine metadata check ------------------------------------------------------------------


def engine_meta(**over) -> dict:
    meta = {"tensorrt_version": "10.3.0", "version_compatible": False,
            "hardware_compatibility": "none",
            "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    meta.update(over)
    return meta


def check(meta: dict, trt_version: str = "10.3.0", gpu: str = "Orin", cc: str = "8.7"):
    return check_engine_metadata(meta, name="decoder", artifacts="/art", tensorrt_version=trt_version,
                                 gpu_name=gpu, compute_capability=cc)


def test_matching_engine_passes():
    assert check(engine_meta()) == []
    assert check(engine_meta(tensorrt_version="10.3.0.26"), trt_version="10.3.0.30") == []


def test_mismatch_names_both_sides_and_the_rebuild_command():
    with pytest.raises(EngineMismatch) as info:
        check(engine_meta(), trt_version="10.7.0", gpu="NVIDIA H100 80GB HBM3", cc="9.0")
    message = str(info.value)
    for needle in ("10.3.0", "10.7.0", "'Orin'", "NVIDIA H100", "8.7", "9.0",
                   "python -m export.engine --artifacts /art"):
        assert needle in message
    assert isinstance(info.value, BackendUnavailable)
    with pytest.raises(EngineMismatch, match="GPU differ"):
        check(engine_meta(), cc="8.6", gpu="NVIDIA A10")


def test_same_capability_other_model_only_warns():
    (warning,) = check(engine_meta(gpu={"name": "NVIDIA A100-SXM4-80GB",
                                        "compute_capability": "8.0"}),
                       gpu="NVIDIA A100-PCIE-40GB", cc="8.0")
    assert "A100-PCIE" in warning and "export.engine" in warning


def test_compatibility_flags_relax_the_check():
    vc = engine_meta(version_compatible=True)
    assert check(vc, trt_version="10.7.0") == []
    with pytest.raises(EngineMismatch, match="TensorRT version"):
        check(vc, trt_version="10.2.0")
    with pytest.raises(EngineMismatch):
        check(vc, trt_version="11.0.0")
    hc = engine_meta(hardware_compatibility="ampere_plus",
                     gpu={"name": "NVIDIA A100", "compute_capability": "8.0"})
    assert check(hc, gpu="NVIDIA H100", cc="9.0") == []
    with pytest.raises(EngineMismatch, match="GPU"):
        check(hc, gpu="Tesla T4", cc="7.5")


def test_engine_older_than_its_onnx_is_refused():
    meta = engine_meta(onnx_sha256="aaa")
    assert check_engine_metadata(meta, name="vision", artifacts="/art", tensorrt_version="10.3.0",
                                 gpu_name="Orin", compute_capability="8.7",
                                 onnx_sha256="aaa") == []
    with pytest.raises(EngineMismatch, match="vision.onnx was re-exported"):
        check_engine_metadata(meta, name="vision", artifacts="/art", tensorrt_version="10.3.0",
                              gpu_name="Orin", compute_capability="8.7", onnx_sha256="bbb")


def test_trt_backend_import_raises_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None makes `import tensorrt` fail
    monkeypatch.delitem(sys.modules, "runtime.backends.trt", raising=False)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        importlib.import_module("runtime.backends.trt")


# --- GPU ------------------------------------------------------------------------------------


def _cuda_runtime():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = pytest.importorskip("cuda.cudart", reason="no cuda-python")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        pytest.skip("no CUDA GPU")
    return cudart


@pytest.mark.gpu
def test_gpu_info_from_the_driver():
    try:
        gpu = eng.gpu_info()
    except eng.EngineBuildError as err:
        pytest.skip(f"no CUDA GPU: {err}")
    major, minor = gpu.compute_capability.split(".")
    assert int(major) >= 5 and minor.isdigit() and gpu.name and gpu.total_memory_bytes > 2**28


@pytest.mark.gpu
def test_kv_cache_truncate_compacts_heads_on_device(monkeypatch):
    """The ping-pong cache and its strided truncate, against numpy; needs no TensorRT."""
    cudart = _cuda_runtime()
    if importlib.util.find_spec("tensorrt") is None:  # KVCache itself uses cuda-python only
        monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.delitem(sys.modules, "runtime.backends.trt", raising=False)
    trt_backend = importlib.import_module("runtime.backends.trt")
    layers, heads, head_dim, max_context, past = 2, 3, 4, 16, 10
    stream = trt_backend._check(cudart.cudaStreamCreate())
    cache = trt_backend.KVCache(layers, heads, head_dim, max_context, itemsize=2)
    try:
        written = {}
        for layer in range(layers):  # what an engine's present output would hold: [H, past, D]
            for which in range(2):
                values = np.random.default_rng(layer * 2 + which).standard_normal(
                    (heads, past, head_dim)).astype(np.float16)
                buffer = cache.buffers[layer][which][1 - cache.current]
                buffer.upload(values, stream)
                written[layer, which] = values
        cache.advance(past)
        assert cache.length == past
        cache.truncate(6, stream)
        for (layer, which), values in written.items():
            out = np.empty((heads, 6, head_dim), np.float16)
            cache.buffers[layer][which][cache.current].download(out, stream)
            trt_backend._check(cudart.cudaStreamSynchronize(stream))
            np.testing.assert_array_equal(out, values[:, :6])
            assert cache.past_ptr(layer, which) == cache.buffers[layer][which][cache.current].ptr
        cache.truncate(0, stream)
        assert cache.length == 0
        with pytest.raises(ValueError):
            cache.truncate(1, stream)
    finally:
        cache.free()
        cudart.cudaStreamDestroy(stream)


def ort_prompt_logits(artifacts: Path, manifest: dict, embeds: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    """Last-position logits of decoder.onnx on ONNX Runtime CPU, types read from the graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts / contract.DECODER_FILE))
    dec = manifest["decoder"]
    feeds = {}
    for arg in session.get_inputs():
        dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32,
                 "tensor(int64)": np.int64}[arg.type]
        if arg.name == contract.INPUTS_EMBEDS:
            feeds[arg.name] = embeds.astype(dtype)
        elif arg.name == contract.ATTENTION_MASK:
            feeds[arg.name] = mask.astype(dtype)
        elif arg.name == contract.POSITION_IDS:
            feeds[arg.name] = np.arange(embeds.shape[1], dtype=dtype)[None]
        else:
            feeds[arg.name] = np.zeros((1, dec["num_kv_heads"], 0, dec["head_dim"]), dtype)
    logits = session.run([contract.LOGITS], feeds)[0]
    return logits[0, -1].astype(np.float32)


@pytest.mark.gpu
def test_trt_runners_match_onnxruntime(tmp_path):
    """End to end on a real fp16 export: engines build, outputs track ORT, truncate is exact.

    Uses DSVL_TRT_ARTIFACTS (an export made with `python -m export.all --precision fp16`) or
    exports the tiny preset itself.
    """
    pytest.importorskip("tensorrt", reason="no TensorRT")
    _cuda_runtime()
    import shutil

    import onnxruntime as ort

    artifacts = tmp_path / "art"
    source = os.environ.get("DSVL_TRT_ARTIFACTS")
    if source:
        shutil.copytree(source, artifacts)
    else:
        subprocess.run([sys.executable, "-m", "export.all", "--preset", "tiny", "--precision",
                        "fp16", "--out", str(artifacts)], cwd=REPO, check=True, timeout=600)
    status = eng.main(["--artifacts", str(artifacts), "--images", "1,1,2",
                       "--prompt-len", "1,16,64", "--max-context", "128"])
    assert status == 0
    from runtime.backends.trt import load

    vision, decoder = load(artifacts)
    manifest = contract.read_manifest(artifacts)
    size = manifest["vision"]["image_size"]
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    session = ort.InferenceSession(str(artifacts / contract.VISION_FILE))
    feed_type = np.float16 if "16" in session.get_inputs()[0].type else np.float32
    expected = session.run(None, {contract.VISION_INPUT: pixels.astype(feed_type)})[0]
    np.testing.assert_allclose(vision.encode(pixels), expected.astype(np.float32), atol=5e-2,
                               rtol=5e-2)

    hidden = manifest["decoder"]["hidden_size"]
    embeds = np.random.default_rng(1).standard_normal((1, 12, hidden)).astype(np.float32) * 0.1
    mask = np.ones((1, 12), np.int64)
    prompt = decoder.forward(embeds[:, :10], mask[:, :10], np.arange(10)[None])
    step = decoder.forward(embeds[:, 10:11], mask[:, :11], np.array([[10]]))
    decoder.truncate(10)
    again = decoder.forward(embeds[:, 10:11], mask[:, :11], np.array([[10]]))
    np.testing.assert_allclose(step, again, atol=1e-3)
    assert prompt.shape == (1, manifest["decoder"]["vocab_size"])
    reference = ort_prompt_logits(artifacts, manifest, embeds[:, :10], mask[:, :10])
    assert prompt.argmax() == reference.argmax()
    np.testing.assert_allclose(prompt[0], reference, atol=5e-2 * np.abs(reference).max())
    vision.close()
    decoder.close()


# --- fakes: TensorRT and CUDA with the calls this package makes, on host memory -------------
# They check the control flow (profiles, timing cache, manifest, ping-pong binding, truncate,
# chunking) on any machine; they cannot check TensorRT itself, which the gpu tests above do.


class _DType:
    def __init__(self, name: str):
        self.name = name


FAKE_TYPES = {"float16": _DType("HALF"), "float32": _DType("FLOAT"), "int64": _DType("INT64")}
NP_OF = {"HALF": np.float16, "FLOAT": np.float32, "INT64": np.int64}


def _host_array(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    import ctypes

    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * max(count, 1)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def fake_cudart() -> types.SimpleNamespace:
    """cudaMalloc hands out host buffers, so every copy is a memmove."""
    import ctypes

    blocks: dict[int, object] = {}
    ok = types.SimpleNamespace(cudaSuccess=0)

    def malloc(n):
        block = ctypes.create_string_buffer(n)
        blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def copy2d(dst, dpitch, src, spitch, width, height, _kind, _stream):
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)

    props = types.SimpleNamespace(name=b"Fake GPU\x00", major=8, minor=7)
    return types.SimpleNamespace(
        cudaError_t=ok, cudaMemcpyKind=types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3),
        cudaGetErrorName=lambda e: (0, b"err"), cudaGetErrorString=lambda e: (0, b"err"),
        cudaGetDeviceCount=lambda: (0, 1), cudaGetDevice=lambda: (0, 0),
        cudaGetDeviceProperties=lambda d: (0, props), cudaMalloc=malloc,
        cudaFree=lambda p: (blocks.pop(p, None), 0)[1:],
        cudaMemcpyAsync=lambda d, s, n, k, st: (ctypes.memmove(d, s, n), 0)[1:],
        cudaMemcpy2DAsync=copy2d, cudaStreamCreate=lambda: (0, 7),
        cudaStreamSynchronize=lambda s: (0,), cudaStreamDestroy=lambda s: (0,), blocks=blocks)


class FakeContext:
    """Runs a toy decoder (or vision encoder) whose outputs depend on every cached position."""

    def __init__(self, spec: dict):
        self.spec, self.shapes, self.addresses, self.profile = spec, {}, {}, 0
        self.profiles_used: list[int] = []

    def set_optimization_profile_async(self, index, _stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.spec["profiles"][self.profile][name]
        self.shapes[name] = tuple(shape)
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        if name == contract.VISION_OUTPUT:
            return (self.shapes[contract.VISION_INPUT][0], 4, self.spec["lang_dim"])
        return self.shapes[name]

    def _read(self, name, dtype):
        return _host_array(self.addresses[name], self.shapes[name], dtype).copy()

    def execute_async_v3(self, _stream):
        self.profiles_used.append(self.profile)
        if self.spec["kind"] == "vision":
            pixels = self._read(contract.VISION_INPUT, np.float16).astype(np.float32)
            out = np.ones((len(pixels), 4, self.spec["lang_dim"]), np.float32)
            out *= pixels.mean(axis=(1, 2, 3))[:, None, None]
            _host_array(self.addresses[contract.VISION_OUTPUT], out.shape, np.float16)[:] = out
            return True
        embeds = self._read(contract.INPUTS_EMBEDS, np.float16)
        seq, heads, dim = embeds.shape[1], self.spec["heads"], self.spec["head_dim"]
        new = embeds[0, :, :heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)[None]
        total = None
        for layer in range(self.spec["layers"]):
            for which, past_name, present_name in (
                    (0, contract.past_key_name(layer), contract.present_key_name(layer)),
                    (1, contract.past_value_name(layer), contract.present_value_name(layer))):
                present = np.concatenate([self._read(past_name, np.float16),
                                          new + np.float16(layer + which)], axis=2)
                _host_array(self.addresses[present_name], present.shape, np.float16)[:] = present
                if layer == 0 and which == 0:
                    total = present
        cumulative = np.cumsum(total.astype(np.float32).sum(axis=(0, 1, 3)))[-seq:]
        logits = cumulative[:, None] * np.arange(1, self.spec["vocab"] + 1) / 100
        _host_array(self.addresses[contract.LOGITS], (1, seq, self.spec["vocab"]),
                    np.float16)[:] = logits[None]
        return True


class FakeEngine:
    def __init__(self, spec: dict):
        self.spec = spec
        self.names = list(spec["io"])
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(spec["profiles"])
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return FAKE_TYPES[self.spec["io"][name]["dtype"]]

    def get_tensor_shape(self, name):
        return self.spec["io"][name]["shape"]

    def get_tensor_profile_shape(self, name, index):
        return self.spec["profiles"][index][name]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self.spec))
        return self.contexts[-1]


def fake_tensorrt(version: str = "10.3.0") -> types.ModuleType:
    """Both halves: the builder (parse JSON 'ONNX', record profiles) and the runtime."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.engines = []
    severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    class ILogger:
        Severity = severity

        def __init__(self, *_):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Network:
        def __init__(self):
            self.inputs, self.outputs = [], []
            self.num_inputs = self.num_outputs = 0

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = json.loads(Path(path).read_text())
            self.network.inputs = [types.SimpleNamespace(name=n, shape=s, dtype=FAKE_TYPES[d])
                                   for n, (s, d) in graph["inputs"].items()]
            self.network.outputs = [types.SimpleNamespace(name=n, shape=None, dtype=FAKE_TYPES[d])
                                    for n, d in graph["outputs"].items()]
            self.network.num_inputs = len(self.network.inputs)
            self.network.num_outputs = len(self.network.outputs)
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self):
            self.profiles, self.flags, self.progress_monitor = [], [], None

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: data + b"+tuned")

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

        def set_flag(self, flag):
            self.flags.append(flag)

    class HostMemory(bytes):
        @property
        def nbytes(self):
            return len(self)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            assert flags == 1 << 5
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            monitor.phase_start("Building engine", None, 2)
            monitor.phase_start("Tactics", "Building engine", 3)
            assert monitor.step_complete("Tactics", 0)
            monitor.phase_finish("Tactics")
            monitor.phase_finish("Building engine")
            trt.engines.append(config)
            return HostMemory(json.dumps({"profiles": config.profiles}).encode())

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            spec = json.loads(bytes(data))
            return FakeEngine(spec) if "io" in spec else None

    trt.ILogger, trt.IProgressMonitor, trt.OnnxParser = ILogger, IProgressMonitor, OnnxParser
    trt.Builder, trt.Runtime = Builder, Runtime
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(VERSION_COMPATIBLE="VC")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WS")
    return trt


def fake_onnx_graphs(artifacts: Path, layers: int = 2, heads: int = 2, head_dim: int = 4,
                     hidden: int = 8, vocab: int = 5) -> None:
    vision = {"inputs": {contract.VISION_INPUT: [[-1, 3, 224, 224], "float16"]},
              "outputs": {contract.VISION_OUTPUT: "float16"}}
    kv = [-1, heads, -1, head_dim]
    inputs = {contract.INPUTS_EMBEDS: [[-1, -1, hidden], "float16"],
              contract.ATTENTION_MASK: [[-1, -1], "int64"],
              contract.POSITION_IDS: [[-1, -1], "int64"]}
    outputs = {contract.LOGITS: "float16"}
    for i in range(layers):
        inputs[contract.past_key_name(i)] = inputs[contract.past_value_name(i)] = [kv, "float16"]
        outputs[contract.present_key_name(i)] = outputs[contract.present_value_name(i)] = "float16"
    (artifacts / contract.VISION_FILE).write_text(json.dumps(vision))
    (artifacts / contract.DECODER_FILE).write_text(json.dumps({"inputs": inputs,
                                                               "outputs": outputs}))


def small_manifest() -> dict:
    manifest = fake_manifest(max_positions=64)
    manifest["decoder"].update(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4,
                               hidden_size=8, vocab_size=5)
    return manifest


def test_build_flow_with_fake_tensorrt(tmp_path, monkeypatch, capsys):
    artifacts = write_artifacts(tmp_path / "art", small_manifest())
    fake_onnx_graphs(artifacts)
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(eng, "gpu_info", lambda: eng.GpuInfo("Fake GPU", "8.7", 8 * 2**30))
    cache = artifacts / contract.ENGINES_DIR / eng.TIMING_CACHE
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    assert eng.main(["--artifacts", str(artifacts), "--max-context", "32",
                     "--prompt-len", "1,8,16", "--version-compatible"]) == 0
    out = capsys.readouterr().out
    for step_name in ("vision: parse", "decoder: build (fp16, 2 profile(s))", "Tactics",
                      "save decoder.plan", "update manifest.json"):
        assert step_name in out
    assert cache.read_bytes() == b"old+tuned+tuned"  # loaded, then saved after each build
    prefill, decode = trt.engines[1].profiles
    assert prefill[contract.INPUTS_EMBEDS] == ([1, 1, 8], [1, 8, 8], [1, 16, 8])
    assert decode["past_key_values.1.value"] == ([1, 2, 0, 4], [1, 2, 16, 4], [1, 2, 31, 4])
    assert trt.engines[0].flags == ["VC"]
    manifest = json.loads((artifacts / contract.MANIFEST_NAME).read_text())
    entry = manifest["engines"]["decoder"]
    assert entry["tensorrt_version"] == "10.3.0" and entry["gpu"]["compute_capability"] == "8.7"
    assert entry["precision"] == "fp16" and entry["version_compatible"] is True
    assert entry["max_context"] == 32 and entry["max_prompt"] == 16
    assert [p["name"] for p in entry["profiles"]] == ["prefill", "decode"]
    assert entry["io_dtypes"][contract.ATTENTION_MASK] == "int64"
    assert (artifacts / entry["file"]).is_file() and manifest["decoder"] == small_manifest()["decoder"]
    assert not [p for p in (artifacts / contract.ENGINES_DIR).iterdir() if p.name.startswith(".")]


def fake_plan(kind: str, manifest: dict, max_context: int = 16) -> dict:
    """What a built engine would report: io types and its profiles, as FakeEngine reads them."""
    if kind == "vision":
        return {"kind": "vision", "lang_dim": 6,
                "io": {contract.VISION_INPUT: {"dtype": "float16", "shape": [-1, 3, 224, 224]},
                       contract.VISION_OUTPUT: {"dtype": "float16", "shape": [-1, 4, 6]}},
                "profiles": [{contract.VISION_INPUT: [[1, 3, 224, 224], [1, 3, 224, 224],
                                                      [2, 3, 224, 224]]}]}
    dec = manifest["decoder"]
    heads, dim, hidden = dec["num_kv_heads"], dec["head_dim"], dec["hidden_size"]
    io = {contract.INPUTS_EMBEDS: {"dtype": "float16", "shape": [1, -1, hidden]},
          contract.ATTENTION_MASK: {"dtype": "int64", "shape": [1, -1]},
          contract.POSITION_IDS: {"dtype": "int64", "shape": [1, -1]},
          contract.LOGITS: {"dtype": "float16", "shape": [1, -1, dec["vocab_size"]]}}
    for i in range(dec["num_layers"]):
        for name in (contract.past_key_name(i), contract.past_value_name(i),
                     contract.present_key_name(i), contract.present_value_name(i)):
            io[name] = {"dtype": "float16", "shape": [1, heads, -1, dim]}
    profiles = []
    for seq, past in (((1, 8), (0, max_context - 1)), ((1, 1), (0, max_context - 1))):
        shapes = {contract.INPUTS_EMBEDS: [[1, seq[0], hidden], [1, seq[0], hidden],
                                           [1, seq[1], hidden]],
                  contract.ATTENTION_MASK: [[1, 1], [1, 1], [1, max_context]],
                  contract.POSITION_IDS: [[1, seq[0]], [1, seq[0]], [1, seq[1]]]}
        for i in range(dec["num_layers"]):
            kv = [[1, heads, past[0], dim], [1, heads, past[0], dim], [1, heads, past[1], dim]]
            shapes[contract.past_key_name(i)] = shapes[contract.past_value_name(i)] = kv
        profiles.append(shapes)
    return {"kind": "decoder", "io": io, "profiles": profiles, "layers": dec["num_layers"],
            "heads": heads, "head_dim": dim, "vocab": dec["vocab_size"]}


@pytest.fixture
def fake_trt_backend(tmp_path, monkeypatch):
    """runtime.backends.trt imported over the fakes, with an artefact dir holding fake plans."""
    trt, cudart = fake_tensorrt(), fake_cudart()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "runtime.backends.trt", raising=False)
    backend = importlib.import_module("runtime.backends.trt")
    monkeypatch.delitem(sys.modules, "runtime.backends.trt")  # later imports see the real one
    manifest = small_manifest()
    artifacts = write_artifacts(tmp_path / "art", manifest)
    manifest["engines"] = {}
    for kind in ("vision", "decoder"):
        plan = artifacts / contract.ENGINES_DIR / f"{kind}.plan"
        plan.parent.mkdir(exist_ok=True)
        plan.write_text(json.dumps(fake_plan(kind, manifest)))
        manifest["engines"][kind] = {"file": f"engines/{kind}.plan", "tensorrt_version": "10.3.0",
                                     "gpu": {"name": "Fake GPU", "compute_capability": "8.7"}}
    (artifacts / contract.MANIFEST_NAME).write_text(json.dumps(manifest))
    return backend, artifacts, cudart


def test_decoder_runner_ping_pong_and_truncate(fake_trt_backend):
    backend, artifacts, cudart = fake_trt_backend
    decoder = backend.TRTDecoderRunner(artifacts)
    assert (decoder.max_context, decoder.max_seq, decoder.num_layers) == (16, 8, 2)
    embeds = np.random.default_rng(0).standard_normal((1, 12, 8)).astype(np.float32)
    mask = np.ones((1, 12), np.int64)

    def step(start, stop, all_logits=False):
        return decoder.forward(embeds[:, start:stop], mask[:, :stop],
                               np.arange(start, stop)[None], all_logits=all_logits)

    prompt = step(0, 6, all_logits=True)
    assert prompt.shape == (6, 5) and prompt.dtype == np.float32
    steps = [step(i, i + 1) for i in range(6, 9)]
    assert decoder.past_length == 9 and steps[0].shape == (1, 5)
    context = decoder._engine.context
    assert context.profiles_used == [0, 1, 1, 1]  # prefill profile, then the decode one
    decoder.truncate(7)  # drop positions 7 and 8: the next step must equal the first run's
    np.testing.assert_array_equal(step(7, 8), steps[1])
    fresh = backend.TRTDecoderRunner(artifacts)  # the same positions in one prompt pass
    full = fresh.forward(embeds[:, :8], mask[:, :8], np.arange(8)[None], all_logits=True)
    np.testing.assert_allclose(full[-1], steps[1][0], rtol=1e-2)
    decoder.truncate(0)
    np.testing.assert_array_equal(step(0, 6, all_logits=True), prompt)
    with pytest.raises(ValueError, match="attention_mask must be"):
        decoder.forward(embeds[:, 6:7], mask[:, :6], np.array([[6]]))
    filler = np.zeros((1, 9, 8), np.float32)
    with pytest.raises(ValueError, match="outside every engine profile"):  # seq 9 > max 8
        decoder.forward(filler, np.ones((1, 15), np.int64), np.arange(6, 15)[None])
    for i in range(6, 16):
        decoder.forward(filler[:, :1], np.ones((1, i + 1), np.int64), np.array([[i]]))
    with pytest.raises(ValueError, match="context full"):
        decoder.forward(filler[:, :1], np.ones((1, 17), np.int64), np.array([[16]]))
    decoder.close()
    fresh.close()


def test_vision_runner_chunks_to_the_profile(fake_trt_backend):
    backend, artifacts, _ = fake_trt_backend
    vision = backend.TRTVisionRunner(artifacts)
    pixels = np.random.default_rng(0).standard_normal((5, 3, 224, 224)).astype(np.float32)
    embeds = vision.encode(pixels)
    assert embeds.shape == (5, 4, 6) and embeds.dtype == np.float32
    expected = pixels.astype(np.float16).astype(np.float32).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(embeds[:, 0, 0], expected, atol=2e-3)
    with pytest.raises(ValueError, match="outside the engine"):
        vision.encode(pixels[:, :, :112, :112])
    vision.close()


def test_runner_refuses_an_engine_from_another_gpu(fake_trt_backend):
    backend, artifacts, _ = fake_trt_backend
    manifest = contract.read_manifest(artifacts)
    manifest["engines"]["decoder"]["gpu"] = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(EngineMismatch, match="python -m export.engine --artifacts"):
        backend.TRTDecoderRunner(artifacts, manifest)
    del manifest["engines"]["vision"]
    with pytest.raises(BackendUnavailable, match="no vision engine"):
        backend.TRTVisionRunner(artifacts, manifest)


def test_load_check_command(fake_trt_backend, capsys):
    backend, artifacts, _ = fake_trt_backend
    assert backend._main([str(artifacts)]) == 0
    assert "max_context 16" in capsys.readouterr().out
    assert backend._main([str(artifacts / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_shared_kv_cache_decoder_is_refused_for_tensorrt():
    manifest = fake_manifest()
    manifest["decoder"]["kv_cache"] = "shared-buffer"
    with pytest.raises(eng.EngineBuildError, match="--kv-cache concat"):
        eng.decoder_profiles(manifest)
