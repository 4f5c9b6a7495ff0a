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
from fake_manifests import fake_decoder, fake_vision, write_manifest
from fake_manifests import fake_manifest as typed_manifest

from export import engine as eng
from runtime import contract
from runtime import graphs as g
from runtime.backends.errors import (
    BackendError,
    BackendUnavailable,
    EngineMismatch,
    check_engine_metadata,
)
from runtime.manifest import EngineEntry, GpuRecord, Manifest, read_manifest

REPO = Path(__file__).resolve().parents[1]


def fake_manifest(max_positions: int = 4096, dynamic: bool = False, root: Path | None = None) -> Manifest:
    return typed_manifest(fake_vision(root, dynamic=dynamic), fake_decoder(root, max_positions=max_positions))


def write_artifacts(root: Path, manifest: Manifest | None = None, onnx: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if onnx:
        (root / contract.VISION_FILE).write_bytes(b"not really onnx")
        (root / contract.DECODER_FILE).write_bytes(b"not really onnx")
    return write_manifest(root, manifest or fake_manifest(root=root))


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
    profile = eng.vision_profile(fake_manifest().vision)
    assert profile.axes == {g.IMAGES: eng.Range(1, 1, 8), g.HEIGHT: eng.Range(224, 224, 224),
                            g.WIDTH: eng.Range(224, 224, 224)}


def test_vision_resolution_only_for_dynamic_exports():
    with pytest.raises(eng.EngineBuildError, match="fixed 224 px"):
        eng.vision_profile(fake_manifest().vision, resolution=eng.Range(112, 224, 448))
    dynamic = fake_manifest(dynamic=True).vision
    profile = eng.vision_profile(dynamic, resolution=eng.Range(112, 224, 448))
    assert profile.axes[g.HEIGHT] == eng.Range(112, 224, 448)
    with pytest.raises(eng.EngineBuildError, match="multiple of the patch size 14"):
        eng.vision_profile(dynamic, resolution=eng.Range(100, 224, 448))


def decoder_profiles(manifest: Manifest, *args, **kwargs) -> list[eng.Profile]:
    return eng.decoder_profiles(manifest.decoder, manifest.vision.image_tokens, *args, **kwargs)


def test_default_decoder_profiles_from_manifest():
    prompt, append, decode = decoder_profiles(fake_manifest())
    assert (prompt.name, append.name, decode.name) == ("prompt", "append", "decode")
    assert prompt.axes[g.SEQUENCE] == eng.Range(1, 256 + 64, 4096)
    assert prompt.axes[g.PAST] == eng.Range(0, 0, 0)  # a first prompt: nothing cached
    assert prompt.axes[g.TOTAL] == prompt.axes[g.SEQUENCE]
    assert append.axes[g.SEQUENCE] == eng.Range(1, 64, eng.DEFAULT_APPEND_LEN)
    assert append.axes[g.PAST] == eng.Range(1, 2048, 4095)
    assert append.axes[g.TOTAL] == eng.Range(2, 2048 + 64, 4096)
    assert decode.axes[g.SEQUENCE] == eng.Range(1, 1, 1)
    assert decode.axes[g.PAST] == eng.Range(0, 2048, 4095)
    assert decode.axes[g.TOTAL] == eng.Range(1, 2049, 4096)


def test_no_profile_sizes_attention_past_context_plus_append():
    """The old prefill profile (seq up to C over past up to C-1) sized concat(past, new) at
    2C-1 positions; now only append reaches C-1 + append_len."""
    for profile in decoder_profiles(fake_manifest(), append_len=300):
        keys = profile.axes[g.PAST].max + profile.axes[g.SEQUENCE].max
        assert keys <= 4096 + 300 - 1, profile
    (single,) = decoder_profiles(fake_manifest(), single=True)
    assert single.name == "any"
    with pytest.raises(eng.EngineBuildError, match="--append-len must be >= 1"):
        decoder_profiles(fake_manifest(), append_len=0)
    assert decoder_profiles(fake_manifest(64), max_context=16)[1].axes[g.SEQUENCE].max == 15


def test_default_max_context_is_capped_by_positions():
    assert eng.default_max_context(fake_decoder(max_positions=2048)) == 2048
    assert eng.default_max_context(fake_decoder(max_positions=32768)) == 4096
    (single,) = decoder_profiles(fake_manifest(2048), single=True)
    assert single.axes[g.SEQUENCE] == eng.Range(1, 1, 2048) and single.axes[g.PAST].max == 2047


def test_decoder_profile_validation():
    with pytest.raises(eng.EngineBuildError, match="max_position_embeddings"):
        decoder_profiles(fake_manifest(2048), max_context=4096)
    with pytest.raises(eng.EngineBuildError, match="exceeds --max-context 1024"):
        decoder_profiles(fake_manifest(), eng.Range(1, 64, 2048), max_context=1024)
    prompt, append, _ = decoder_profiles(fake_manifest(), eng.Range(1, 64, 512), max_context=1024)
    assert prompt.axes[g.SEQUENCE] == eng.Range(1, 64, 512) and prompt.axes[g.PAST].max == 0
    assert append.axes[g.PAST].max == 1023


DECODER = g.decoder_graph(8)
VISION = g.vision_graph(dynamic_resolution=True)


def test_profile_shapes_fill_dynamic_dims_and_keep_fixed_ones():
    *_, decode = decoder_profiles(fake_manifest(), max_context=1024)
    kv_axes = eng.input_axes(DECODER, "decoder", "past_key_values.3.key")
    kv = eng.profile_shapes("past_key_values.3.key", [-1, 8, -1, 64], kv_axes, decode)
    assert kv == ([1, 8, 0, 64], [1, 8, 512, 64], [1, 8, 1023, 64])
    axes = eng.input_axes(DECODER, "decoder", contract.ATTENTION_MASK)
    assert eng.profile_shapes(contract.ATTENTION_MASK, [-1, -1], axes, decode)[2] == [1, 1024]
    vision = eng.vision_profile(fake_manifest().vision)
    shapes = eng.profile_shapes("pixel_values", [-1, 3, 224, 224],
                                eng.input_axes(VISION, "vision", "pixel_values"), vision)
    assert shapes == ([1, 3, 224, 224], [1, 3, 224, 224], [8, 3, 224, 224])


def test_profile_shapes_reject_contract_violations():
    vision = eng.vision_profile(fake_manifest(dynamic=True).vision,
                                resolution=eng.Range(112, 224, 448))
    with pytest.raises(eng.EngineBuildError, match="fixed to 224"):
        eng.profile_shapes("pixel_values", [-1, 3, 224, 224],
                           eng.input_axes(VISION, "vision", "pixel_values"), vision)
    *_, decode = decoder_profiles(fake_manifest())
    kv_axes = eng.input_axes(DECODER, "decoder", "past_key_values.0.key")
    with pytest.raises(eng.EngineBuildError, match="should be fixed"):
        eng.profile_shapes("past_key_values.0.key", [-1, -1, -1, 64], kv_axes, decode)
    with pytest.raises(eng.EngineBuildError, match="unexpected input 'input_ids'"):
        eng.input_axes(DECODER, "decoder", "input_ids")


# --- manifest update ------------------------------------------------------------------------


def engine_entry(name: str) -> EngineEntry:
    return EngineEntry(file=f"engines/{name}.plan", bytes=1, sha256="0" * 64, precision="fp16",
                       tensorrt_version="10.3.0", gpu=GpuRecord("Orin", "8.7"))


def test_update_manifest_merges_engines_and_keeps_other_sections(tmp_path):
    write_artifacts(tmp_path)
    original = json.loads((tmp_path / contract.MANIFEST_NAME).read_text())
    eng.update_manifest(tmp_path, "vision", engine_entry("vision"), None)
    eng.update_manifest(tmp_path, "decoder", engine_entry("decoder"), "engines/timing.cache")
    manifest = json.loads((tmp_path / contract.MANIFEST_NAME).read_text())
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

    import export.publish as publish

    monkeypatch.setattr(publish.os, "replace", killed)  # the durable write engine.py uses
    with pytest.raises(OSError):
        eng.update_manifest(tmp_path, "vision", engine_entry("vision"), None)
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
    assert [p["name"] for p in plans["decoder"]] == ["prompt", "append", "decode"]
    assert plans["decoder"][2]["axes"][g.PAST] == [0, 512, 1023]
    assert plans["decoder_memory"]["computed_from_shapes"] is True


# --- engine metadata check ------------------------------------------------------------------


def engine_meta(**over) -> EngineEntry:
    meta = {"file": "engines/decoder.plan", "bytes": 1, "sha256": "0" * 64, "precision": "fp16",
            "tensorrt_version": "10.3.0", "version_compatible": False,
            "hardware_compatibility": "none",
            "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    meta.update(over)
    return EngineEntry.from_dict(meta, "engines.decoder")


def check(meta: EngineEntry, trt_version: str = "10.3.0", gpu: str = "Orin", cc: str = "8.7"):
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
    # TensorRT's support matrix: 10.x version-compatible plans run on an 11.x runtime
    assert check(vc, trt_version="11.0.0") == [] and check(vc, trt_version="11.1.0") == []
    with pytest.raises(EngineMismatch, match="10.x plans on 11.x"):
        check(engine_meta(tensorrt_version="11.0.0", version_compatible=True), trt_version="10.3.0")
    with pytest.raises(EngineMismatch, match="TensorRT version"):  # a plain plan: same release
        check(engine_meta(), trt_version="11.1.0")
    with pytest.raises(EngineMismatch):  # 8.x -> 11.x is not a documented combination
        check(engine_meta(tensorrt_version="8.6.1", version_compatible=True), trt_version="11.1.0")
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
    except BackendError as err:
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
    from runtime.backends.cuda import check

    stream = check(cudart.cudaStreamCreate())
    cache = trt_backend.KVCache(layers, heads, head_dim, max_context, itemsize=2, stream=stream)
    try:
        written = {}
        for index in range(2 * layers):  # what an engine's present output would hold: [H, past, D]
            values = np.random.default_rng(index).standard_normal(
                (heads, past, head_dim)).astype(np.float16)
            cache.present(index).upload(values, stream)
            written[index] = values
        cache.advance(past)
        assert cache.length == past
        cache.truncate(6)
        for index, values in written.items():
            out = np.empty((heads, 6, head_dim), np.float16)
            cache.past(index).download(out, stream)
            check(cudart.cudaStreamSynchronize(stream))
            np.testing.assert_array_equal(out, values[:, :6])
        cache.truncate(0)
        assert cache.length == 0
        with pytest.raises(ValueError):
            cache.truncate(1)
    finally:
        cache.free()
        cudart.cudaStreamDestroy(stream)


def ort_prompt_logits(artifacts: Path, manifest: Manifest, embeds: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    """Last-position logits of decoder.onnx on ONNX Runtime CPU, types read from the graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts / contract.DECODER_FILE))
    dec = manifest.decoder
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
            feeds[arg.name] = np.zeros((1, dec.num_kv_heads, 0, dec.head_dim), dtype)
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
    manifest = read_manifest(artifacts)
    size = manifest.vision.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    session = ort.InferenceSession(str(artifacts / contract.VISION_FILE))
    feed_type = np.float16 if "16" in session.get_inputs()[0].type else np.float32
    expected = session.run(None, {contract.VISION_INPUT: pixels.astype(feed_type)})[0]
    np.testing.assert_allclose(vision.encode(pixels), expected.astype(np.float32), atol=5e-2,
                               rtol=5e-2)

    hidden = manifest.decoder.hidden_size
    embeds = np.random.default_rng(1).standard_normal((1, 12, hidden)).astype(np.float32) * 0.1
    mask = np.ones((1, 12), np.int64)
    prompt = decoder.forward(embeds[:, :10], mask[:, :10], np.arange(10)[None])
    step = decoder.forward(embeds[:, 10:11], mask[:, :11], np.array([[10]]))
    decoder.truncate(10)
    again = decoder.forward(embeds[:, 10:11], mask[:, :11], np.array([[10]]))
    np.testing.assert_allclose(step, again, atol=1e-3)
    assert prompt.shape == (1, manifest.decoder.vocab_size)
    reference = ort_prompt_logits(artifacts, manifest, embeds[:, :10], mask[:, :10])
    assert prompt.argmax() == reference.argmax()
    np.testing.assert_allclose(prompt[0], reference, atol=5e-2 * np.abs(reference).max())
    vision.close()
    decoder.close()


def _tiny_export(tmp_path: Path, *flags: str) -> Path:
    """A fresh fp16 export of the tiny preset (or DSVL_TRT_ARTIFACTS for the default flags)."""
    artifacts = tmp_path / "art"
    subprocess.run([sys.executable, "-m", "export.all", "--preset", "tiny", "--precision",
                    "fp16", *flags, "--out", str(artifacts)], cwd=REPO, check=True, timeout=600)
    return artifacts


def ort_decoder(artifacts: Path):
    """decoder.onnx on ONNX Runtime CPU: run(embeds, mask, positions, past) -> logits, present."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts / contract.DECODER_FILE))
    types_of = {arg.name: {"tensor(float16)": np.float16, "tensor(float)": np.float32,
                           "tensor(int64)": np.int64}[arg.type] for arg in session.get_inputs()}

    def run(embeds, mask, positions, past):
        feeds = {contract.INPUTS_EMBEDS: embeds.astype(types_of[contract.INPUTS_EMBEDS]),
                 contract.ATTENTION_MASK: mask.astype(np.int64),
                 contract.POSITION_IDS: positions.astype(np.int64)}
        feeds.update(past)
        outputs = session.run(None, feeds)
        names = [o.name for o in session.get_outputs()]
        present = {n.replace("present.", "past_key_values."): v
                   for n, v in zip(names[1:], outputs[1:], strict=True)}
        return outputs[0][0].astype(np.float32), present

    return run, types_of


@pytest.mark.gpu
def test_trt_mmca_fp16_text_before_first_image_matches_onnxruntime(tmp_path):
    """fp16 MMCA decoder engine: a prompt with text before the first image (rows that DSVL's
    softmax averages uniformly), then decode steps and an append, against ONNX Runtime CPU on
    the same graph. Finite logits and top-1 agreement (teacher forcing, DESIGN "How to
    compare"); the first test of the masks under TensorRT's kernels."""
    pytest.importorskip("tensorrt", reason="no TensorRT")
    _cuda_runtime()
    artifacts = _tiny_export(tmp_path, "--enable-mmca-attention")
    assert eng.main(["--artifacts", str(artifacts), "--images", "1,1,2", "--prompt-len",
                     "1,16,64", "--append-len", "16", "--max-context", "128"]) == 0
    from runtime.backends.trt import load

    vision, decoder = load(artifacts)
    dec = read_manifest(artifacts).decoder
    run_ort, types_of = ort_decoder(artifacts)
    mask = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 2, 2, 1, 1, 1]])  # text first
    embeds = np.random.default_rng(2).standard_normal((1, 40, dec.hidden_size)) * 0.5
    empty = np.zeros((1, dec.num_kv_heads, 0, dec.head_dim), types_of[contract.INPUTS_EMBEDS])
    past = {n: empty for n in types_of if n.startswith("past_key_values.")}
    length, agree, total = mask.shape[1], 0, 0
    want, past = run_ort(embeds[:, :length], mask, np.arange(length)[None], past)
    got = decoder.forward(embeds[:, :length].astype(np.float32), mask, np.arange(length)[None],
                          all_logits=True)
    assert np.isfinite(got).all(), "NaN/inf in the prompt pass: the MMCA masks under TensorRT"
    agree += int((got.argmax(-1) == want.argmax(-1)).sum())
    total += length
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 5e-2 * scale
    for step in range(6):  # decode steps, then one append of 8 (text) positions
        new = 1 if step < 5 else 8
        mask = np.concatenate([mask, np.ones((1, new), np.int64)], axis=1)
        chunk = embeds[:, length:length + new]
        positions = np.arange(length, length + new)[None]
        want, past = run_ort(chunk, mask, positions, past)
        got = decoder.forward(chunk.astype(np.float32), mask, positions, all_logits=True)
        assert np.isfinite(got).all()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += new
        length += new
    assert agree >= 0.9 * total, f"top-1 agreement {agree}/{total}"
    vision.close()
    decoder.close()


@pytest.mark.gpu
def test_trt_dynamic_resolution_vision_matches_onnxruntime(tmp_path):
    """A --dynamic-resolution vision export (baseline projector) built over a resolution range:
    TensorRT follows ONNX Runtime at three sizes, token counts included."""
    pytest.importorskip("tensorrt", reason="no TensorRT")
    _cuda_runtime()
    import onnxruntime as ort

    artifacts = _tiny_export(tmp_path, "--vis-proj", "baseline", "--dynamic-resolution")
    assert eng.main(["--artifacts", str(artifacts), "--only", "vision", "--images", "1,1,2",
                     "--resolution", "28,56,84"]) == 0
    from runtime.backends.trt import TRTVisionRunner

    vision = TRTVisionRunner(artifacts)
    session = ort.InferenceSession(str(artifacts / contract.VISION_FILE))
    feed_type = np.float16 if "16" in session.get_inputs()[0].type else np.float32
    for size in (28, 56, 84):
        pixels = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
        want = session.run(None, {contract.VISION_INPUT: pixels.astype(feed_type)})[0]
        got = vision.encode(pixels)
        assert got.shape == want.shape == (2, (size // 14) ** 2 + 1, got.shape[2])
        np.testing.assert_allclose(got, want.astype(np.float32), atol=5e-2, rtol=5e-2)
    vision.close()


def test_shared_kv_cache_decoder_is_refused_for_tensorrt():
    manifest = fake_manifest()
    manifest.decoder.kv_cache = contract.KV_SHARED
    with pytest.raises(eng.EngineBuildError, match="--decoder-graph standard"):
        decoder_profiles(manifest)


def test_main_shares_the_exporters_exit_statuses(tmp_path, monkeypatch, capsys):
    """export.cli's cli_status: a full disk is one line and 2, Ctrl-C names the engine files."""
    import errno

    artifacts = write_artifacts(tmp_path / "art")

    def disk_full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", str(artifacts / "engines"))

    monkeypatch.setattr(eng, "run", disk_full)
    assert eng.main(["--artifacts", str(artifacts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on device writing ")
    monkeypatch.setattr(eng, "run", lambda _args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert eng.main(["--artifacts", str(artifacts)]) == 130
    assert "no engine file was left half-written" in capsys.readouterr().err
