"""TensorRT backend: the VisionRunner and DecoderRunner over engines from export/engine.py.

Inputs are copied to the GPU, outputs back; everything else stays on the device. The KV cache
is two preallocated device buffers per layer and tensor (key, value), each large enough for
``max_context`` positions (runtime/backends/base.py: PingPongCache). The engine's ``present``
output is ``past + seq`` positions laid out contiguously as [1, kv_heads, past + seq, head_dim],
so a step binds ``past`` to the current buffer (shape [1, H, past, D]) and ``present`` to the
other one, then swaps: no host copy and no reallocation. The price is that the engine rewrites
the whole past every step (that is what ``present = concat(past, new)`` means) and the cache
takes twice its logical size.

Decoder profiles (export/engine.py): ``prompt`` (nothing cached), ``append`` (a later prompt or
chat turn over a non-empty cache) and ``decode`` (one position). Each call picks the narrowest
profile that holds its shapes, which derives "first prompt" from ``past_length == 0``; an
append longer than the append profile is split into chunks where that is exact. On GPUs that
share memory with the CPU (Jetson) the context allocates activation memory per selected
profile (ON_PROFILE_CHANGE) instead of the largest profile's for good (STATIC).

Every plan's size and sha256 are checked against the manifest before TensorRT reads it (the
full hash once; runtime/integrity.py's stamp keeps later loads fast). Every TensorRT call that
can fail is checked (a profile switch raises, ``set_input_shape``, ``set_tensor_address`` and
``execute_async_v3`` return False) and reported in one line naming the tensor, profile and
shapes.

Importing this module raises ``BackendUnavailable`` where TensorRT or cuda-python is missing, so
callers import it only when the TensorRT backend is asked for. No torch.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime import contract
from runtime import graphs as g
from runtime.backends import cuda
from runtime.backends.base import DecoderRunner, PingPongCache, VisionRunner
from runtime.backends.cuda import DeviceBuffer, check
from runtime.backends.errors import (
    BackendUnavailable,
    EngineCallError,
    EngineMismatch,
    check_engine_metadata,
    rebuild_command,
)
from runtime.errors import ArtifactError, UserError
from runtime.half import convert
from runtime.integrity import check_files
from runtime.manifest import EngineEntry, FileEntry, Manifest, read_manifest

try:
    import tensorrt as trt
except (ImportError, OSError) as _err:
    raise BackendUnavailable(
        f"TensorRT is not installed ({_err}): `pip install tensorrt`, or on Jetson use "
        "JetPack 6.1+'s python3-libnvinfer (a venv needs --system-site-packages)") from _err

cuda.cudart()  # cuda-python missing: BackendUnavailable now, not at the first copy


def allocation_strategy(integrated: bool) -> Any:
    """ON_PROFILE_CHANGE where the GPU shares the board's memory: a context then holds the
    selected profile's activations, not the largest profile's for its whole life (kSTATIC,
    the default; NvInferRuntime.h ExecutionContextAllocationStrategy)."""
    strategies = trt.ExecutionContextAllocationStrategy
    return strategies.ON_PROFILE_CHANGE if integrated else strategies.STATIC


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    name = contract.tensorrt_dtype_name(trt_dtype)
    if name not in contract.NUMPY_DTYPES:
        raise BackendUnavailable(f"engine tensor type {name} has no numpy equivalent here")
    return np.dtype(contract.numpy_dtype(name))


# --- the KV cache ---------------------------------------------------------------------------


class KVCache(PingPongCache[DeviceBuffer]):
    """Ping-pong device buffers, [kv_heads, max_context, head_dim] each, for every cache tensor
    (``contract.cache_name_pairs`` order). Truncating copies head h's first positions from
    h*length*D to h*new*D, as one cudaMemcpy2D per tensor into the idle buffer: the copy never
    overlaps itself."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_context: int,
                 itemsize: int, stream: Any):
        self.kv_heads, self.head_dim, self.stream = kv_heads, head_dim, stream
        self.position_bytes = head_dim * itemsize  # one position of one head
        nbytes = kv_heads * max_context * self.position_bytes
        pairs = [(DeviceBuffer(nbytes), DeviceBuffer(nbytes)) for _ in range(2 * num_layers)]
        super().__init__(pairs, max_context, self._compact)

    def _compact(self, src: DeviceBuffer, dst: DeviceBuffer, old: int, new: int) -> None:
        width = new * self.position_bytes
        src.copy_rows(dst, self.kv_heads, old * self.position_bytes, width, width, self.stream)

    def free(self) -> None:
        for pair in self.pairs:
            for buffer in pair:
                buffer.free()


# --- engines --------------------------------------------------------------------------------


class _Engine:
    """A plan checked against this machine, deserialized, with a context and a stream."""

    def __init__(self, artifacts: Path, manifest: Manifest, kind: str):
        meta: EngineEntry | None = getattr(manifest.engines, kind) if manifest.engines else None
        if meta is None:
            raise BackendUnavailable(f"no {kind} engine in {artifacts}: build it with "
                                     f"`{rebuild_command(artifacts)}`")
        path = artifacts / meta.file
        if not path.is_file():
            raise BackendUnavailable(f"{path} not found: build it with "
                                     f"`{rebuild_command(artifacts)}`")
        gpu = cuda.gpu_info()
        source = getattr(manifest, kind)
        self.warnings = check_engine_metadata(
            meta, name=kind, artifacts=artifacts, tensorrt_version=trt.__version__,
            gpu_name=gpu.name, compute_capability=gpu.compute_capability,
            onnx_sha256=source.file.sha256 if source is not None else None)
        for message in self.warnings:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        # the plan the manifest recorded, byte for byte, before TensorRT parses it
        check_files(artifacts, [FileEntry(meta.file, meta.bytes, meta.sha256)], verify_hash=True,
                    remedy=f"rebuild with `{rebuild_command(artifacts)}`")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if meta.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the plan embeds its lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not load {path} on "
                                 f"'{gpu.name}': rebuild with `{rebuild_command(artifacts)}`")
        self.kind = kind
        self.allocation = allocation_strategy(gpu.integrated)
        self.context = self.engine.create_execution_context(self.allocation)
        if self.context is None:
            raise EngineCallError(f"TensorRT could not create an execution context for {path} "
                                  f"({self.allocation.name} allocation): out of GPU memory?")
        self.stream = check(cuda.cudart().cudaStreamCreate())
        self.stream_handle = int(self.stream)
        self.profile = 0  # "The newly created execution context will be assigned profile 0."

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.engine.get_tensor_dtype(name))

    def profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        """[min, opt, max] shapes of an input in one optimization profile."""
        return [tuple(shape) for shape in self.engine.get_tensor_profile_shape(name, index)]

    def use_profile(self, index: int) -> None:
        """The binding raises RuntimeError when the switch fails (pyCore.cpp wraps
        setOptimizationProfileAsync in PY_ASSERT_RUNTIME_ERROR); with ON_PROFILE_CHANGE that
        includes failing to allocate the profile's memory."""
        if index == self.profile:
            return
        try:
            ok = self.context.set_optimization_profile_async(index, self.stream_handle)
        except RuntimeError as err:
            ok, detail = False, str(err)
        else:
            detail = "it returned False"
        if not ok:
            raise EngineCallError(f"TensorRT could not switch the {self.kind} engine from profile "
                                  f"{self.profile} to {index} ({detail}; "
                                  f"{self.allocation.name} allocation): out of GPU memory?")
        self.profile = index

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        try:
            ok = self.context.set_input_shape(name, tuple(int(d) for d in shape))
        except (RuntimeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"TensorRT refused shape {tuple(shape)} for '{name}' in {self.kind} "
                             f"engine profile {self.profile} (outside the profile's min..max)")

    def bind(self, name: str, address: int) -> None:
        """set_tensor_address returns False for an unknown name or a misaligned address."""
        if not self.context.set_tensor_address(name, address):
            raise EngineCallError(f"TensorRT refused the device address {address:#x} for "
                                  f"'{name}' in the {self.kind} engine (unknown tensor or not "
                                  "256-byte aligned)")

    def execute(self, what: str) -> None:
        if not self.context.execute_async_v3(self.stream_handle):
            raise EngineCallError(f"TensorRT {self.kind} execution failed for {what} on profile "
                                  f"{self.profile} (see TensorRT's messages above)")

    def synchronize(self) -> None:
        check(cuda.cudart().cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            cuda.cudart().cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = None


def _load_manifest(artifacts: Path | str, manifest: Manifest | None) -> Manifest:
    return manifest if manifest is not None else read_manifest(artifacts)


class TRTVisionRunner(VisionRunner):
    """vision.plan: pixel_values [images, 3, H, W] -> image_embeds, float32 on the host."""

    def __init__(self, artifacts: Path | str, manifest: Manifest | None = None, clock=None):
        super().__init__(clock)
        self.artifacts = Path(artifacts)
        self._engine = _Engine(self.artifacts, _load_manifest(artifacts, manifest), "vision")
        engine = self._engine
        lo, _, hi = engine.profile_shape(contract.VISION_INPUT, 0)
        self.max_images, self.size_range = hi[0], (lo[2:], hi[2:])
        self.input_dtype = engine.dtype(contract.VISION_INPUT)
        self.output_dtype = engine.dtype(contract.VISION_OUTPUT)
        engine.set_shape(contract.VISION_INPUT, hi)  # size the output at the largest input
        out_max = tuple(engine.context.get_tensor_shape(contract.VISION_OUTPUT))
        self._input = DeviceBuffer(math.prod(hi) * self.input_dtype.itemsize)
        self._output = DeviceBuffer(math.prod(out_max) * self.output_dtype.itemsize)
        engine.bind(contract.VISION_INPUT, self._input.ptr)
        engine.bind(contract.VISION_OUTPUT, self._output.ptr)

    def _encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """Runs in chunks of the engine's largest image count."""
        (lo_h, lo_w), (hi_h, hi_w) = self.size_range
        h, w = pixel_values.shape[2:]
        if not (lo_h <= h <= hi_h and lo_w <= w <= hi_w):
            raise UserError(f"{h}x{w} px is outside the engine's {lo_h}x{lo_w}..{hi_h}x{hi_w}: "
                            f"rebuild with `{rebuild_command(self.artifacts)} --resolution ...`")
        engine, chunks, spent = self._engine, [], 0.0
        for start in range(0, len(pixel_values), self.max_images):
            chunk = convert(pixel_values[start:start + self.max_images], self.input_dtype)
            engine.set_shape(contract.VISION_INPUT, chunk.shape)
            with self.timed():
                staged = self._input.upload(chunk, engine.stream)
                engine.execute(f"pixel_values {chunk.shape}")
                shape = tuple(engine.context.get_tensor_shape(contract.VISION_OUTPUT))
                out = self._output.download(np.empty(shape, self.output_dtype), engine.stream)
                engine.synchronize()
            spent += self.last_inference_time() or 0.0
            del staged
            chunks.append(convert(out, np.float32))
        self._last_time = spent
        return np.concatenate(chunks)

    def _release(self) -> None:
        self._input.free()
        self._output.free()
        self._engine.close()


class TRTDecoderRunner(DecoderRunner):
    """decoder.plan with its KV cache on the device (see the module docstring)."""

    def __init__(self, artifacts: Path | str, manifest: Manifest | None = None,
                 max_context: int | None = None, clock=None):
        """``max_context``: at most this many positions (the engine's profiles set the most)."""
        super().__init__(clock)
        self.artifacts = Path(artifacts)
        manifest = _load_manifest(artifacts, manifest).require("decoder", root=self.artifacts)
        self._engine = engine = _Engine(self.artifacts, manifest, "decoder")
        self.num_layers = manifest.decoder.num_layers
        self._check_layers()
        self._profiles = [self._profile_ranges(i) for i in range(engine.engine.num_optimization_profiles)]
        built = max(p[g.TOTAL][1] for p in self._profiles)
        self.max_context = built if max_context is None else min(built, max_context)
        self.max_seq = max(p[g.SEQUENCE][1] for p in self._profiles)
        kv_shape = engine.profile_shape(contract.past_key_name(0), 0)[2]  # [1, H, past, D]
        self.hidden_size = engine.profile_shape(contract.INPUTS_EMBEDS, 0)[2][2]
        self.vocab = int(engine.engine.get_tensor_shape(contract.LOGITS)[2])
        self.dtypes = {name: engine.dtype(name) for name in
                       (contract.INPUTS_EMBEDS, contract.ATTENTION_MASK, contract.POSITION_IDS,
                        contract.LOGITS, contract.past_key_name(0))}
        self.cache = KVCache(self.num_layers, kv_shape[1], kv_shape[3], self.max_context,
                             self.dtypes[contract.past_key_name(0)].itemsize, engine.stream)
        self._buffers = {
            contract.INPUTS_EMBEDS: DeviceBuffer(self.max_seq * self.hidden_size * self._size(contract.INPUTS_EMBEDS)),
            contract.ATTENTION_MASK: DeviceBuffer(self.max_context * self._size(contract.ATTENTION_MASK)),
            contract.POSITION_IDS: DeviceBuffer(self.max_seq * self._size(contract.POSITION_IDS)),
            contract.LOGITS: DeviceBuffer(self.max_seq * self.vocab * self._size(contract.LOGITS)),
        }
        for name, buffer in self._buffers.items():
            engine.bind(name, buffer.ptr)
        self.mmca = manifest.decoder.enable_mmca_attention
        self.max_append = max((p[g.SEQUENCE][1] for p in self._profiles if p[g.PAST][1] > 0), default=0)

    def _size(self, name: str) -> int:
        return self.dtypes[name].itemsize

    def _check_layers(self) -> None:
        engine = self._engine.engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        layers = sum(1 for n in names if contract.is_past_name(n) and n.endswith(".key"))
        if layers != self.num_layers:
            raise EngineMismatch(f"decoder.plan has {layers} layers, the manifest {self.num_layers}:"
                                 f" rebuild with `{rebuild_command(self.artifacts)}`")
        missing = [n for n in self.graph.input_names + self.graph.output_names if n not in names]
        if missing:
            raise EngineMismatch(f"decoder.plan has no tensor {missing[0]}: rebuild with "
                                 f"`{rebuild_command(self.artifacts)}`")
        present, past = contract.present_key_name(0), contract.past_key_name(0)
        if self._engine.dtype(present) != self._engine.dtype(past):
            raise EngineMismatch(f"{past} and {present} differ in type: the ping-pong cache needs "
                                 "them equal; re-export the decoder")

    def _profile_ranges(self, index: int) -> dict[str, tuple[int, int]]:
        """(min, max) of the sequence, past and total axes in one profile, read where the
        contract puts them."""
        def span(axis: str) -> tuple[int, int]:
            name, dim = self.graph.locate(axis)
            lo, _, hi = self._engine.profile_shape(name, index)
            return lo[dim], hi[dim]
        return {axis: span(axis) for axis in (g.SEQUENCE, g.TOTAL, g.PAST)}

    def _fitting_profile(self, seq: int, past: int) -> int | None:
        """The narrowest profile that holds the shapes: decode (seq 1) wins for single steps,
        prompt (nothing cached) for a first prompt, append for later ones."""
        fits = [(p[g.SEQUENCE][1] - p[g.SEQUENCE][0], i) for i, p in enumerate(self._profiles)
                if p[g.SEQUENCE][0] <= seq <= p[g.SEQUENCE][1] and p[g.PAST][0] <= past <= p[g.PAST][1]
                and p[g.TOTAL][0] <= past + seq <= p[g.TOTAL][1]]
        return min(fits)[1] if fits else None

    def _pick_profile(self, seq: int, past: int) -> int:
        index = self._fitting_profile(seq, past)
        if index is None:
            raise UserError(f"seq {seq} with past {past} is outside every engine profile: rebuild "
                            f"with `{rebuild_command(self.artifacts)} --prompt-len ... "
                            "--append-len ...`")
        return index

    def _split_is_exact(self, attention_mask: np.ndarray, past: int) -> bool:
        """Chunking an append changes only rows with no allowed key, which DSVL averages over
        keys a chunk may not contain. None exists once the cache holds a key of every kind the
        softmaxes attend to (MMCA: text and image; otherwise any). A first prompt is never
        split: MMCA's image rule applies only to a pass without past."""
        cached = attention_mask[0, :past]
        if self.mmca:
            return bool((cached == contract.MASK_TEXT).any() and (cached == contract.MASK_IMAGE).any())
        return bool(past and (cached > 0).any())

    def _chunks(self, seq: int, past: int, attention_mask: np.ndarray) -> list[tuple[int, int]]:
        if self._fitting_profile(seq, past) is not None:
            return [(0, seq)]
        if past == 0 or not self.max_append or not self._split_is_exact(attention_mask, past):
            self._pick_profile(seq, past)  # raises with the rebuild command
        step = self.max_append
        return [(start, min(start + step, seq)) for start in range(0, seq, step)]

    def _bind(self, seq: int, past: int) -> None:
        engine, cache = self._engine, self.cache
        engine.use_profile(self._pick_profile(seq, past))
        engine.set_shape(contract.INPUTS_EMBEDS, (1, seq, self.hidden_size))
        engine.set_shape(contract.ATTENTION_MASK, (1, past + seq))
        engine.set_shape(contract.POSITION_IDS, (1, seq))
        kv_shape = (1, cache.kv_heads, past, cache.head_dim)
        for index, (past_name, present_name) in enumerate(contract.cache_name_pairs(self.num_layers)):
            engine.set_shape(past_name, kv_shape)
            engine.bind(past_name, cache.past(index).ptr)
            engine.bind(present_name, cache.present(index).ptr)
        for name, buffer in self._buffers.items():  # rebinding is cheap; profile switches need it
            engine.bind(name, buffer.ptr)

    def _forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray, all_logits: bool) -> np.ndarray:
        seq, past = inputs_embeds.shape[1], self.cache.length
        rows, spent = [], 0.0
        for start, stop in self._chunks(seq, past, attention_mask):
            rows.append(self._run(inputs_embeds[:, start:stop], attention_mask[:, :past + stop],
                                  position_ids[:, start:stop], all_logits))
            spent += self.last_inference_time() or 0.0
        self._last_time = spent
        return np.concatenate(rows) if all_logits else rows[-1]

    def _run(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """One engine call: ``seq`` new positions after the cache; the cache then swaps."""
        seq, past = inputs_embeds.shape[1], self.cache.length
        engine, stream = self._engine, self._engine.stream
        self._bind(seq, past)
        rows = seq if all_logits else 1
        row_bytes = self.vocab * self._size(contract.LOGITS)
        logits = np.empty((rows, self.vocab), self.dtypes[contract.LOGITS])
        with self.timed():
            staged = [self._buffers[name].upload(np.ascontiguousarray(convert(array, self.dtypes[name])), stream)
                      for name, array in ((contract.INPUTS_EMBEDS, inputs_embeds),
                                          (contract.ATTENTION_MASK, attention_mask),
                                          (contract.POSITION_IDS, position_ids))]
            engine.execute(f"seq {seq} after past {past}")
            self._buffers[contract.LOGITS].download(logits, stream, offset=(seq - rows) * row_bytes)
            engine.synchronize()
        del staged
        self.cache.advance(past + seq)
        return convert(logits, np.float32)

    def _release(self) -> None:
        self.cache.free()
        for buffer in self._buffers.values():
            buffer.free()
        self._engine.close()


def load(artifacts: Path | str, manifest: Manifest | None = None,
         max_context: int | None = None) -> tuple[TRTVisionRunner, TRTDecoderRunner]:
    """Both runners for one artefact directory (manifest read once)."""
    manifest = _load_manifest(artifacts, manifest)
    vision = TRTVisionRunner(artifacts, manifest)
    try:
        return vision, TRTDecoderRunner(artifacts, manifest, max_context)
    except BaseException:
        vision.close()
        raise


def _main(argv: list[str]) -> int:
    """python -m runtime.backends.trt DIR: load both engines and say what they accept."""
    if len(argv) != 1:
        print("usage: python -m runtime.backends.trt ARTIFACTS_DIR", file=sys.stderr)
        return 2
    try:
        vision, decoder = load(argv[0])
    except (BackendUnavailable, EngineCallError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"vision.plan: up to {vision.max_images} images of {vision.size_range[0]}.."
          f"{vision.size_range[1]} px; decoder.plan: {decoder.num_layers} layers, max_context "
          f"{decoder.max_context}, prompt up to {decoder.max_seq}, profiles {decoder._profiles}")
    vision.close()
    decoder.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
