"""Batched decoding does not change answers: each stream's teacher-forced logits in a shared,
padded batch (sequences joining and leaving between steps) match its single-stream run."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import contract as c
from runtime import sources as src
from runtime.batching import Batch, DecoderSession
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions

TOLERANCE = 1e-4  # relative to the logits' scale
# (question, images, new tokens): different prompt lengths, a text-only one, different lengths
STREAMS = [("What is in the picture?", 1, 10), ("Compare these two, in detail please.", 2, 14),
           ("Hello there?", 0, 8), ("Why?", 1, 12), ("Describe the colours you see here.", 1, 6)]
JOIN_AT = [0, 0, 2, 3, 5]  # the step at which each stream joins


MMCA = ("--vis-proj", "perceiver", "--enable-mmca-attention", "--seed", "1")


@pytest.fixture(scope="module", params=["causal", "mmca", "mmca-concat", "int4", "kv8"])
def pipe(request, exported, kv8_export) -> Pipeline:
    """The default exports (in-place cache: ``SharedBatch``, MMCA included), MMCA over a
    concat cache (left-padded ``Batch``, text-only sequences batched alone), int4 weights
    (MatMulNBits, the LM head's candidates rescored per row) and an int8 KV cache."""
    if request.param == "kv8":
        return Pipeline.from_artifacts(kv8_export, threads=2)
    flags = {"causal": ("--vis-proj", "baseline"), "int4": ("--vis-proj", "baseline", "--weights", "int4"),
             # the same export as tests/test_runtime_errors.py: made once per session
             "mmca": MMCA, "mmca-concat": (*MMCA, "--kv-cache", "concat")}
    return Pipeline.from_artifacts(exported(*flags[request.param]), threads=2)


def images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(count)]


def single_stream(pipe: Pipeline, question: str, count: int, seed: int, new: int):
    steps: list[np.ndarray] = []
    result = pipe.generate(images(count, seed), question, SamplingOptions(max_new_tokens=new),
                           on_step=lambda logits, tokens: steps.append(logits.copy()))
    return result.tokens, np.stack(steps)


def test_batched_teacher_forced_logits_match_single_stream(pipe):
    refs = [single_stream(pipe, q, n, seed, new) for seed, (q, n, new) in enumerate(STREAMS)]
    decoder = DecoderSession(pipe.decoder.session, pipe.artifacts.decoder, pipe.decoder.max_context)
    takes = any(arg.name == c.LOGITS_TO_KEEP for arg in pipe.decoder.session.get_inputs())
    assert decoder.keeps_logits == pipe.decoder.keeps_logits == takes  # one answer, the graph's
    table = pipe.artifacts.decoder_embeddings
    shared = decoder.new_batch()
    batches: dict[int, tuple[Batch, list[int]]] = {}  # id -> (batch, stream index by row)
    got: list[list[np.ndarray]] = [[] for _ in STREAMS]
    widest = 0
    for step in range(100):
        for k, (q, n, _) in enumerate(STREAMS):
            if JOIN_AT[k] == step:
                sequence, embeds = pipe.chat().sequence_for(q, list(pipe.encode_images(images(n, k))))
                pre = decoder.prefill(pipe.embed(sequence, embeds), src.mask(sequence))
                got[k].append(pre.logits)
                batch = shared if decoder.pad_safe(pre.mask) else decoder.new_batch()
                batch.join(pre)
                batches.setdefault(id(batch), (batch, []))[1].append(k)
        for key, (batch, rows) in list(batches.items()):
            if not rows:
                continue
            widest = max(widest, len(batch))
            logits = batch.step(table[[refs[k][0][len(got[k]) - 1] for k in rows]])
            for row, k in enumerate(rows):
                got[k].append(logits[row])
            done = [row for row, k in enumerate(rows) if len(got[k]) == len(refs[k][1])]
            batch.leave(done)
            batches[key] = (batch, [k for row, k in enumerate(rows) if row not in done])
        if step > max(JOIN_AT) and not any(rows for _, rows in batches.values()):
            break
    assert widest >= 3, "the streams should have shared decode steps"
    for k, (tokens, want) in enumerate(refs):
        have = np.stack(got[k])
        scale = np.abs(want).max()
        assert np.abs(have - want).max() <= TOLERANCE * scale, f"stream {k}"
        top2 = np.sort(want, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > TOLERANCE * scale
        assert (have.argmax(1) == want.argmax(1))[clear].all(), f"stream {k}"
        assert have.argmax(1)[clear].tolist() == np.asarray(tokens)[clear].tolist()


def test_a_text_only_mmca_sequence_is_never_padded(pipe):
    """Only a padded (concat) MMCA batch must keep text-only sequences apart; an in-place
    cache has no padding."""
    decoder = DecoderSession(pipe.decoder.session, pipe.artifacts.decoder, pipe.decoder.max_context)
    text_only = np.ones(5, np.int64)
    with_image = np.array([1, 2, 2, 1], np.int64)
    assert decoder.pad_safe(with_image)
    assert decoder.in_place == (pipe.artifacts.decoder.kv_cache == c.KV_SHARED)
    assert decoder.pad_safe(text_only) == (not pipe.artifacts.mmca or decoder.in_place)
