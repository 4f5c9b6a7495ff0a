"""export/engine.py and runtime/backends/trt.py against tests/fake_tensorrt.py: TensorRT's
documented behaviour (enum values per release, a profile switch that raises, bool results,
runs that fail on unbound inputs or shapes outside the profile, Dims with -1, dtype-honest
buffers, a timing cache that rejects another device's, errors through the logger).

The runner loads what the fake builder built, so profiles flow from the builder's flags to
the runtime's choice of profile. None of this runs TensorRT: see the gpu tests in
test_engine.py for that.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fake_manifests import fake_decoder, fake_manifest, fake_vision, write_manifest
from fake_tensorrt import Dims, fake_cudart, fake_onnx_graphs, fake_tensorrt

from export import cli as export_cli
from export import engine as eng
from runtime import contract
from runtime import graphs as g
from runtime.backends import cuda as cuda_shim
from runtime.backends.errors import EngineCallError, EngineMismatch
from runtime.errors import ArtifactError
from runtime.manifest import GpuRecord, Manifest, read_manifest


def small_manifest(mmca: bool = False, root: Path | None = None, io_dtype: str = "float16") -> Manifest:
    return fake_manifest(
        fake_vision(root, image_tokens=4, lang_dim=6, io_dtype=io_dtype),
        fake_decoder(root, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, hidden_size=8,
                     intermediate_size=16, vocab_size=5, max_positions=64, mmca=mmca, io_dtype=io_dtype))


def artifacts_dir(root: Path, mmca: bool = False, dtype: str = "float16") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    fake_onnx_graphs(root, dtype=dtype)
    return write_manifest(root, small_manifest(mmca, root, dtype))


BUILD_FLAGS = ["--max-context", "32", "--prompt-len", "1,8,16", "--append-len", "6"]
FAKE_GPU = cuda_shim.GpuInfo("Fake GPU", "8.7", 8 * 2**30)


def build(artifacts: Path, monkeypatch, trt: types.ModuleType, *flags: str) -> int:
    """python -m export.engine in-process over the fake TensorRT and a fake GPU. Its progress
    steps' memory housekeeping (a full garbage collection, heap trim and peak reset per step)
    is skipped: inside the test suite's process it cost seconds per build, and no test here
    measures memory."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(eng, "gpu_info", lambda: FAKE_GPU)
    for name in ("trim_heap", "reset_peak_rss", "return_freed_memory"):
        monkeypatch.setattr(export_cli, name, lambda: None)
    monkeypatch.setattr(export_cli.gc, "collect", lambda *args: 0)
    return eng.main(["--artifacts", str(artifacts), *BUILD_FLAGS, *flags])


# --- the builder ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_build_flow(tmp_path, monkeypatch, capsys, version):
    artifacts = artifacts_dir(tmp_path / "art")
    trt = fake_tensorrt(version, memory=[5 << 20, 3 << 20, 1 << 20])
    assert build(artifacts, monkeypatch, trt, "--version-compatible") == 0
    out = capsys.readouterr().out
    for step_name in ("vision: parse", "decoder: build (fp16, 3 profile(s))", "Tactics",
                      "decoder: device memory per profile", "update manifest.json"):
        assert step_name in out
    flags, config = trt.built[1]
    # 10.3: kSTRONGLY_TYPED = 1; 11.x: always strongly typed, no flag passed
    assert flags == (1 << 1 if version.startswith("10") else 0)
    assert config.flags == [trt.BuilderFlag.VERSION_COMPATIBLE]
    assert int(config.flags[0]) == (13 if version.startswith("10") else 12)
    prompt, append, decode = (p.shapes for p in config.profiles)
    assert prompt[contract.INPUTS_EMBEDS] == ([1, 1, 8], [1, 8, 8], [1, 16, 8])
    assert prompt["past_key_values.0.key"] == ([1, 2, 0, 4],) * 3
    assert append[contract.INPUTS_EMBEDS] == ([1, 1, 8], [1, 6, 8], [1, 6, 8])
    assert append["past_key_values.1.value"] == ([1, 2, 1, 4], [1, 2, 16, 4], [1, 2, 31, 4])
    assert decode["past_key_values.1.value"] == ([1, 2, 0, 4], [1, 2, 16, 4], [1, 2, 31, 4])
    entry = json.loads((artifacts / contract.MANIFEST_NAME).read_text())["engines"]["decoder"]
    assert [p["name"] for p in entry["profiles"]] == ["prompt", "append", "decode"]
    assert [p["device_memory_bytes"] for p in entry["profiles"]] == [5 << 20, 3 << 20, 1 << 20]
    assert entry["max_context"] == 32 and entry["max_prompt"] == 16
    assert entry["memory_estimate"]["computed_from_shapes"] is True
    assert set(entry["memory_estimate"]["activation_bytes"]) == {"prompt", "append", "decode"}
    assert entry["tensorrt_version"] == version and entry["version_compatible"] is True


def test_a_later_11_without_strongly_typed_still_builds(tmp_path, monkeypatch):
    """The former gate, hasattr(NetworkDefinitionCreationFlag, "STRONGLY_TYPED"), would refuse
    an 11.x that dropped the deprecated member; the major-version gate does not."""
    trt = fake_tensorrt("11.9.0", drop_strongly_typed=True)
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    assert build(artifacts_dir(tmp_path / "art"), monkeypatch, trt) == 0
    assert trt.built[0][0] == 0


def test_former_flag_value_is_refused_by_tensorrt():
    """The old fakes used STRONGLY_TYPED = 5; TensorRT 10.3 has 1 and rejects unknown bits."""
    trt = fake_tensorrt("10.3.0")
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert trt.Builder(trt.Logger()).create_network(1 << 5) is None
    assert eng.network_flags(trt) == 2
    assert eng.network_flags(fake_tensorrt("11.1.0")) == 0


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0"])
def test_tensorrt_before_10_is_refused(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    sys.modules["tensorrt"].__version__ = version
    with pytest.raises(eng.EngineBuildError, match=f"TensorRT {version} is too old"):
        eng.import_tensorrt()


def test_build_errors_come_through_the_logger(tmp_path, monkeypatch, capsys):
    trt = fake_tensorrt(fail_build="Error Code 2: OutOfMemory (tactic needs 9 GiB)")
    assert build(artifacts_dir(tmp_path / "art"), monkeypatch, trt, "--only", "decoder") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: TensorRT failed to build the decoder engine")
    assert "OutOfMemory (tactic needs 9 GiB)" in err


def test_timing_cache_of_another_device_is_replaced(tmp_path, monkeypatch, capsys):
    artifacts = artifacts_dir(tmp_path / "art")
    cache = artifacts / contract.ENGINES_DIR / contract.TIMING_CACHE
    cache.parent.mkdir()
    cache.write_bytes(b"TRTCACHE|NVIDIA H100 sm90|+tuned")
    assert build(artifacts, monkeypatch, fake_tensorrt(), "--only", "vision") == 0
    assert "timing.cache does not fit" in capsys.readouterr().out
    assert cache.read_bytes() == b"TRTCACHE|Fake GPU sm87|+tuned"  # fresh, then tuned once
    assert build(artifacts, monkeypatch, fake_tensorrt(), "--only", "vision") == 0
    assert cache.read_bytes() == b"TRTCACHE|Fake GPU sm87|+tuned+tuned"  # reused
    cache.write_bytes(b"garbage")
    assert build(artifacts, monkeypatch, fake_tensorrt(), "--only", "vision") == 0
    assert cache.read_bytes() == b"TRTCACHE|Fake GPU sm87|+tuned"


def test_rejected_profiles_are_one_line_errors(monkeypatch):
    trt = fake_tensorrt()
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(eng.network_flags(trt))
    inputs = {contract.INPUTS_EMBEDS: ([-1, -1, 8], "float16"),
              contract.ATTENTION_MASK: ([-1, -1], "int64"),
              contract.POSITION_IDS: ([-1, -1], "int64")}
    network.inputs = [types.SimpleNamespace(name=n) for n in inputs]
    profiles = eng.decoder_profiles(small_manifest().decoder, max_context=16)
    graph = g.decoder_graph(2)
    # set_shape raises RuntimeError on inconsistent shapes (pyCore.cpp opt_profile_set_shape)
    broken = eng.Profile("prompt", {**profiles[0].axes, g.SEQUENCE: eng.Range(4, 2, 8)})
    with pytest.raises(eng.EngineBuildError, match="refused shapes .* 'inputs_embeds' in decoder "
                                                   "profile 'prompt'"):
        eng.add_profiles(builder, builder.create_builder_config(), "decoder", graph, [broken], inputs)
    # add_optimization_profile returns -1 for an invalid profile (NvInfer.h)
    config = builder.create_builder_config()
    monkeypatch.setattr(config, "add_optimization_profile", lambda profile: -1)
    with pytest.raises(eng.EngineBuildError, match="rejected decoder profile 'prompt' "
                                                   r"\(add_optimization_profile returned -1"):
        eng.add_profiles(builder, config, "decoder", graph, profiles, inputs)


def test_hardware_compatible_is_refused_on_jetson_up_front(tmp_path, monkeypatch, capsys):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0\n")
    monkeypatch.setattr(eng, "JETSON_RELEASE", release)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # refused before TensorRT is needed
    artifacts = artifacts_dir(tmp_path / "art")
    assert eng.main(["--artifacts", str(artifacts), "--hardware-compatible", "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --hardware-compatible is not supported on Jetson")


def test_memory_budget_refuses_a_plan_that_cannot_fit(tmp_path, capsys):
    artifacts = tmp_path / "art"
    manifest = small_manifest()
    manifest.decoder = fake_decoder(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                                    hidden_size=4096, intermediate_size=11008, vocab_size=32003,
                                    max_positions=4096, mmca=True)
    write_manifest(artifacts, manifest)
    assert eng.main(["--artifacts", str(artifacts), "--only", "decoder", "--dry-run",
                     "--memory-budget-gb", "16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    for needle in ("--memory-budget-gb 16", "GiB computed from shapes", "weights 12.31",
                   "KV cache 4.00", "profile 'prompt'", "lower --max-context"):
        assert needle in line, line
    assert eng.main(["--artifacts", str(artifacts), "--only", "decoder", "--dry-run",
                     "--memory-budget-gb", "16", "--max-context", "1024"]) == 0


# --- the runtime ----------------------------------------------------------------------------


def load_backend(monkeypatch, trt: types.ModuleType, cudart: types.SimpleNamespace,
                 integrated: bool = False):
    """runtime.backends.trt imported over the fakes (the real module stays for later imports),
    on a fake GPU that shares memory with the CPU when ``integrated``."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    gpu = cuda_shim.GpuInfo(FAKE_GPU.name, FAKE_GPU.compute_capability, FAKE_GPU.total_memory_bytes, integrated)
    monkeypatch.setattr(cuda_shim, "gpu_info", lambda: gpu)
    monkeypatch.delitem(sys.modules, "runtime.backends.trt", raising=False)
    backend = importlib.import_module("runtime.backends.trt")
    monkeypatch.delitem(sys.modules, "runtime.backends.trt")
    return backend


@pytest.fixture
def built(tmp_path, monkeypatch):
    """build(mmca=..., dtype=..., version=..., integrated=...) -> (backend, artifacts, trt)."""

    def make(mmca=False, dtype="float16", version="10.3.0", integrated=False, run_version=None,
             flags=()):
        artifacts = artifacts_dir(tmp_path / f"art-{mmca}-{dtype}-{version}", mmca, dtype)
        assert build(artifacts, monkeypatch, fake_tensorrt(version), *flags) == 0
        trt = fake_tensorrt(run_version or version)
        return load_backend(monkeypatch, trt, fake_cudart(), integrated), artifacts, trt

    return make


def rows(length: int, hidden: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, length, hidden)).astype(np.float32)


def test_profile_per_call_and_ping_pong_cache(built):
    backend, artifacts, _ = built()
    decoder = backend.TRTDecoderRunner(artifacts)
    assert (decoder.max_context, decoder.max_seq, decoder.max_append) == (32, 16, 6)
    embeds, mask = rows(24), np.ones((1, 24), np.int64)

    def step(start, stop, all_logits=False):
        return decoder.forward(embeds[:, start:stop], mask[:, :stop],
                               np.arange(start, stop)[None], all_logits=all_logits)

    prompt = step(0, 6, all_logits=True)
    assert prompt.shape == (6, 5) and prompt.dtype == np.float32
    steps = [step(i, i + 1) for i in range(6, 9)]
    appended = step(9, 13)
    context = decoder._engine.context
    assert context.profiles_used == [0, 2, 2, 2, 1]  # prompt, decode x3, append
    assert decoder.past_length == 13 and appended.shape == (1, 5)
    decoder.truncate(7)  # drop positions 7..12: the next step must equal the first run's
    np.testing.assert_array_equal(step(7, 8), steps[1])
    decoder.truncate(0)
    np.testing.assert_array_equal(step(0, 6, all_logits=True), prompt)
    with pytest.raises(ValueError, match="attention_mask must be"):
        decoder.forward(embeds[:, 6:7], mask[:, :5], np.array([[6]]))
    decoder.truncate(0)
    with pytest.raises(ValueError, match="outside every engine profile"):  # prompt max 16
        decoder.forward(rows(17), np.ones((1, 17), np.int64), np.arange(17)[None])
    decoder.close()


def test_long_append_is_split_where_exact(built):
    backend, artifacts, _ = built(mmca=True)
    decoder = backend.TRTDecoderRunner(artifacts)
    embeds = rows(30, seed=1)
    mask = np.array([[1, 2, 2, 1] + [1] * 26])  # the cache will hold text and image keys
    decoder.forward(embeds[:, :4], mask[:, :4], np.arange(4)[None])
    chunked = decoder.forward(embeds[:, 4:16], mask[:, :16], np.arange(4, 16)[None])
    assert decoder._engine.context.profiles_used == [0, 1, 1]  # 12 appended in chunks of 6
    assert decoder.past_length == 16
    whole = backend.TRTDecoderRunner(artifacts)  # the same 16 positions in one prompt pass
    one = whole.forward(embeds[:, :16], mask[:, :16], np.arange(16)[None], all_logits=True)
    np.testing.assert_allclose(chunked[0], one[-1], rtol=1e-3)
    # MMCA with only text cached: a split would change DSVL's uniform-average rows: refused
    text_only = backend.TRTDecoderRunner(artifacts)
    text_only.forward(embeds[:, :4], np.ones((1, 4), np.int64), np.arange(4)[None])
    with pytest.raises(ValueError, match="outside every engine profile: rebuild .*--append-len"):
        text_only.forward(embeds[:, 4:12], np.ones((1, 12), np.int64), np.arange(4, 12)[None])
    for runner in (decoder, whole, text_only):
        runner.close()


def test_on_profile_change_where_memory_is_shared(built):
    backend, artifacts, trt = built(integrated=True)
    decoder = backend.TRTDecoderRunner(artifacts)
    context = decoder._engine.context
    assert context.strategy == trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
    decoder.forward(rows(4), np.ones((1, 4), np.int64), np.arange(4)[None])
    decoder.forward(rows(1), np.ones((1, 5), np.int64), np.array([[4]]))
    assert context.allocations == [1 << 20, 3 << 20]  # profile 0, then decode's own size
    decoder.close()
    backend, artifacts, trt = built(integrated=False, version="10.3.1")
    discrete = backend.TRTDecoderRunner(artifacts)
    assert discrete._engine.context.strategy == trt.ExecutionContextAllocationStrategy.STATIC
    assert discrete._engine.context.allocations == [3 << 20]  # the largest profile, for good
    discrete.close()


def test_failed_tensorrt_calls_are_one_line_errors(built):
    backend, artifacts, _ = built()
    decoder = backend.TRTDecoderRunner(artifacts)
    engine = decoder._engine
    engine.engine.fail_profile_switch = True  # e.g. ON_PROFILE_CHANGE cannot allocate
    decoder.forward(rows(3), np.ones((1, 3), np.int64), np.arange(3)[None])  # profile 0: no switch
    with pytest.raises(EngineCallError, match="could not switch the decoder engine from profile 0 "
                                              "to 2 .*Error in set optimization profile async"):
        decoder.forward(rows(1), np.ones((1, 4), np.int64), np.array([[3]]))
    engine.engine.fail_profile_switch = False
    engine.engine.fail_execute = True
    with pytest.raises(EngineCallError, match="execution failed for seq 1 after past 3 on profile 2"):
        decoder.forward(rows(1), np.ones((1, 4), np.int64), np.array([[3]]))
    with pytest.raises(EngineCallError, match="refused the device address .* for 'no_such_tensor'"):
        engine.bind("no_such_tensor", 256)
    with pytest.raises(EngineCallError, match="'logits'.*256-byte aligned"):
        engine.bind(contract.LOGITS, 257)
    with pytest.raises(ValueError, match=r"refused shape \(1, 99, 8\) for 'inputs_embeds' in "
                                         "decoder engine profile 2"):
        engine.set_shape(contract.INPUTS_EMBEDS, (1, 99, 8))
    decoder.close()


def test_former_assumptions_now_fail():
    """What the old fakes let through, TensorRT (and these fakes) do not."""
    trt = fake_tensorrt()
    spec = {"kind": "decoder", "layers": 0, "heads": 1, "head_dim": 1, "vocab": 2,
            "io": {contract.INPUTS_EMBEDS: {"mode": "input", "dtype": "float16", "shape": [1, -1, 1]},
                   contract.ATTENTION_MASK: {"mode": "input", "dtype": "int64", "shape": [1, -1]},
                   contract.POSITION_IDS: {"mode": "input", "dtype": "int64", "shape": [1, -1]},
                   contract.LOGITS: {"mode": "output", "dtype": "float16", "shape": [1, -1, 2]}},
            "profiles": [{contract.INPUTS_EMBEDS: [[1, 1, 1], [1, 1, 1], [1, 4, 1]],
                          contract.ATTENTION_MASK: [[1, 1], [1, 1], [1, 4]],
                          contract.POSITION_IDS: [[1, 1], [1, 1], [1, 4]]}]}
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(json.dumps(spec).encode())
    context = engine.create_execution_context()
    # a run with an unbound input (or an unset shape) fails
    for name in (contract.INPUTS_EMBEDS, contract.ATTENTION_MASK, contract.POSITION_IDS):
        assert context.set_input_shape(name, (1, 2, 1) if name == contract.INPUTS_EMBEDS else (1, 2))
    assert context.set_tensor_address(contract.LOGITS, 256) is True
    assert context.execute_async_v3(0) is False
    # a profile switch raises instead of returning False
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
        context.set_optimization_profile_async(1, 0)
    # set_tensor_address returns a bool, False for an unknown tensor (never None)
    assert context.set_tensor_address("past_key_values.9.key", 256) is False
    # shapes outside the profile are refused
    assert context.set_input_shape(contract.POSITION_IDS, (1, 5)) is False
    # engine shapes are Dims with -1, not tuples
    dims = engine.get_tensor_shape(contract.INPUTS_EMBEDS)
    assert isinstance(dims, Dims) and not isinstance(dims, tuple) and dims[1] == -1
    assert tuple(dims) == (1, -1, 1)
    # errors reach the logger
    assert any("enqueueV3" in message for _, message in engine.logger.messages)


def test_buffers_follow_the_engine_types(built):
    """An fp32 engine reads its inputs as fp32 (the old fakes read every input as fp16)."""
    fp16, art16, _ = built(dtype="float16")
    fp32, art32, _ = built(dtype="float32")
    embeds, mask = rows(5, seed=3), np.array([[1, 1, 2, 2, 1]])
    want = fp16.TRTDecoderRunner(art16).forward(embeds, mask, np.arange(5)[None], all_logits=True)
    runner = fp32.TRTDecoderRunner(art32)
    assert runner.dtypes[contract.INPUTS_EMBEDS] == np.float32
    got = runner.forward(embeds, mask, np.arange(5)[None], all_logits=True)
    np.testing.assert_allclose(got, want, rtol=2e-2)


def test_version_compatible_10_plans_run_on_11(built):
    backend, artifacts, _ = built(version="10.3.0", run_version="11.1.0",
                                  flags=("--version-compatible",))
    decoder = backend.TRTDecoderRunner(artifacts)
    assert decoder._engine.runtime.engine_host_code_allowed is True
    decoder.close()
    backend, artifacts, _ = built(version="10.7.0", run_version="11.1.0")
    with pytest.raises(EngineMismatch, match="rebuild with"):
        backend.TRTDecoderRunner(artifacts)


def test_vision_runner_chunks_to_the_profile(built):
    backend, artifacts, _ = built()
    vision = backend.TRTVisionRunner(artifacts)
    assert vision.max_images == 8
    pixels = np.random.default_rng(0).standard_normal((11, 3, 224, 224)).astype(np.float32)
    embeds = vision.encode(pixels)
    assert embeds.shape == (11, 4, 6) and embeds.dtype == np.float32
    expected = pixels.astype(np.float16).astype(np.float32).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(embeds[:, 0, 0], expected, atol=2e-3)
    with pytest.raises(ValueError, match="outside the engine"):
        vision.encode(pixels[:, :, :112, :112])
    vision.close()


def test_runner_refuses_an_engine_from_another_gpu(built):
    backend, artifacts, _ = built()
    manifest = read_manifest(artifacts)
    manifest.engines.decoder.gpu = GpuRecord("NVIDIA H100", "9.0")
    with pytest.raises(EngineMismatch, match="python -m export.engine --artifacts"):
        backend.TRTDecoderRunner(artifacts, manifest)


def test_load_check_command(built, capsys):
    backend, artifacts, _ = built()
    assert backend._main([str(artifacts)]) == 0
    assert "max_context 32" in capsys.readouterr().out
    assert backend._main([str(artifacts / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_plan_that_differs_from_the_manifest_is_refused(built):
    backend, artifacts, _ = built()
    plan = artifacts / contract.ENGINES_DIR / contract.DECODER_PLAN
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped: only the full sha256 sees it
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="decoder.plan does not match manifest.json .sha256 "
                                            "differs.*rebuild with `python -m export.engine") as err:
        backend.TRTDecoderRunner(artifacts)
    assert "\n" not in str(err.value)
    backend.TRTVisionRunner(artifacts).close()  # the other plan still loads


def test_max_context_caps_the_engine_context(built):
    backend, artifacts, _ = built()
    from runtime.backends import load_runners

    opened = types.SimpleNamespace(root=artifacts, manifest=read_manifest(artifacts))  # engines only
    vision, decoder = load_runners(opened, "trt", max_context=12)
    assert decoder.max_context == 12 and decoder.cache.max_context == 12  # the engine allows 32
    decoder.forward(rows(12), np.ones((1, 12), np.int64), np.arange(12)[None])
    with pytest.raises(ValueError, match="exceed the context of 12"):
        decoder.forward(rows(1), np.ones((1, 13), np.int64), np.array([[12]]))
    with vision, decoder:
        pass
    assert vision.closed and decoder.closed
