"""runtime/backends/ort_graphs.py: the vision encoder's CUDA-graph path, its bookkeeping run on a
CPU session with host buffers (capture itself needs a GPU: tests/test_ort_cuda.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import contract as c
from runtime.artifacts import open_artifacts
from runtime.backends.errors import BackendUnavailable
from runtime.backends.ort import OrtVisionRunner
from runtime.backends.ort_graphs import GRAPH_ID_OPTION, ImageCountGraphs


@pytest.fixture(scope="module")
def vision(exported):
    artifacts = open_artifacts(exported("--vis-proj", "baseline"))
    return artifacts.root / artifacts.vision.file.path, artifacts.vision


def test_each_image_count_keeps_its_buffers_and_gives_the_sessions_output(vision):
    path, spec = vision
    runner = OrtVisionRunner(path, spec)  # the plain session: what each replay must give
    replays = ImageCountGraphs(runner.session, "cpu", runner.output_shape, runner.dtype)
    rng = np.random.default_rng(0)
    first = {}
    for count in (1, 3, 1, 2, 3):
        pixels = rng.standard_normal((count, 3, spec.image_size, spec.image_size)).astype(np.float32)
        got = replays.run(pixels)
        want = runner.session.run([c.VISION_OUTPUT], {c.VISION_INPUT: pixels})[0]
        np.testing.assert_array_equal(got, want)
        slot = replays.slots[count]
        first.setdefault(count, (slot, slot.pixels.data_ptr(), slot.embeds.data_ptr(), got))
        # the same buffers every call: a captured graph has their addresses baked in
        assert (slot, slot.pixels.data_ptr(), slot.embeds.data_ptr()) == first[count][:3]
    assert sorted(replays.slots) == [1, 2, 3]
    assert {s.options.get_run_config_entry(GRAPH_ID_OPTION) for s in replays.slots.values()} == {"1", "2", "3"}
    replays._wait_for_copies()  # a device's fence (one float read back), made once
    fence = replays.fence
    replays._wait_for_copies()
    assert replays.fence is fence and fence.numpy().shape == (1,)
    # an answer is the caller's: the next call of its count does not overwrite it
    answer = first[1][3]
    kept = answer.copy()
    replays.run(np.ones((1, 3, spec.image_size, spec.image_size), np.float32))
    np.testing.assert_array_equal(answer, kept)


def test_cuda_graphs_are_refused_off_ort_cuda_in_one_line(vision):
    path, spec = vision
    with pytest.raises(BackendUnavailable, match="ort-cuda for a fixed-resolution export; this is --backend ort-cpu$"):
        OrtVisionRunner(path, spec, cuda_graph=True)


def test_the_cuda_session_asks_for_graph_capture(monkeypatch):
    from pathlib import Path

    from runtime.backends import ort as backend

    seen: dict = {}
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, providers: seen.update(providers=providers))
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(backend.PROVIDERS.values()))
    backend.make_session(Path("vision.onnx"), "ort-cuda", fp16=True, cuda_graph=True)
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"use_tf32": "0", "enable_cuda_graph": "1"})
