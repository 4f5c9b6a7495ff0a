"""An fp16 export on the CPU runtime, plain and with an int8 KV cache (export.quantize_kv): what
``scripts/gpu_check.py`` runs on a GPU, through the same runner code (the fp16 conversions of
runtime/half.py included), against the fp32 export of the same seeded weights. The reference's
greedy tokens have top-1 margins of 0.147 or more here, so a flipped pick is a bug, not fp16
rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench.agreement import teacher_forced_logits  # noqa: E402

TOKENS = 32


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def fp32_answer(exported):
    """The fp32 export's image embeddings, greedy tokens and their teacher-forced logits."""
    with Pipeline.from_artifacts(exported("--vis-proj", "baseline")) as pipe:
        size = pipe.artifacts.vision.image_size
        pixels = np.random.default_rng(3).standard_normal((1, 3, size, size)).astype(np.float32)
        ids = pipe.tokenizer.encode(format_round("Describe the image.", 1))
        image = pipe.vision.encode(pixels)
        first = pipe.prefill(*pipe.splice(ids, image))
        tokens, _ = pipe.decode(first, SamplingOptions(max_new_tokens=TOKENS), stop_ids=())
        return pixels, ids, image, tokens, teacher_forced_logits(pipe, ids, pixels, tokens)


@pytest.mark.parametrize("cache", ["float", "int8"])
def test_fp16_export_answers_as_the_fp32_one(exported, fp32_answer, tmp_path, cache):
    from export import quantize_kv

    pixels, ids, image, tokens, logits = fp32_answer
    path = exported("--vis-proj", "baseline", "--precision", "fp16")
    if cache == "int8":
        assert quantize_kv.main(["--artifacts", str(path), "--out", str(tmp_path / "kv8")]) == 0
        path = tmp_path / "kv8"
    with Pipeline.from_artifacts(path) as pipe:
        got_image = pipe.vision.encode(pixels)
        got = teacher_forced_logits(pipe, ids, pixels, tokens)
    assert got_image.dtype == got.dtype == np.float32 and np.isfinite(got).all()
    assert cosine(got_image, image) > 0.9999
    assert min(cosine(g, w) for g, w in zip(got, logits, strict=True)) > 0.999
    assert list(got.argmax(-1)) == tokens
