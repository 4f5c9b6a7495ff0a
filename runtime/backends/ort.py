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

PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class ContextOverflow(ValueError):
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


class OrtVisionRunner:
    def __init__(self, path: Path, backend: str = "ort-cpu", fp16: bool = False, threads: int = 0):
        self.session = make_session(path, backend, fp16, threads)
        self.dtype = np.float16 if fp16 else np.float32

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        out = self.session.run([c.VISION_OUTPUT], {c.VISION_INPUT: pixel_values.astype(self.dtype)})[0]
        return out.astype(np.float32, copy=False)


class OrtDecoderRunner:
    def __init__(self, path: Path, spec: dict, backend: str = "ort-cpu", max_context: int | None = None,
                 threads: int = 0):
        fp16 = spec["io_dtype"] == "float16"
        self.session = make_session(path, backend, fp16, threads)
        self.dtype = np.float16 if fp16 else np.float32
        self.num_layers = spec["num_layers"]
        self.heads, self.head_dim = spec["num_kv_heads"], spec["head_dim"]
        self.vocab = spec["vocab_size"]
        self.max_context = min(max_context or spec["max_position_embeddings"], spec["max_position_embeddings"])
        size = self.heads * self.max_context * self.head_dim
        # cache[side][layer][0=key, 1=value]: flat buffers, viewed at the current length.
        self.cache = [[[np.zeros(size, self.dtype) for _ in range(2)] for _ in range(self.num_layers)]
                      for _ in range(2)]
        self.side, self.length = 0, 0
        self.step_logits = np.empty((1, 1, self.vocab), self.dtype)
        self.binding = self.session.io_binding()

    @property
    def past_length(self) -> int:
        return self.length

    def forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                all_logits: bool = False) -> np.ndarray:
        seq = inputs_embeds.shape[1]
        total = self.length + seq
        if total > self.max_context:
            raise ContextOverflow(f"{total} positions exceed the context of {self.max_context}")
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(c.INPUTS_EMBEDS, np.ascontiguousarray(inputs_embeds, self.dtype))
        binding.bind_cpu_input(c.ATTENTION_MASK, np.ascontiguousarray(attention_mask, np.int64))
        binding.bind_cpu_input(c.POSITION_IDS, np.ascontiguousarray(position_ids, np.int64))
        past_shape = [1, self.heads, self.length, self.head_dim]
        present_shape = [1, self.heads, total, self.head_dim]
        for layer in range(self.num_layers):
            src, dst = self.cache[self.side][layer], self.cache[1 - self.side][layer]
            for kind, (past_name, present_name) in enumerate(
                    ((c.past_key_name(layer), c.present_key_name(layer)),
                     (c.past_value_name(layer), c.present_value_name(layer)))):
                binding.bind_input(past_name, "cpu", 0, self.dtype, past_shape, src[kind].ctypes.data)
                binding.bind_output(present_name, "cpu", 0, self.dtype, present_shape, dst[kind].ctypes.data)
        logits = self.step_logits if seq == 1 else np.empty((1, seq, self.vocab), self.dtype)
        binding.bind_output(c.LOGITS, "cpu", 0, self.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.side, self.length = 1 - self.side, total
        out = logits[0] if all_logits else logits[0, -1:]
        return out.astype(np.float32)  # a copy: the step buffer is reused next step

    def truncate(self, length: int) -> None:
        """Drop cached positions past ``length`` (chat rollback): compacts [H, len, D] per head."""
        if length >= self.length:
            return
        if length == 0:
            self.length = 0
            return
        for layer in range(self.num_layers):
            for kind in range(2):
                src = self.cache[self.side][layer][kind]
                dst = self.cache[1 - self.side][layer][kind]
                view = src[: self.heads * self.length * self.head_dim].reshape(self.heads, self.length, -1)
                dst[: self.heads * length * self.head_dim].reshape(self.heads, length, -1)[:] = view[:, :length]
        self.side, self.length = 1 - self.side, length
