"""Backend selection: ``ort-cpu`` (default), ``ort-cuda``, ``ort-trt`` (ONNX Runtime execution
providers) and ``trt`` (native TensorRT engines built by ``python -m export.engine``)."""

from __future__ import annotations

from runtime.errors import UserError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")


def load_runners(artifacts, backend: str = "ort-cpu", max_context: int | None = None, threads: int = 0,
                 huge_pages: bool = True):
    """(vision runner, decoder runner) for an opened ``runtime.artifacts.Artifacts``;
    ``huge_pages``: see ``OrtDecoderRunner``."""
    from runtime.backends.errors import BackendUnavailable

    if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
        raise UserError(f"--max-context {max_context} must be a positive number of positions "
                         "(leave it out for the model's maximum)")
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    root = artifacts.root
    if backend == "trt":
        from runtime.backends import trt

        return trt.load(root, artifacts.manifest, max_context)
    from runtime.backends.ort import OrtDecoderRunner, OrtVisionRunner

    vision = OrtVisionRunner(root / artifacts.vision.file.path, artifacts.vision, backend, threads)
    try:
        decoder = OrtDecoderRunner(root / artifacts.decoder.file.path, artifacts.decoder, backend,
                                   max_context, threads, huge_pages=huge_pages)
    except BaseException:
        vision.close()
        raise
    return vision, decoder
