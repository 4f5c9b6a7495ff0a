"""ONNX Runtime backend (CPU, CUDA or TensorRT execution provider).

The decoder's KV cache lives in preallocated host buffers, two per layer and tensor, sized for
the whole context. IO binding points ``past_key_values.*`` at one buffer and ``present.*`` at
the other, then the roles swap: ONNX Runtime writes the grown cache straight into place and
Python never copies it. Layout [1, kv_heads, length, head_dim] is contiguous for any length, so
a buffer holds a cache of any length up to the context. An in-place (shared) cache is one
buffer per tensor, bound once as both past and present; on the CUDA provider it lives on the
GPU as ONNX Runtime values (``CACHE_DEVICES``), so steps move no cache bytes over the bus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import contract as c
from runtime import graphs as g
from runtime.backends.base import (  # noqa: F401  (ContextOverflow re-exported)
    Clock,
    ContextOverflow,
    DecoderRunner,
    PingPongCache,
    VisionRunner,
)
from runtime.backends.errors import BackendUnavailable
from runtime.half import convert
from runtime.hugepages import on_huge_pages
from runtime.manifest import DecoderSection, VisionSection

PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


def make_session(path: Path, backend: str, fp16: bool, threads: int = 0, profile: bool = False,
                 cuda_graph: bool = False):
    """An ONNX Runtime session for ``backend``; ``profile`` turns on ONNX Runtime's profiler
    (``session.end_profiling()`` writes its JSON); ``cuda_graph`` (ort-cuda only) lets the CUDA
    provider capture and replay the session's kernels (runtime/backends/ort_graphs.py)."""
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
    options.enable_profiling = profile
    provider_options: dict = {}
    if backend == "ort-cuda":
        # fp32 in fp32, as PyTorch multiplies by default: ONNX Runtime's CUDA provider rounds
        # fp32 matrix products to TF32 unless told not to (H200: cosine 0.9992 against the CPU
        # provider on a tiny fp32 decoder, 0.994 with MMCA). fp16 graphs are unaffected.
        provider_options = {"use_tf32": "0"}
        if cuda_graph:
            provider_options["enable_cuda_graph"] = "1"
    if backend == "ort-trt":
        cache = path.parent / c.ENGINES_DIR / c.ORT_TRT_CACHE
        provider_options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache)}
    providers = [(provider, provider_options)]
    if backend != "ort-cpu":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(str(path), options, providers=providers)


def check_graph(session, path: Path, graph: g.GraphSpec, io_dtype: str, sizes: dict[str, int]) -> None:
    """The loaded graph is the one the manifest describes (names, types, ranks, sizes): a
    mismatch is an artefact error here, not an ONNX Runtime error mid-generation."""
    problem = graph.mismatch([g.ort_tensor_info(a) for a in session.get_inputs()],
                             [g.ort_tensor_info(a) for a in session.get_outputs()], io_dtype, sizes)
    if problem:
        raise c.ArtifactError(f"{path} {problem}: it does not fit manifest.json (mixed exports); "
                              "re-run export.all")


class OrtVisionRunner(VisionRunner):
    """``cuda_graph``: replay ONNX Runtime CUDA graphs, one per image count
    (runtime/backends/ort_graphs.py); ort-cuda and a fixed-resolution export only. Not the
    default yet: measured on no GPU so far (docs/benchmarks.md, "GPU")."""

    def __init__(self, path: Path, spec: VisionSection, backend: str = "ort-cpu", threads: int = 0,
                 clock: Clock | None = None, cuda_graph: bool = False):
        super().__init__(clock)
        if cuda_graph and (backend != "ort-cuda" or spec.dynamic_resolution):
            raise BackendUnavailable(
                "CUDA graphs replay the vision encoder on --backend ort-cuda for a fixed-resolution "
                f"export; this is --backend {backend}"
                f"{' with a dynamic-resolution export' if spec.dynamic_resolution else ''}")
        self.session = make_session(path, backend, spec.io_dtype == c.io_dtype("fp16"), threads,
                                    cuda_graph=cuda_graph)
        self.dtype = c.numpy_dtype(spec.io_dtype)
        self.graph = g.vision_graph(spec.dynamic_resolution, spec.fixed_tokens)
        self.sizes = {g.CHANNELS: 3, g.LANG_DIM: spec.lang_dim, g.IMAGE_SIZE: spec.image_size,
                      g.IMAGE_TOKENS: spec.image_tokens}
        check_graph(self.session, path, self.graph, spec.io_dtype, self.sizes)
        self.replays = None
        if cuda_graph:
            from runtime.backends.ort_graphs import ImageCountGraphs

            self.replays = ImageCountGraphs(self.session, "cuda", self.output_shape, self.dtype)

    def output_shape(self, images: int) -> tuple[int, int, int]:
        """image_embeds' shape for ``images`` at the export's own resolution."""
        return images, self.sizes[g.IMAGE_TOKENS], self.sizes[g.LANG_DIM]

    def _encode(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = convert(pixel_values, self.dtype)
        with self.timed():
            if self.replays is not None:
                out = self.replays.run(pixels)
            else:
                out = self.session.run([c.VISION_OUTPUT], {c.VISION_INPUT: pixels})[0]
        return convert(out, np.float32)

    def _release(self) -> None:
        self.replays = None
        self.session = None


def runs_on_device(session) -> bool:
    """Whether ``session``'s first provider is a device's (CUDA, TensorRT), where IO binding
    copies host inputs when they are bound (``FastBinding``)."""
    return session.get_providers()[0] != "CPUExecutionProvider"


class FastBinding:
    """IO binding without per-call overhead. The public ``IOBinding.bind_*`` builds a device
    object on every call (~1 ms per decode step over 33 tensors), so this caches the CPU device
    and falls back to the public API where the internals differ. It also remembers what each
    name is bound to (dtype, shape, address) and skips a bind that would change nothing: a
    binding persists across runs, so a decode step re-binds only what moved (the mask's width),
    not the cache buffers, the step's input buffers or the logits.

    ``copies_inputs``: the session runs on a device (CUDA). ONNX Runtime copies a host input to
    the device when it is bound, not when the session runs, so a host buffer written after its
    bind would feed the graph its old contents; there every host input is bound again just
    before each run (the copy a plain ``run`` makes anyway)."""

    def __init__(self, session, copies_inputs: bool = False):
        self.binding = session.io_binding()
        self.raw = getattr(self.binding, "_iobinding", None)
        self.bound: dict[str, tuple] = {}
        self.copies_inputs = copies_inputs
        self.inputs: dict[str, tuple] = {}  # host inputs: name -> (dtype, shape, address)
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            self.device = OrtDevice.make("cpu", 0)._get_c_device()
        except (ImportError, AttributeError):
            self.raw = None
        inner = getattr(session, "_sess", None)
        self._run_raw = getattr(inner, "run_with_iobinding", None) if self.raw is not None else None
        self._session, self._raw_binding = session, self.raw

    def input(self, name: str, dtype, shape, pointer: int) -> None:
        key = (dtype, tuple(shape), pointer)
        if self.bound.get(name) == key:
            return
        self._bind_input(name, dtype, shape, pointer)
        self.bound[name] = self.inputs[name] = key

    def _bind_input(self, name: str, dtype, shape, pointer: int) -> None:
        if self.raw is not None:
            self.raw.bind_input(name, self.device, dtype, list(shape), pointer)
        else:
            self.binding.bind_input(name, "cpu", 0, dtype, list(shape), pointer)

    def output(self, name: str, dtype, shape, pointer: int) -> None:
        key = (dtype, tuple(shape), pointer)
        if self.bound.get(name) == key:
            return
        if self.raw is not None:
            self.raw.bind_output(name, self.device, dtype, list(shape), pointer)
        else:
            self.binding.bind_output(name, "cpu", 0, dtype, list(shape), pointer)
        self.bound[name] = key

    def int64_row(self, name: str, width: int, pointer: int) -> None:
        """Bind an int64 [1, width] input: ``input`` for the one bind every decode step makes
        (the mask's new width), without its bookkeeping."""
        if self.raw is not None:
            self.raw.bind_input(name, self.device, np.int64, [1, width], pointer)
            self.bound[name] = self.inputs[name] = (np.int64, (1, width), pointer)
        else:
            self.input(name, np.int64, (1, width), pointer)

    def run(self) -> None:
        """``session.run_with_iobinding`` without the Python wrapper's layer (after binding
        every host input again, where the session ``copies_inputs``)."""
        if self.copies_inputs:
            for name, (dtype, shape, pointer) in self.inputs.items():
                self._bind_input(name, dtype, shape, pointer)
        if self._run_raw is not None:
            self._run_raw(self._raw_binding, None)
        else:
            self._session.run_with_iobinding(self.binding)


# Where an in-place cache lives by backend: on the provider's device, bound as ONNX Runtime
# values, so a step moves no cache bytes between host and device and past/present are one buffer
# there (GroupQueryAttention's shared-buffer mode needs the two to be the same memory).
CACHE_DEVICES = {"ort-cuda": "cuda"}


class OrtDecoderRunner(DecoderRunner):
    def __init__(self, path: Path, spec: DecoderSection, backend: str = "ort-cpu",
                 max_context: int | None = None, threads: int = 0, clock: Clock | None = None,
                 cache_device: str | None = None, huge_pages: bool = True):
        """``cache_device``: where an in-place cache is allocated as ONNX Runtime values
        (default: ``CACHE_DEVICES`` by backend, else host numpy buffers). "cpu" takes the
        device path on the host, which is how the tests check it. ``huge_pages``: on
        ``ort-cpu``, move the session's weights onto 2 MiB pages (runtime/hugepages.py;
        ``self.huge_pages`` says what happened)."""
        super().__init__(clock)
        with on_huge_pages(huge_pages and backend == "ort-cpu") as self.huge_pages:
            self.session = make_session(path, backend, spec.io_dtype == c.io_dtype("fp16"), threads)
        self.num_layers, self.hidden_size = spec.num_layers, spec.hidden_size
        self.shared = spec.kv_cache == c.KV_SHARED  # one buffer, updated in place by the graph
        # A fused graph computes the LM head for the last position only when asked to.
        self.keeps_logits = g.keeps_logits(spec.graph)
        self.keep = {True: np.array(0, np.int64), False: np.array(1, np.int64)}  # by all_logits
        check_graph(self.session, path, g.decoder_graph(self.num_layers, spec.kv_cache, spec.graph, spec.kv_cache_dtype),
                    spec.io_dtype,
                    {g.HIDDEN: spec.hidden_size, g.KV_HEADS: spec.num_kv_heads,
                     g.HEAD_DIM: spec.head_dim, g.VOCAB: spec.vocab_size})
        self.dtype = c.numpy_dtype(spec.io_dtype)
        self.cache_dtype = c.numpy_dtype(spec.cache_dtype)  # int8 where the cache is quantized
        self.heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.vocab = spec.vocab_size
        limit = spec.max_position_embeddings
        self.max_context = limit if max_context is None else min(max_context, limit)
        size = self.heads * self.max_context * self.head_dim
        names = c.cache_name_pairs(self.num_layers)
        self.binding = FastBinding(self.session, copies_inputs=runs_on_device(self.session))
        self.cache_device = (cache_device or CACHE_DEVICES.get(backend)) if self.shared else None
        if self.cache_device:
            self.cache = PingPongCache(self._device_cache(names), self.max_context, in_place=True)
            self.slots = []
        else:
            pairs = []
            for _ in names:  # flat buffers, viewed at the current length
                one = np.zeros(size, self.cache_dtype)
                pairs.append((one, one) if self.shared else (one, np.zeros(size, self.cache_dtype)))
            self.cache = PingPongCache(pairs, self.max_context, self._compact, in_place=self.shared)
            # (past name, present name, buffer address on side 0, on side 1) for every cache tensor.
            self.slots = [(past, present, a.ctypes.data, b.ctypes.data)
                          for (past, present), (a, b) in zip(names, pairs, strict=True)]
        # A decode step's inputs live in buffers of the runner's own, bound once: a step copies
        # its embedding, position and mask into them and binds only the mask's new width.
        self.step_embeds = np.zeros((1, 1, self.hidden_size), self.dtype)
        self.step_position = np.zeros((1, 1), np.int64)
        self.step_mask = np.zeros(self.max_context, np.int64)
        self.step_logits = np.empty((1, 1, self.vocab), self.dtype)
        # A fused graph's greedy pick per logits row (optional in the contract): bound beside
        # the logits, so a greedy loop reads one int64 instead of scanning the vocabulary.
        self.picks = c.NEXT_TOKEN in {o.name for o in self.session.get_outputs()}
        self.step_token = np.zeros((1, 1), np.int64)
        self.step_pick = self.step_token[0] if self.picks else None
        self.addresses = {name: array.ctypes.data for name, array in (
            (c.INPUTS_EMBEDS, self.step_embeds), (c.POSITION_IDS, self.step_position),
            (c.ATTENTION_MASK, self.step_mask), (c.LOGITS, self.step_logits),
            (c.NEXT_TOKEN, self.step_token), (True, self.keep[True]), (False, self.keep[False]))}
        self.cache_bound = bool(self.cache_device)  # shared cache: bound once, for good
        self.keep_alive: list[np.ndarray] = []  # a prompt pass's converted inputs, until it ran
        # step(): views of the step buffers, and what is bound where since the last forward().
        self.step_row, self.step_logits_row = self.step_embeds[0, 0], self.step_logits[0, 0]
        self.step_position_row = self.step_position[0]
        self.step_bound = False  # embeds, position, logits_to_keep and logits on the step buffers
        self.caller_mask: np.ndarray | None = None  # step()'s mask buffer, bound in place
        self.caller_mask_address = 0
        self.caller_mask_values: memoryview | None = None
        # step_from(): byte and int64 views of the step buffers and of the embedding table it
        # copies rows from (set by _feed_from; no rows while the table does not fit the buffer).
        self.step_row_bytes = memoryview(self.step_embeds).cast("B")
        self.step_position_values = memoryview(self.step_position).cast("B").cast("q")
        self.step_mask_values = memoryview(self.step_mask).cast("B").cast("q")
        self.feed_table: np.ndarray | None = None
        self.feed_bytes: memoryview | None = None
        self.feed_rows, self.feed_row_bytes = 0, self.hidden_size * np.dtype(self.dtype).itemsize
        # Where the graph allows it, steps bind the runner's own mask once, at the full
        # context width, zero beyond the cached positions.
        self.full_width_mask = g.takes_full_width_mask(spec.kv_cache, spec.graph,
                                                       spec.enable_mmca_attention)
        self.mask_length = -1  # cache length the full-width mask holds; -1: resync it

    def _forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 all_logits: bool) -> np.ndarray:
        """See DecoderRunner. The returned logits are valid until the next call."""
        self.step_bound = False
        self.mask_length = -1
        seq = inputs_embeds.shape[1]
        cache = self.cache
        total = cache.length + seq
        bind = self.binding
        if seq == 1:  # a decode step: fill the bound step buffers
            self.step_embeds[0, 0] = inputs_embeds[0, 0]
            self.step_position[0, 0] = position_ids[0, 0]
            self.step_mask[:total] = attention_mask[0]
            address = self.addresses
            bind.input(c.INPUTS_EMBEDS, self.dtype, self.step_embeds.shape, address[c.INPUTS_EMBEDS])
            bind.input(c.POSITION_IDS, np.int64, (1, 1), address[c.POSITION_IDS])
            bind.input(c.ATTENTION_MASK, np.int64, (1, total), address[c.ATTENTION_MASK])
        else:
            for name, array in ((c.INPUTS_EMBEDS, np.ascontiguousarray(convert(inputs_embeds, self.dtype))),
                                (c.POSITION_IDS, np.ascontiguousarray(position_ids, np.int64)),
                                (c.ATTENTION_MASK, np.ascontiguousarray(attention_mask, np.int64))):
                bind.input(name, array.dtype.type, array.shape, array.ctypes.data)
                self.keep_alive.append(array)
        if not self.cache_bound:
            self._bind_cache(cache.length, total, cache.side)
        rows = seq
        if self.keeps_logits:
            bind.input(c.LOGITS_TO_KEEP, np.int64, (), self.addresses[all_logits])
            rows = seq if all_logits else 1
        if rows == 1:
            logits = self.step_logits
            bind.output(c.LOGITS, self.dtype, logits.shape, self.addresses[c.LOGITS])
            if self.picks:
                bind.output(c.NEXT_TOKEN, np.int64, (1, 1), self.addresses[c.NEXT_TOKEN])
        else:
            logits = np.empty((1, rows, self.vocab), self.dtype)
            bind.output(c.LOGITS, self.dtype, logits.shape, logits.ctypes.data)
            if self.picks:
                picks = np.empty((1, rows), np.int64)
                bind.output(c.NEXT_TOKEN, np.int64, picks.shape, picks.ctypes.data)
                self.keep_alive.append(picks)
        try:
            self._run()
        finally:
            self.keep_alive.clear()
        cache.advance(total)
        out = logits[0] if all_logits else logits[0, -1:]
        return convert(out, np.float32)

    def step(self, embedding: np.ndarray, mask: np.ndarray, position: int) -> np.ndarray:
        """See DecoderRunner.step: binds the caller's mask buffer in place (its address is
        taken once per buffer, since ``ndarray.ctypes`` costs more than the rest of a step's
        Python) and re-binds only its width; the step's other tensors stay bound from the
        last step. With ``full_width_mask`` it copies the new position's mask value into the
        runner's own full-width mask instead and binds nothing. Skips forward()'s shape
        checks: the caller is the generation loop."""
        if self._closed:
            self._check_open()
        cache = self.cache
        total = cache.length + 1
        if total > self.max_context:
            raise ContextOverflow(f"context full: {cache.length} cached + 1 new position exceed "
                                  f"the context of {self.max_context}")
        bind = self.binding
        if mask is not self.caller_mask:
            self._check_step_mask(mask)
            self.caller_mask, self.caller_mask_address = mask, mask.ctypes.data
            self.caller_mask_values = memoryview(mask).cast("B").cast("q")
        if not self.step_bound:
            address = self.addresses
            bind.input(c.INPUTS_EMBEDS, self.dtype, self.step_embeds.shape, address[c.INPUTS_EMBEDS])
            bind.input(c.POSITION_IDS, np.int64, (1, 1), address[c.POSITION_IDS])
            if self.keeps_logits:
                bind.input(c.LOGITS_TO_KEEP, np.int64, (), address[False])
            bind.output(c.LOGITS, self.dtype, self.step_logits.shape, address[c.LOGITS])
            if self.picks:
                bind.output(c.NEXT_TOKEN, np.int64, (1, 1), address[c.NEXT_TOKEN])
            if self.full_width_mask:
                bind.int64_row(c.ATTENTION_MASK, self.max_context, address[c.ATTENTION_MASK])
            self.step_bound = True
        self.step_row[:] = embedding
        self.step_position_row[0] = position
        if not self.full_width_mask:
            bind.int64_row(c.ATTENTION_MASK, total, self.caller_mask_address)
        elif cache.length == self.mask_length:  # the last step's mask, one position longer
            self.step_mask[cache.length] = mask[0, cache.length]
        else:  # after a prompt pass or a truncation
            self._sync_full_mask(mask, total)
        return self._run_step(cache.length)

    def step_from(self, table: np.ndarray, token: int, mask: np.ndarray, position: int) -> np.ndarray:
        """See DecoderRunner.step_from. Once ``step`` has bound the step's buffers (and synced
        the full-width mask), a step is its writes through memoryviews, the run and the
        cache's advance: numpy's indexing, several times dearer right after a run, stays out
        of the loop (docs/design.md, "The generation loop calls `step`, not `forward`")."""
        if table is not self.feed_table:
            self._feed_from(table)
        length = self.cache.length
        if not (self.step_bound and mask is self.caller_mask and 0 <= token < self.feed_rows
                and length < self.max_context and not self._closed
                and (length == self.mask_length or not self.full_width_mask)):
            return self.step(table[token], mask, position)  # binds, resyncs, checks, raises
        size = self.feed_row_bytes
        self.step_row_bytes[:] = self.feed_bytes[token * size:(token + 1) * size]
        self.step_position_values[0] = position
        total = length + 1
        if self.full_width_mask:
            self.step_mask_values[length] = self.caller_mask_values[length]
        else:
            self.binding.int64_row(c.ATTENTION_MASK, total, self.caller_mask_address)
        return self._run_step(length)

    def _run_step(self, length: int) -> np.ndarray:
        """What ends every step after ``length`` cached positions: a concat cache's binds, the
        run, the cache one position longer; the logits row as float32."""
        cache, total = self.cache, length + 1
        if not self.cache_bound:
            self._bind_cache(length, total, cache.side)
        self._run()
        cache.advance(total)
        self.mask_length = total
        return convert(self.step_logits_row, np.float32)

    def _feed_from(self, table: np.ndarray) -> None:
        """Rows for step_from: a C-contiguous [rows, hidden] table in the step's dtype is read
        through a byte view; any other goes through ``step``."""
        fits = (isinstance(table, np.ndarray) and table.ndim == 2 and table.dtype == self.dtype
                and table.shape[1] == self.hidden_size and table.flags.c_contiguous)
        self.feed_table = table
        self.feed_bytes = memoryview(table).cast("B") if fits else None
        self.feed_rows = table.shape[0] if fits else 0

    def _sync_full_mask(self, mask: np.ndarray, total: int) -> None:
        """The runner's full-width mask: the caller's first ``total`` values, zero after."""
        self.step_mask[:total] = mask[0, :total]
        self.step_mask[total:] = 0

    def _run(self) -> None:
        """The bound session run, timed on the runner's clock (``last_inference_time``)."""
        clock = self.clock
        start = clock()
        try:
            self.binding.run()
        finally:
            self._last_time = clock() - start

    def _device_cache(self, names: list[tuple[str, str]]) -> list[tuple]:
        """One ONNX Runtime value per cache tensor on ``cache_device``, [1, kv_heads, context,
        head_dim], bound once as both its past input and its present output (the graph writes
        the new positions in place). The values start as zeros: CUDA's attention kernels may
        read whole tiles past the cached length and mask only the scores, so a NaN in
        uninitialised memory survives (0 x NaN). On an H200 a fresh fp16 runner's first prompt
        pass gave NaN logits from uninitialised values, and none from zeros."""
        import onnxruntime as ort

        shape = [1, self.heads, self.max_context, self.head_dim]
        pairs = []
        for past, present in names:
            # its own zeros each: a host value wraps its array (a device value copies it)
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype), self.cache_device, 0)
            self.binding.binding.bind_ortvalue_input(past, value)
            self.binding.binding.bind_ortvalue_output(present, value)
            pairs.append((value, value))
        return pairs

    def cached_values(self) -> list[np.ndarray]:
        """A copy of each cache tensor's cached positions, [kv_heads, length, head_dim], in the
        contract's order (key 0, value 0, key 1, ...): what export/kv_quant.py calibrates on."""
        length, cache = self.cache.length, self.cache
        out = []
        for index in range(len(cache.pairs)):
            buffer = cache.past(index)
            if not isinstance(buffer, np.ndarray):  # an ONNX Runtime value on a device
                buffer = buffer.numpy()
            if self.shared:  # [kv_heads, max_context, head_dim], the first positions filled
                view = buffer.reshape(self.heads, self.max_context, self.head_dim)[:, :length]
            else:  # packed at the current length
                view = buffer[: self.heads * length * self.head_dim].reshape(self.heads, length, self.head_dim)
            out.append(view.copy())
        return out

    def _bind_cache(self, past: int, total: int, side: int) -> None:
        """Point past_* at one side and present_* at the other (the same buffer when shared,
        which then stays bound: its shape is the whole context, whatever the length)."""
        if self.shared:
            past_shape = present_shape = (1, self.heads, self.max_context, self.head_dim)
        else:
            past_shape = (1, self.heads, past, self.head_dim)
            present_shape = (1, self.heads, total, self.head_dim)
        bind = self.binding
        for past_name, present_name, *addresses in self.slots:  # read one side, write the other
            bind.input(past_name, self.cache_dtype, past_shape, addresses[side])
            bind.output(present_name, self.cache_dtype, present_shape, addresses[1 - side])
        self.cache_bound = self.shared

    def _compact(self, src: np.ndarray, dst: np.ndarray, old: int, new: int) -> None:
        """[H, old, D] -> [H, new, D] per head, from one flat buffer into the other."""
        heads, dim = self.heads, self.head_dim
        view = src[: heads * old * dim].reshape(heads, old, dim)
        dst[: heads * new * dim].reshape(heads, new, dim)[:] = view[:, :new]

    def _release(self) -> None:
        self.session = self.binding = None
