"""runtime.backends.ort.make_session's provider choices, read from what it hands ONNX Runtime
(a stand-in session class: no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from runtime.backends import ort as backend


@pytest.fixture
def handed(monkeypatch) -> dict:
    """What make_session passes to ``InferenceSession``, with every provider available."""
    seen: dict = {}

    def session(path, options, providers):
        seen.update(path=path, options=options, providers=providers)
        return seen

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(backend.PROVIDERS.values()))
    return seen


def test_cuda_multiplies_fp32_in_fp32_with_the_cpu_provider_behind(handed):
    backend.make_session(Path("decoder.onnx"), "ort-cuda", fp16=False)
    assert handed["providers"] == [("CUDAExecutionProvider", {"use_tf32": "0"}), ("CPUExecutionProvider", {})]


def test_the_cpu_provider_takes_no_options(handed):
    backend.make_session(Path("decoder.onnx"), "ort-cpu", fp16=False)
    assert handed["providers"] == [("CPUExecutionProvider", {})]
