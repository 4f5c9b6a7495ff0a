"""The runner base and the pipeline's seams: input checks against the graph's contract, close
(also as context managers), last_inference_time on an injected clock, the shared ping-pong
cache, and decode's sampler / stop_ids / on_step used the way scripts/bench/ uses them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts import open_artifacts
from runtime.backends.base import ContextOverflow, DecoderRunner, InputShapeError, PingPongCache
from runtime.backends.ort import OrtDecoderRunner
from runtime.errors import BackendError, UserError
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions


@pytest.fixture(scope="module")
def art(exported) -> Path:
    return exported("--vis-proj", "perceiver")


def ticking_clock(step: float = 1.0):
    """A clock that moves ``step`` seconds every time it is read."""
    counter = itertools.count()
    return lambda: next(counter) * step


def decoder_runner(art: Path, **kwargs) -> OrtDecoderRunner:
    decoder = open_artifacts(art).decoder
    return OrtDecoderRunner(art / decoder.file.path, decoder, threads=1, **kwargs)


def counted_binds(runner: OrtDecoderRunner) -> list[str]:
    """The names the runner binds from now on, in order (its binds still reach ONNX Runtime)."""
    calls: list[str] = []
    binding = runner.binding

    class Counting:
        def bind_input(self, name, *args):
            calls.append(name)
            binding._raw_binding.bind_input(name, *args)

        def bind_output(self, name, *args):
            calls.append(name)
            binding._raw_binding.bind_output(name, *args)

    binding.raw = Counting()
    return calls


def test_inputs_are_checked_against_the_graph_before_the_session(art):
    runner = decoder_runner(art, max_context=8)
    hidden = runner.hidden_size
    embeds = np.zeros((1, 3, hidden), np.float32)
    with pytest.raises(InputShapeError, match=r"with 0 cached positions and 3 new, attention_mask "
                                              r"must be an integer array \[1, 3\]; got int64 \(1, 4\)"):
        runner.forward(embeds, np.ones((1, 4), np.int64), np.arange(3)[None])
    with pytest.raises(InputShapeError, match=rf"inputs_embeds must be a float array \[1, 3, {hidden}\]"):
        runner.forward(np.zeros((1, 3, hidden + 1), np.float32), np.ones((1, 3), np.int64),
                       np.arange(3)[None])
    with pytest.raises(InputShapeError, match="position_ids must be an integer array"):
        runner.forward(embeds, np.ones((1, 3), np.int64), np.arange(3, dtype=np.float32)[None])
    runner.forward(embeds, np.ones((1, 3), np.int64), np.arange(3)[None])
    with pytest.raises(ContextOverflow, match="3 cached \\+ 6 new positions exceed the context of 8"):
        runner.forward(np.zeros((1, 6, hidden), np.float32), np.ones((1, 9), np.int64), np.arange(3, 9)[None])
    assert runner.past_length == 3  # refused calls leave the cache as it was
    runner.close()


def test_last_inference_time_is_the_session_call_on_the_runner_clock(art):
    runner = decoder_runner(art, clock=ticking_clock(0.5))
    assert runner.last_inference_time() is None
    runner.forward(np.zeros((1, 2, runner.hidden_size), np.float32), np.ones((1, 2), np.int64),
                   np.arange(2)[None])
    assert runner.last_inference_time() == 0.5  # read once before, once after the session
    runner.close()


def test_closed_runners_and_pipelines_refuse_calls(art):
    with Pipeline.from_artifacts(art, threads=1) as pipe:
        size = pipe.artifacts.vision.image_size
        image = np.zeros((size, size, 3), np.uint8)
        assert pipe.generate([image], "Hi?", SamplingOptions(max_new_tokens=2)).tokens
    assert pipe.vision.closed and pipe.decoder.closed
    with pytest.raises(BackendError, match="the vision runner was closed") as err:
        pipe.generate([image], "Hi?", SamplingOptions(max_new_tokens=2))
    assert "\n" not in str(err.value)
    pipe.close()  # twice is fine


def test_decode_seams_drive_generation_without_patching(art):
    with Pipeline.from_artifacts(art, threads=1, clock=ticking_clock()) as pipe:
        ids = pipe.tokenizer.encode("### Question:\nhello\n\n### Answer:\n")
        embeds, mask = pipe.splice(ids, pipe.encode_images([]))
        eos = pipe.tokenizer.eos_token_id
        first = pipe.prefill(embeds, mask)
        forced = [eos, 7, eos, 9]
        seen: list[tuple[int, int | None]] = []

        def on_step(logits: np.ndarray, tokens: list[int]) -> None:
            seen.append((len(tokens), pipe.decoder.last_inference_time()))

        tokens, reason = pipe.decode(first, SamplingOptions(max_new_tokens=4), on_step=on_step,
                                     sampler=lambda logits, done: forced[len(done)], stop_ids=())
        assert tokens == forced and reason == "max_new_tokens"  # EOS did not stop it
        assert [n for n, _ in seen] == [0, 1, 2, 3]
        assert all(t is not None and t > 0 for _, t in seen[1:])  # each step's session time
        pipe.reset()
        first = pipe.prefill(embeds, mask)
        tokens, reason = pipe.decode(first, SamplingOptions(max_new_tokens=4),
                                     sampler=lambda logits, done: forced[len(done)])
        assert tokens == [eos] and reason == "eos"  # default stop ids: EOS
        result = pipe.generate([], "hello", SamplingOptions(max_new_tokens=3))
        spans = ("vision_s", "time_to_first_token_s", "decode_s", "total_s")
        assert all(result.timings[k] >= 1 and float(result.timings[k]).is_integer() for k in spans)


def test_decode_steps_rebind_only_what_moved(art):
    """Steps after a prompt pass give the prompt pass's logits for the same positions, while a
    step binds only the mask's new width: the step buffers, logits and (in-place) cache stay
    bound, also across a truncation."""
    rng = np.random.default_rng(0)
    whole = decoder_runner(art)
    embeds = rng.standard_normal((1, 6, whole.hidden_size)).astype(np.float32)
    want = whole.forward(embeds, np.ones((1, 6), np.int64), np.arange(6)[None], all_logits=True).copy()
    whole.close()
    runner = decoder_runner(art)
    calls = counted_binds(runner)
    runner.forward(embeds[:, :3], np.ones((1, 3), np.int64), np.arange(3)[None])
    for position in range(3, 6):
        calls.clear()
        got = runner.forward(embeds[:, position:position + 1], np.ones((1, position + 1), np.int64),
                             np.array([[position]]))
        np.testing.assert_allclose(got[0], want[position], atol=1e-4)
    if runner.shared:
        assert calls == ["attention_mask"]
    runner.truncate(2)
    got = runner.forward(embeds[:, 2:3], np.ones((1, 3), np.int64), np.array([[2]]))
    np.testing.assert_allclose(got[0], want[2], atol=1e-4)
    runner.close()


MMCA = ("--vis-proj", "perceiver", "--enable-mmca-attention", "--seed", "1")  # as tests/test_batching.py
MMCA_CONCAT = (*MMCA, "--kv-cache", "concat")


@pytest.mark.parametrize("flags", [("--vis-proj", "perceiver"), MMCA, MMCA_CONCAT],
                         ids=["shared", "mmca-shared", "mmca-concat"])
def test_step_gives_forward_logits_and_binds_the_mask_in_place(exported, flags):
    """``step`` (the generation loop's call) and the base class's ``step`` (forward on the
    sliced buffers, what TensorRT runners use) give forward's logits. On the in-place cache an
    MMCA step binds only the mask's width, from the caller's buffer; a causal step binds
    nothing (its own full-width mask, whose tail stays zero whatever the caller's holds: here
    ones), also after a truncation."""
    art = exported(*flags)  # both made by other modules too (tests/test_batching.py)
    rng = np.random.default_rng(0)
    ref, runner = decoder_runner(art), decoder_runner(art, max_context=8)
    embeds = rng.standard_normal((1, 8, ref.hidden_size)).astype(np.float32)
    mask = np.ones((1, ref.max_context), np.int64)
    mask[0, 1:3] = 2  # image positions: MMCA's second softmax
    for r in (ref, runner):
        r.forward(embeds[:, :4], mask[:, :4], np.arange(4)[None])
    calls = counted_binds(runner)
    for position in range(4, 8):
        want = ref.forward(embeds[:, position:position + 1], mask[:, :position + 1],
                           np.array([[position]]))[0].copy()
        calls.clear()
        got = runner.step(embeds[0, position], mask, position)
        np.testing.assert_array_equal(got, want)
        assert runner.step_pick[0] == got.argmax()  # the graph's greedy pick, read in place
        if runner.shared and position > 4:
            assert calls == ([] if runner.full_width_mask else ["attention_mask"])
    assert runner.full_width_mask == (flags == ("--vis-proj", "perceiver"))
    with pytest.raises(ContextOverflow, match="8 cached \\+ 1 new position exceed the context of 8"):
        runner.step(embeds[0, 0], mask, 8)
    runner.truncate(5)
    ref.truncate(5)
    for position in (5, 6):  # after a truncation: the full-width mask is rebuilt from the caller's
        want = ref.forward(embeds[:, position:position + 1], mask[:, :position + 1],
                           np.array([[position]]))[0].copy()
        np.testing.assert_array_equal(runner.step(embeds[0, position], mask, position), want)
    runner.truncate(6)
    ref.truncate(6)
    got = DecoderRunner.step(runner, embeds[0, 6], mask, 6)  # the base class's step
    np.testing.assert_array_equal(got, ref.forward(embeds[:, 6:7], mask[:, :7], np.array([[6]]))[0])
    runner.truncate(6)
    for bad in (mask.astype(np.int32), mask[:, :6], np.ones((1, 16), np.int64)[:, ::2]):
        with pytest.raises(InputShapeError, match=r"a step's mask buffer must be C-contiguous int64 \[1, >= 8\]"):
            runner.step(embeds[0, 6], bad, 6)
    assert runner.past_length == 6
    ref.close()
    runner.close()


@pytest.mark.parametrize("flags", [("--vis-proj", "perceiver"), MMCA, MMCA_CONCAT],
                         ids=["shared", "mmca-shared", "mmca-concat"])
def test_step_from_a_table_gives_the_steps_logits(exported, flags):
    """``step_from`` (the generation loop feeding back a token: the row copied from the table
    through byte views) gives ``step``'s logits with the table's row, and binds no more than
    ``step`` does. A table it cannot view (another dtype) and a token outside the table go
    through ``step``: the same logits, numpy's IndexError; a full context still overflows."""
    art = exported(*flags)
    rng = np.random.default_rng(2)
    ref, runner = decoder_runner(art), decoder_runner(art, max_context=10)
    table = rng.standard_normal((7, ref.hidden_size)).astype(np.float32)
    mask = np.ones((1, ref.max_context), np.int64)
    mask[0, 1:3] = 2
    prompt = rng.standard_normal((1, 4, ref.hidden_size)).astype(np.float32)
    for r in (ref, runner):
        r.forward(prompt, mask[:, :4], np.arange(4)[None])
    calls = counted_binds(runner)
    for position, token in enumerate([3, 0, 6, 3], start=4):
        want = ref.step(table[token], mask, position).copy()
        calls.clear()
        np.testing.assert_array_equal(runner.step_from(table, token, mask, position), want)
        assert runner.step_pick[0] == want.argmax()
        if runner.shared and position > 4:
            assert calls == ([] if runner.full_width_mask else ["attention_mask"])
    want = ref.step(table[2], mask, 8).copy()
    np.testing.assert_array_equal(runner.step_from(table.astype(np.float64), 2, mask, 8), want)
    with pytest.raises(IndexError):
        runner.step_from(table, 7, mask, 9)
    runner.step_from(table, 1, mask, 9)
    with pytest.raises(ContextOverflow, match="10 cached \\+ 1 new position exceed the context of 10"):
        runner.step_from(table, 1, mask, 10)
    ref.close()
    runner.close()


def test_graphs_without_a_greedy_pick_still_load_and_decode_alike(art, tmp_path):
    """``next_token`` is optional in the contract (exports made before it lack it): such a graph
    loads, its runner has no ``step_pick``, and the generation loop takes the argmax itself,
    with the same tokens and logits as the graph's own pick gives."""
    import onnx

    from runtime import contract as c

    decoder = open_artifacts(art).decoder
    model = onnx.load(str(art / decoder.file.path))
    graph = model.graph
    graph.node.remove(next(n for n in graph.node if c.NEXT_TOKEN in n.output))
    graph.output.remove(next(o for o in graph.output if o.name == c.NEXT_TOKEN))
    onnx.save(model, str(tmp_path / "decoder.onnx"))
    old = OrtDecoderRunner(tmp_path / "decoder.onnx", decoder, threads=1)
    assert old.step_pick is None and not old.picks
    old.close()
    pipe = Pipeline.from_artifacts(art, threads=1)
    assert pipe.decoder.step_pick is not None
    runs = []
    for pick in (pipe.decoder.step_pick, None):
        pipe.decoder.step_pick = pick
        seen = []
        result = pipe.generate([], "Describe a picture.", SamplingOptions(max_new_tokens=12),
                               on_step=lambda logits, tokens, seen=seen: seen.append(logits.copy()))
        runs.append((result.tokens, np.stack(seen)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    pipe.close()


@pytest.mark.parametrize("flags", [("--vis-proj", "perceiver"), MMCA], ids=["causal", "mmca"])
def test_an_in_place_cache_on_the_device_gives_the_host_cache_logits(exported, flags):
    """The ort-cuda runner's cache: ONNX Runtime values on the provider's device, each bound
    once as past and present. Taken on the host here (``cache_device="cpu"``), through a prompt
    pass, steps, a truncation and a second prompt pass."""
    art = exported(*flags)
    rng = np.random.default_rng(1)
    host, device = decoder_runner(art, max_context=16), decoder_runner(art, max_context=16, cache_device="cpu")
    assert host.shared and device.cache_device == "cpu" and not device.slots
    values = [value for pair in device.cache.pairs for value in pair]
    assert all(not value.numpy().any() for value in values)  # zeros: attention kernels may read them
    assert len({value.data_ptr() for value in values}) == len(device.cache.pairs)  # one buffer each
    embeds = rng.standard_normal((1, 9, host.hidden_size)).astype(np.float32)
    mask = np.ones((1, 16), np.int64)
    mask[0, 2:4] = 2
    for runner in (host, device):
        runner.forward(embeds[:, :5], mask[:, :5], np.arange(5)[None])
    for position in range(5, 7):
        want = host.step(embeds[0, position], mask, position).copy()
        np.testing.assert_array_equal(device.step(embeds[0, position], mask, position), want)
    for runner in (host, device):
        runner.truncate(3)
    want = host.forward(embeds[:, 3:9], mask[:, :9], np.arange(3, 9)[None], all_logits=True).copy()
    np.testing.assert_array_equal(device.forward(embeds[:, 3:9], mask[:, :9], np.arange(3, 9)[None],
                                                 all_logits=True), want)
    host.close()
    device.close()


def copies_at_bind(runner: OrtDecoderRunner) -> None:
    """Make the runner's binding behave as ONNX Runtime's does for a device session: a host
    input is copied when it is bound (here into an array of the fake's own), so writes to the
    buffer after its bind do not reach the graph."""
    import ctypes

    binding = runner.binding
    snapshots: dict[str, np.ndarray] = {}

    class CopyAtBind:
        def bind_input(self, name, device, dtype, shape, pointer):
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            data = bytes((ctypes.c_char * size).from_address(pointer))
            snapshots[name] = snapshot = np.frombuffer(data, dtype).reshape(shape).copy()
            binding._raw_binding.bind_input(name, device, dtype, shape, snapshot.ctypes.data)

        def bind_output(self, name, *args):
            binding._raw_binding.bind_output(name, *args)

    binding.raw = CopyAtBind()


@pytest.mark.parametrize("flags", [("--vis-proj", "perceiver"), ("--vis-proj", "perceiver", "--kv-cache", "concat")],
                         ids=["in-place", "concat"])
def test_a_device_session_binds_its_host_inputs_again_before_each_run(exported, flags):
    """On a device, ONNX Runtime copies a bound host input at its bind: the runner's buffers,
    written after their bind (the step's embedding, position and full-width mask), would feed
    stale values. With ``copies_inputs`` every host input is bound again before each run, and
    the prompt pass, steps (``step`` and ``step_from``), a truncation and a second prompt pass
    give the host session's logits exactly; without it, they do not (as on an H200)."""
    art = exported(*flags)
    rng = np.random.default_rng(2)
    host = decoder_runner(art, max_context=16)
    devices = {}
    for copies in (True, False):
        devices[copies] = decoder_runner(art, max_context=16, cache_device="cpu")
        copies_at_bind(devices[copies])
        devices[copies].binding.copies_inputs = copies
    table = rng.standard_normal((8, host.hidden_size)).astype(np.float32)
    embeds = rng.standard_normal((1, 9, host.hidden_size)).astype(np.float32)
    mask = np.ones((1, 16), np.int64)

    def session(runner) -> list[np.ndarray]:
        out = [runner.forward(embeds[:, :5], mask[:, :5], np.arange(5)[None]).copy()]
        out += [runner.step(embeds[0, 5], mask, 5).copy()]
        out += [runner.step_from(table, token, mask, 6 + token).copy() for token in range(2)]
        runner.truncate(3)
        out.append(runner.forward(embeds[:, 3:9], mask[:, :9], np.arange(3, 9)[None], all_logits=True).copy())
        out += [runner.step_from(table, 3, mask, 9).copy()]
        return out

    want = session(host)
    for got, expected in zip(session(devices[True]), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    try:  # stale inputs: wrong logits, or the error an H200 gave (a zero mask's length, -1)
        stale = session(devices[False])
        assert any(not np.array_equal(got, expected) for got, expected in zip(stale, want, strict=True))
    except RuntimeError as err:
        assert "seqlens_k[0] = -1" in str(err)
    for runner in (host, *devices.values()):
        runner.close()


def test_ping_pong_cache_bookkeeping():
    heads, dim, context = 2, 3, 6
    copies = []

    def compact(src: np.ndarray, dst: np.ndarray, old: int, new: int) -> None:
        copies.append((old, new))
        dst[: heads * new * dim].reshape(heads, new, dim)[:] = \
            src[: heads * old * dim].reshape(heads, old, dim)[:, :new]

    pairs = [(np.zeros(heads * context * dim), np.zeros(heads * context * dim)) for _ in range(2)]
    cache = PingPongCache(pairs, context, compact)
    written = np.arange(heads * 4 * dim, dtype=float)
    for index in range(2):
        cache.present(index)[: written.size] = written + index
    cache.advance(4)
    assert cache.length == 4 and cache.past(0) is pairs[0][1]
    cache.truncate(2)
    assert copies == [(4, 2), (4, 2)] and cache.length == 2 and cache.past(0) is pairs[0][0]
    want = written.reshape(heads, 4, dim)[:, :2].ravel()
    np.testing.assert_array_equal(cache.past(1)[: want.size], want + 1)
    cache.truncate(2)  # nothing to drop
    cache.truncate(0)
    assert copies == [(4, 2), (4, 2)] and cache.length == 0
    with pytest.raises(UserError, match="cannot truncate a 0-position cache to 1"):
        cache.truncate(1)
    shared = PingPongCache([(b, b) for b, _ in pairs], context, in_place=True)
    shared.advance(5)
    shared.truncate(3)
    assert shared.length == 3 and shared.past(0) is shared.present(0)
    with pytest.raises(TypeError, match="needs a compact function"):
        PingPongCache(pairs, context)


def test_vision_input_is_checked_against_the_export(art):
    with Pipeline.from_artifacts(art, threads=1) as pipe:
        size = pipe.artifacts.vision.image_size  # a fixed-resolution export
        with pytest.raises(InputShapeError, match=rf"pixel_values must be a float array \[images, 3, "
                                                  rf"{size}, {size}\]; got float32 \(1, 3, 8, 8\)"):
            pipe.vision.encode(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(InputShapeError, match="holds no image"):
            pipe.vision.encode(np.zeros((0, 3, size, size), np.float32))
        assert pipe.vision.encode(np.zeros((2, 3, size, size), np.float32)).shape[0] == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_generated_code_compares_the_rows_as_floats(dtype):
    """A generated token's source code: even where its prompt-table row equals its decoder-table
    row as np.array_equal sees it (-0.0 equals 0.0, NaN equals nothing), else odd; float32
    tables through memoryviews, others through numpy."""
    from types import SimpleNamespace

    prompt = np.arange(12, dtype=dtype).reshape(4, 3)
    decoder = prompt.copy()
    decoder[1, 2] = 7  # differs
    prompt[2, 0], decoder[2, 0] = 0.0, -0.0  # equal as floats
    prompt[3, 1] = decoder[3, 1] = np.nan  # NaN equals nothing
    artifacts = SimpleNamespace(prompt_embeddings=prompt, decoder_embeddings=decoder, tokenizer=None)
    pipe = Pipeline(artifacts, None, SimpleNamespace(max_context=4))
    assert (pipe._row_values is not None) == (dtype == np.float32)
    assert [pipe.generated_code(t) for t in range(4)] == [0, 3, 4, 7]
    with pytest.raises(IndexError):
        pipe.generated_code(4)
