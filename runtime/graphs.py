"""Each ONNX graph's inputs and outputs, declared once: names, dtype roles and named axes.

As Optimum's ``OnnxConfig`` does, one table per graph says what every tensor is. The exporters
generate torch's ``dynamic_axes`` from it and check the saved ONNX against it, export/engine.py
takes its TensorRT profile axes from it, and the runners check the graph they load (and the
inputs they are given) against it. No torch or onnx here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from runtime import contract as c

# Dtype roles: the export's float type (the manifest's io_dtype), or a fixed type.
IO_FLOAT = "io_float"
INT64 = "int64"

# Dynamic axes: they vary per call. TensorRT profiles give each a min/opt/max under these names.
BATCH = "batch"
SEQUENCE = "sequence"  # new positions in this call
PAST = "past_sequence"  # positions already cached
TOTAL = "total_sequence"  # past + new
MAX_SEQUENCE = "max_sequence"  # the shared-buffer cache: allocated once for the whole context
IMAGES = "images"
HEIGHT, WIDTH = "height", "width"
TOKENS = "tokens"  # image tokens per image (CLIP baseline/vit at a dynamic resolution)
LOGITS_SEQUENCE = "logits_sequence"  # a fused decoder's logits rows: all positions or the last k

# Fixed axes: one size per export, named after the manifest field that holds it.
CHANNELS = "channels"  # 3
HIDDEN = "hidden_size"
LANG_DIM = "lang_dim"
KV_HEADS = "num_kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab_size"
IMAGE_SIZE = "image_size"
IMAGE_TOKENS = "image_tokens"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # IO_FLOAT or a dtype name
    axes: tuple[str, ...]

    def dtype_name(self, io_dtype: str) -> str:
        return io_dtype if self.dtype == IO_FLOAT else self.dtype


@dataclass(frozen=True)
class TensorInfo:
    """What a loaded or saved graph says about one tensor: sizes are ints, dynamic dims are
    their names (or None when unnamed)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic: frozenset[str]  # the axes that vary per call in this graph
    optional: frozenset[str] = frozenset()  # outputs a graph may lack (added after exports exist)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorSpec]:
        """Name -> spec (inputs first): ``tensor`` runs for every input of every decode step."""
        table: dict[str, TensorSpec] = {}
        for spec in self.inputs + self.outputs:
            table.setdefault(spec.name, spec)
        return table

    def locate(self, axis: str) -> tuple[str, int]:
        """The first input carrying ``axis``, and which of its dims it is."""
        for spec in self.inputs:
            if axis in spec.axes:
                return spec.name, spec.axes.index(axis)
        raise KeyError(axis)

    def torch_dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: every dynamic dim, by its axis name."""
        axes = {}
        for spec in self.inputs + self.outputs:
            named = {i: axis for i, axis in enumerate(spec.axes) if axis in self.dynamic}
            if named:
                axes[spec.name] = named
        return axes

    def mismatch(self, found_inputs: Sequence[TensorInfo], found_outputs: Sequence[TensorInfo],
                 io_dtype: str, sizes: dict[str, int] | None = None, strict: bool = False) -> str | None:
        """The first way a graph's I/O departs from this spec, in words; None when it fits.
        ``sizes`` holds the fixed axes' sizes where known. ``strict`` (a fresh export) also
        wants every dynamic dim named by its axis and every fixed one fixed."""
        for kind, specs, found in (("input", self.inputs, found_inputs),
                                   ("output", self.outputs, found_outputs)):
            have = {t.name: t for t in found}
            for spec in specs:
                if spec.name not in have:
                    if spec.name in self.optional:
                        continue
                    return f"has no {kind} {spec.name}"
                problem = self._tensor_mismatch(spec, have[spec.name], io_dtype, sizes or {}, strict)
                if problem:
                    return f"{kind} {spec.name} {problem}"
            extra = [t.name for t in found if t.name not in {s.name for s in specs}]
            if extra:
                return f"has an {kind} {extra[0]} the contract does not know"
        return None

    def _tensor_mismatch(self, spec: TensorSpec, info: TensorInfo, io_dtype: str,
                         sizes: dict[str, int], strict: bool) -> str | None:
        want = spec.dtype_name(io_dtype)
        if info.dtype != want:
            return f"is {info.dtype}, the contract says {want}"
        if len(info.shape) != len(spec.axes):
            return f"has rank {len(info.shape)}, the contract says {len(spec.axes)} ({', '.join(spec.axes)})"
        for dim, axis in zip(info.shape, spec.axes, strict=True):
            dynamic = axis in self.dynamic
            if isinstance(dim, int):
                if dynamic:
                    return f"fixes {axis} to {dim}, which the contract keeps dynamic"
                if axis in sizes and dim != sizes[axis]:
                    return f"has size {dim} on its {axis} axis, manifest.json says {sizes[axis]}"
            elif strict and not dynamic:
                return f"leaves {axis} dynamic, which the contract fixes"
            elif strict and dim != axis:
                return f"calls its {axis} axis {dim!r}"
        return None


def vision_graph(dynamic_resolution: bool = False, fixed_tokens: bool = True) -> GraphSpec:
    """vision.onnx: pixel_values [images, 3, H, W] -> image_embeds [images, tokens, lang_dim].
    Only CLIP with baseline/vit at a dynamic resolution has a dynamic token count."""
    dynamic = {IMAGES}
    if dynamic_resolution:
        dynamic |= {HEIGHT, WIDTH}
        if not fixed_tokens:
            dynamic.add(TOKENS)
    height, width = (HEIGHT, WIDTH) if dynamic_resolution else (IMAGE_SIZE, IMAGE_SIZE)
    tokens = TOKENS if TOKENS in dynamic else IMAGE_TOKENS
    return GraphSpec((TensorSpec(c.VISION_INPUT, IO_FLOAT, (IMAGES, CHANNELS, height, width)),),
                     (TensorSpec(c.VISION_OUTPUT, IO_FLOAT, (IMAGES, tokens, LANG_DIM)),),
                     frozenset(dynamic))


def keeps_logits(graph: str) -> bool:
    """Whether a decoder graph (a manifest ``graph`` value) takes ``logits_to_keep``: a fused
    graph computes the LM head only for the rows asked for. Every runner asks here."""
    return graph == c.GRAPH_FUSED


def takes_full_width_mask(kv_cache: str, graph: str, mmca: bool) -> bool:
    """Whether a decoder's decode step may take ``attention_mask`` at the in-place cache's full
    width, zero after each row's positions: a fused graph without MMCA reads the mask only for
    each row's count of positions and GroupQueryAttention's total length, which may be the
    buffer's (ONNX Runtime GenAI binds it so under CUDA graphs). MMCA's bias is as wide as the
    mask, so it keeps the exact width."""
    return kv_cache == c.KV_SHARED and keeps_logits(graph) and not mmca


def decoder_graph(num_layers: int, kv_cache: str = c.KV_CONCAT, graph: str = c.GRAPH_TRACED,
                  cache_dtype: str | None = None) -> GraphSpec:
    """decoder.onnx in one KV mode (a manifest ``kv_cache`` value): ``concat`` takes the past
    and returns past + new; ``shared-buffer`` binds one max-context buffer to both. A ``fused``
    graph (export/decoder_graph.py) also takes ``logits_to_keep`` and returns that many rows,
    and (optional: exports before it lack it) ``next_token``, each row's greedy pick.
    ``cache_dtype``: the cache tensors' type where it is not the float I/O type (the
    manifest's ``kv_cache_dtype``: an int8 cache)."""
    cache = cache_dtype or IO_FLOAT
    past, present = (MAX_SEQUENCE, MAX_SEQUENCE) if kv_cache == c.KV_SHARED else (PAST, TOTAL)
    cache_in = (BATCH, KV_HEADS, past, HEAD_DIM)
    cache_out = (BATCH, KV_HEADS, present, HEAD_DIM)
    pairs = c.cache_name_pairs(num_layers)
    inputs = (TensorSpec(c.INPUTS_EMBEDS, IO_FLOAT, (BATCH, SEQUENCE, HIDDEN)),
              TensorSpec(c.ATTENTION_MASK, INT64, (BATCH, TOTAL)),
              TensorSpec(c.POSITION_IDS, INT64, (BATCH, SEQUENCE)),
              *(TensorSpec(name, cache, cache_in) for name, _ in pairs))
    fused = keeps_logits(graph)
    if fused:
        inputs += (TensorSpec(c.LOGITS_TO_KEEP, INT64, ()),)
    rows = LOGITS_SEQUENCE if fused else SEQUENCE
    outputs = (TensorSpec(c.LOGITS, IO_FLOAT, (BATCH, rows, VOCAB)),
               *(TensorSpec(name, cache, cache_out) for _, name in pairs))
    optional = frozenset()
    if fused:
        outputs += (TensorSpec(c.NEXT_TOKEN, INT64, (BATCH, rows)),)
        optional = frozenset({c.NEXT_TOKEN})
    return GraphSpec(inputs, outputs, frozenset({BATCH, SEQUENCE, TOTAL, past, present, rows}), optional)


def ort_tensor_info(arg) -> TensorInfo:
    """An ONNX Runtime ``NodeArg`` ('tensor(float16)', [1, 'sequence', 64]) as a TensorInfo."""
    shape = tuple(d if isinstance(d, (int, str)) else None for d in (arg.shape or ()))
    return TensorInfo(arg.name, c.ORT_DTYPES.get(arg.type, arg.type), shape)
