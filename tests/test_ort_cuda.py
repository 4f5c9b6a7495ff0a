"""ONNX Runtime's CUDA provider against its CPU provider on the same exports (``pytest -m gpu``):
the decoder runner with its in-place cache on the GPU (prompt pass, steps, truncation, a second
prompt pass), the vision encoder (also through CUDA graphs), and a whole generation, in fp32 and fp16. Each test skips,
before exporting anything, where onnxruntime has no CUDA provider (CPU machines, CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts import open_artifacts
from runtime.backends.ort import CACHE_DEVICES, OrtDecoderRunner, OrtVisionRunner
from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions
from scripts.bench.agreement import teacher_forced_logits

pytestmark = pytest.mark.gpu

CAUSAL = ("--vis-proj", "perceiver")
MMCA = ("--vis-proj", "perceiver", "--enable-mmca-attention", "--seed", "1")
# fp32 on the GPU may multiply in TF32 (ONNX Runtime's CUDA default on Ampere and later): the
# bars are cosine and top-1, not bit equality; fp16 is compared with the CPU provider's fp16.
COSINE_MIN = {"fp32": 0.9999, "fp16": 0.999}


def needs_cuda() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu on a CUDA "
                    "machine to run the ort-cuda tests")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def runners(art: Path, max_context: int = 32) -> tuple[OrtDecoderRunner, OrtDecoderRunner]:
    decoder = open_artifacts(art).decoder
    path = art / decoder.file.path
    return (OrtDecoderRunner(path, decoder, "ort-cpu", max_context),
            OrtDecoderRunner(path, decoder, "ort-cuda", max_context))


def precision_flags(precision: str) -> tuple[str, ...]:
    return ("--precision", "fp16") if precision == "fp16" else ()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("flags", [CAUSAL, MMCA, (*CAUSAL, "--kv-cache", "concat")],
                         ids=["causal", "mmca", "concat"])
def test_decoder_on_cuda_tracks_the_cpu_provider(exported, flags, precision):
    """Prompt pass, steps through ``step`` (the causal in-place graph's full-width mask), a
    truncation and a second prompt pass: every position's logits finite, close to the CPU
    provider's and with its top-1."""
    needs_cuda()
    art = exported(*flags, *precision_flags(precision))
    cpu, cuda = runners(art)
    assert cuda.cache_device == (CACHE_DEVICES["ort-cuda"] if cuda.shared else None)  # on the GPU
    rng = np.random.default_rng(3)
    embeds = (rng.standard_normal((1, 20, cpu.hidden_size)) * 0.5).astype(np.float32)
    mask = np.ones((1, cpu.max_context), np.int64)
    mask[0, 2:5] = 2  # image positions (MMCA's second softmax)
    pairs = [[r.forward(embeds[:, :8], mask[:, :8], np.arange(8)[None], all_logits=True).copy()
              for r in (cpu, cuda)]]
    for position in range(8, 12):
        pairs.append([r.step(embeds[0, position], mask, position)[None].copy() for r in (cpu, cuda)])
    for r in (cpu, cuda):
        r.truncate(6)
    pairs.append([r.forward(embeds[:, 12:20], mask[:, :14], np.arange(6, 14)[None],
                            all_logits=True).copy() for r in (cpu, cuda)])
    for want, got in pairs:
        assert np.isfinite(got).all()
        assert cosine(want, got) >= COSINE_MIN[precision]
    want, got = (np.concatenate(side) for side in zip(*pairs, strict=True))  # 20 positions
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9
    cpu.close()
    cuda.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vision_on_cuda_tracks_the_cpu_provider(exported, precision):
    needs_cuda()
    art = exported(*CAUSAL, *precision_flags(precision))
    spec = open_artifacts(art).vision
    pixels = np.random.default_rng(4).standard_normal((2, 3, spec.image_size, spec.image_size))
    outputs = []
    for backend in ("ort-cpu", "ort-cuda"):
        runner = OrtVisionRunner(art / spec.file.path, spec, backend)
        outputs.append(runner.encode(pixels.astype(np.float32)))
        runner.close()
    assert np.isfinite(outputs[1]).all()
    assert cosine(*outputs) >= COSINE_MIN[precision]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vision_through_cuda_graphs_gives_the_plain_sessions_output(exported, precision):
    """runtime/backends/ort_graphs.py: each image count's graph is captured after ONNX Runtime's
    first plain runs, then replayed; every call, image counts interleaved, must give the plain
    ort-cuda session's output for its own pixels (the same kernels: exact)."""
    needs_cuda()
    art = exported(*CAUSAL, *precision_flags(precision))
    spec = open_artifacts(art).vision
    plain = OrtVisionRunner(art / spec.file.path, spec, "ort-cuda")
    replayed = OrtVisionRunner(art / spec.file.path, spec, "ort-cuda", cuda_graph=True)
    rng = np.random.default_rng(5)
    try:
        for count in (1, 2, 1, 2, 1, 2, 1, 2, 3):
            pixels = rng.standard_normal((count, 3, spec.image_size, spec.image_size)).astype(np.float32)
            got = replayed.encode(pixels)
            assert np.isfinite(got).all()
            np.testing.assert_array_equal(got, plain.encode(pixels))
    finally:
        plain.close()
        replayed.close()


def test_generation_on_cuda_follows_the_cpu_provider(exported):
    """An image and a prompt through both pipelines, ort-cuda fed the CPU provider's greedy
    tokens (teacher forcing): the same pick at nearly every step, logits close."""
    needs_cuda()
    art = exported(*CAUSAL)
    tokens = 24
    with Pipeline.from_artifacts(art, backend="ort-cpu") as cpu, \
            Pipeline.from_artifacts(art, backend="ort-cuda") as cuda:
        size = cpu.artifacts.vision.image_size
        pixels = np.random.default_rng(5).standard_normal((1, 3, size, size)).astype(np.float32)
        ids = cpu.tokenizer.encode(format_round("What is in the image?", 1))
        embeds, mask = cpu.splice(ids, cpu.vision.encode(pixels))
        greedy, _ = cpu.decode(cpu.prefill(embeds, mask), SamplingOptions(max_new_tokens=tokens),
                               stop_ids=())
        want = teacher_forced_logits(cpu, ids, pixels, greedy)
        got = teacher_forced_logits(cuda, ids, pixels, greedy)
    assert np.isfinite(got).all()
    assert (want.argmax(-1) == np.asarray(greedy)).all()  # the CPU provider follows itself
    assert (got.argmax(-1) == np.asarray(greedy)).mean() >= 0.9
    assert min(cosine(w, g) for w, g in zip(want, got, strict=True)) >= COSINE_MIN["fp32"]
