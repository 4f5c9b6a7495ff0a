"""ONNX Runtime backend (CPU, CUDA or TensorRT execution provider).

The decoder's KV cache lives in preallocated host buffers, two per layer and tensor, sized for
the whole context. IO binding points ``past_key_values.*`` at one buffer and ``present.*`` at
the other, then the roles swap: ONNX Runtime writes the grown cache straight into place and
Python never copies it. Layout [1, kv_heads, length, head_dim] is contiguous for any length, so
a buffer holds a cache of any length up to the context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import contract as c
from runtime.backends.errors import BackendUnavailable
from runtime.errors import UserError

PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class ContextOverflow(UserError):
    """More positions than the KV cache (the model's context) holds."""


def make_session(path: Path, backend: str, fp16: bool, threads: int = 0):
    import onnxruntime as ort

    provider = PROVIDERS[backend]
    if provider not in ort.get_available_providers():
        raise BackendUnavailable(
            f"--backend {backend} needs ONNX Runtime's {provider}, which this onnxruntime build "
            f"lacks (it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
            "or pick --backend ort-cpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if fp16 and backend == "ort-cpu":
        # ORT 1.32's extended CPU fusions segfault on some fp16 graphs (docs/notes.md).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    provider_options: dict = {}
    if backend == "ort-trt":
        cache = path.parent / c.ENGINES_DIR / "ort-trt"
        provider_options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache)}
    providers = [(provider, provider_options)]
    if backend != "ort-cpu":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(str(path), options, providers=providers)


def check_graph(session, path: Path, inputs: dict[str, dict[int, int]], outputs: list[str]) -> None:
    """The graph has the manifest's tensors and sizes: a mismatch is an artefact error here, not
    an ONNX Runtime error mid-generation. ``inputs`` maps names to {axis: expected size}."""
    have = {arg.name: arg.shape for arg in session.get_inputs()}
    missing = [name for name in inputs if name not in have]
    missing += [name for name in outputs if name not in {arg.name for arg in session.get_outputs()}]
    if missing:
        raise c.ArtifactError(f"{path} has no tensor {missing[0]} that manifest.json implies: mixed "
                              "exports; re-run export.all")
    extra = [name for name in have if name not in inputs]
    if extra:
        raise c.ArtifactError(f"{path} takes an input {extra[0]} that manifest.json does not imply: "
                              "mixed exports; re-run export.all")
    for name, axes in inputs.items():
        for axis, size in axes.items():
            dim = have[name][axis] if axis < len(have[name]) else None
            if isinstance(dim, int) and dim != size:
                raise c.ArtifactError(f"{path}: {name} has size {dim} on axis {axis}, manifest.json "
                                      f"says {size}: mixed exports; re-run export.all")


class OrtVisionRunner:
    def __init__(self, path: Path, backend: str = "ort-cpu", fp16: bool = False, threads: int = 0,
                 image_size: tuple[int, int] | None = None):
        """``image_size``: the preprocessor's (height, width), checked against the graph's input."""
        self.session = make_session(path, backend, fp16, threads)
        self.dtype = c.numpy_dtype("float16" if fp16 else "float32")
        axes = {2: image_size[0], 3: image_size[1]} if image_size else {}
        check_graph(self.session, path, {c.VISION_INPUT: axes}, [c.VISION_OUTPUT])

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        out = self.session.run([c.VISION_OUTPUT], {c.VISION_INPUT: pixel_values.astype(self.dtype)})[0]
        return out.astype(np.float32, copy=False)


class FastBinding:
    """IO binding without per-call overhead: the public ``IOBinding.bind_*`` builds a device
    object on every call, which costs ~1 ms per decode step over 33 tensors. This caches the
    CPU device and falls back to the public API where the internals differ."""

    def __init__(self, session):
        self.binding = session.io_binding()
        self.raw = getattr(self.binding, "_iobinding", None)
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            self.device = OrtDevice.make("cpu", 0)._get_c_device()
        except (ImportError, AttributeError):
            self.raw = None

    def input(self, name: str, dtype, shape: list[int], pointer: int) -> None:
        if self.raw is not None:
            self.raw.bind_input(name, self.device, dtype, shape, pointer)
        else:
            self.binding.bind_input(name, "cpu", 0, dtype, shape, pointer)

    def output(self, name: str, dtype, shape: list[int], pointer: int) -> None:
        if self.raw is not None:
            self.raw.bind_output(name, self.device, dtype, shape, pointer)
        else:
            self.binding.bind_output(name, "cpu", 0, dtype, shape, pointer)


class OrtDecoderRunner:
    def __init__(self, path: Path, spec: dict, backend: str = "ort-cpu", max_context: int | None = None,
                 threads: int = 0):
        fp16 = spec["io_dtype"] == c.io_dtype("fp16")
        self.session = make_session(path, backend, fp16, threads)
        cache_axes = {1: spec["num_kv_heads"], 3: spec["head_dim"]}
        # A fused graph computes the LM head for the last position only when asked to.
        self.keeps_logits = spec.get("graph") == "fused"
        check_graph(self.session, path,
                    {c.INPUTS_EMBEDS: {2: spec["hidden_size"]}, c.ATTENTION_MASK: {}, c.POSITION_IDS: {}}
                    | {name: cache_axes for name in c.decoder_input_names(spec["num_layers"])[3:]}
                    | ({c.LOGITS_TO_KEEP: {}} if self.keeps_logits else {}),
                    c.decoder_output_names(spec["num_layers"]))
        self.keep = {True: np.array(0, np.int64), False: np.array(1, np.int64)}  # by all_logits
        self.dtype = c.numpy_dtype(spec["io_dtype"])
        self.num_layers = spec["num_layers"]
        self.heads, self.head_dim = spec["num_kv_heads"], spec["head_dim"]
        self.vocab = spec["vocab_size"]
        limit = spec["max_position_embeddings"]
        self.max_context = limit if max_context is None else min(max_context, limit)
        # "shared-buffer": the graph updates one [1, H, max_context, D] buffer in place
        # (GroupQueryAttention); "concat": ping-pong between two buffers, see the module doc.
        self.shared = spec.get("kv_cache") == "shared-buffer"
        size = self.heads * self.max_context * self.head_dim
        # cache[side][layer][0=key, 1=value]: flat buffers, viewed at the current length.
        sides = 1 if self.shared else 2
        self.cache = [[[np.zeros(size, self.dtype) for _ in range(2)] for _ in range(self.num_layers)]
                      for _ in range(sides)]
        self.cache *= 2 // sides  # shared: both "sides" are the same buffers
        # (past name, present name, buffer address on side 0, on side 1) for every cache tensor.
        self.slots = [(past, present, self.cache[0][layer][kind].ctypes.data,
                       self.cache[1][layer][kind].ctypes.data)
                      for layer in range(self.num_layers)
                      for kind, (past, present) in enumerate(
                          ((c.past_key_name(layer), c.present_key_name(layer)),
                           (c.past_value_name(layer), c.present_value_name(layer))))]
        self.side, self.length = 0, 0
        self.step_logits = np.empty((1, 1, self.vocab), self.dtype)
        self.binding = FastBinding(self.session)

    @property
    def past_length(self) -> int:
        return self.length

    def forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        """See DecoderRunner. The returned logits are valid until the next call."""
        seq = inputs_embeds.shape[1]
        total = self.length + seq
        if total > self.max_context:
            raise ContextOverflow(f"{total} positions exceed the context of {self.max_context}")
        bind = self.binding
        embeds = np.ascontiguousarray(inputs_embeds, self.dtype)
        mask = np.ascontiguousarray(attention_mask, np.int64)
        positions = np.ascontiguousarray(position_ids, np.int64)
        bind.input(c.INPUTS_EMBEDS, self.dtype, list(embeds.shape), embeds.ctypes.data)
        bind.input(c.ATTENTION_MASK, np.int64, list(mask.shape), mask.ctypes.data)
        bind.input(c.POSITION_IDS, np.int64, list(positions.shape), positions.ctypes.data)
        if self.shared:
            past_shape = present_shape = [1, self.heads, self.max_context, self.head_dim]
        else:
            past_shape = [1, self.heads, self.length, self.head_dim]
            present_shape = [1, self.heads, total, self.head_dim]
        for past, present, *addresses in self.slots:  # read one side, write the other
            bind.input(past, self.dtype, past_shape, addresses[self.side])
            bind.output(present, self.dtype, present_shape, addresses[1 - self.side])
        rows = seq
        if self.keeps_logits:
            bind.input(c.LOGITS_TO_KEEP, np.int64, [], self.keep[all_logits].ctypes.data)
            rows = seq if all_logits else 1
        logits = self.step_logits if rows == 1 else np.empty((1, rows, self.vocab), self.dtype)
        bind.output(c.LOGITS, self.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(bind.binding)
        self.side, self.length = 1 - self.side, total
        out = logits[0] if all_logits else logits[0, -1:]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def truncate(self, length: int) -> None:
        """Drop cached positions past ``length`` (chat rollback): compacts [H, len, D] per head."""
        if length >= self.length:
            return
        if length == 0 or self.shared:  # shared: later steps overwrite positions >= length
            self.length = length
            return
        for layer in range(self.num_layers):
            for kind in range(2):
                src = self.cache[self.side][layer][kind]
                dst = self.cache[1 - self.side][layer][kind]
                view = src[: self.heads * self.length * self.head_dim].reshape(self.heads, self.length, -1)
                dst[: self.heads * length * self.head_dim].reshape(self.heads, length, -1)[:] = view[:, :length]
        self.side, self.length = 1 - self.side, length
