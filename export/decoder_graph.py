"""Build decoder.onnx directly with onnx, layer by layer, without tracing a PyTorch model.

The tracer needs the whole decoder in memory (and copies of it); this builder asks a weight
source for one tensor at a time, writes it to the external data file (export/onnx_stream.py) and
drops it, so a 7B export holds one layer's tensors at most. The graph has the traced graph's
contract (runtime/contract.py: ``inputs_embeds``, ``attention_mask``, ``position_ids``, per-layer
``past_key_values.*`` in, ``logits`` and ``present.*`` out) and computes what dsvl/decoder.py
computes, in one of two op sets:

* ``standard``: plain ONNX ops, the traced graph's math op for op (RMSNorm as Pow/ReduceMean,
  rotary as Mul/Concat, attention as MatMul/Softmax with DSVL's masks, MMCA's two softmaxes).
  TensorRT parses it. Always a ``concat`` KV cache.
* ``fused``: ONNX Runtime's contrib ops, as ONNX Runtime GenAI's model builder emits them:
  ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the residual add
  fused in), one packed QKV MatMul, one packed gate/up MatMul, ``GroupQueryAttention`` with the
  rotary inside, and ``MatMulNBits`` when quantized. The cache is ``shared`` (one buffer updated
  in place) or ``concat``. MMCA with the ``shared`` cache runs its two softmaxes as one
  GroupQueryAttention over duplicated query heads, each copy with its softmax's mask as the
  op's ``attention_bias`` (``_mmca_attention``, docs/design.md); MMCA with ``concat`` keeps the
  standard attention with every other fusion.

A ``fused`` graph also takes ``logits_to_keep`` (int64 scalar: 0 = every position; 1 = the last
only, which is all a prompt pass needs: the LM head then multiplies one row, not S).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from export.head_rescore import (
    APPROX_HEAD_BLOCK,
    DEFAULT_TOP_K,
    ROWS_SUFFIX,
    SCALES_SUFFIX,
    RescoreNames,
    rescore_nodes,
    rescore_weights,
)
from export.onnx_stream import ExternalData, quantize_nbits
from runtime import contract as c
from runtime import graphs as gs

MASKED = -32768.0  # dsvl/decoder.py's finite mask value
OPS = (c.GRAPH_FUSED, c.GRAPH_STANDARD)  # what the builder builds; "traced" is the tracer
WEIGHT_FORMATS = ("float", "int4", "int8")


@dataclass
class DecoderGraphSpec:
    """Everything the graph's structure depends on (not the weights' values)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    inv_freq: np.ndarray  # rotary frequencies [head_dim / 2], fp32
    rope_scaling: float  # the rotary "attention scaling" applied to cos and sin
    mmca: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    precision: str = "fp32"
    ops: str = c.GRAPH_FUSED
    kv_cache: str = c.KV_FLAG_SHARED  # in place (fused ops only) or c.KV_FLAG_CONCAT
    weights: str = "float"  # "float", "int4" or "int8" (MatMulNBits; fused only)
    block_size: int = 32
    accuracy_level: int = 4
    # The LM head's bits when quantized (None: as ``weights``); 8 keeps top-1 closer to fp32, as
    # llama.cpp keeps its Q4_0 models' output tensor at Q6_K, at a speed cost (docs/benchmarks.md).
    lm_head_bits: int | None = None
    # A 4-bit head's best logits per position rescored at 8 bits (export/head_rescore.py); 0: off.
    lm_head_rescore: int = DEFAULT_TOP_K
    layers: list[int] | None = field(default=None)  # a subset (bounded parity checks); None: all

    def check(self) -> None:
        if self.ops not in OPS:
            raise ValueError(f"ops {self.ops!r}: one of {OPS}")
        if self.kv_cache == c.KV_FLAG_SHARED and self.ops != c.GRAPH_FUSED:
            raise ValueError("a shared KV cache needs fused ops (GroupQueryAttention)")
        if self.weights != "float" and self.ops != c.GRAPH_FUSED:
            raise ValueError("quantized weights need fused ops (MatMulNBits)")

    @property
    def layer_ids(self) -> list[int]:
        return list(range(self.num_layers)) if self.layers is None else list(self.layers)

    @property
    def float_type(self) -> int:
        return TensorProto.FLOAT16 if self.precision == "fp16" else TensorProto.FLOAT

    @property
    def np_float(self) -> type:
        return np.float16 if self.precision == "fp16" else np.float32


WeightReader = Callable[[str], np.ndarray]  # HF state-dict name -> fp32 array, read on demand


class _Graph:
    """Nodes, initializers and names; every op gets a readable unique output name."""

    def __init__(self, store: ExternalData | None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.store = store
        self.count = 0

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs) -> str | list[str]:
        self.count += 1
        base = name or f"/{op_type}_{self.count}"
        names = outputs if isinstance(outputs, list) else [
            f"{base}/out{i}" if outputs > 1 else f"{base}/out" for i in range(outputs)]
        self.nodes.append(oh.make_node(op_type, inputs, names, name=base, domain=domain or None,
                                       **attrs))
        return names[0] if len(names) == 1 else names

    def rename(self, old: str, new: str) -> None:
        """Call the tensor ``old`` ``new`` wherever it is made or read."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name == old:
                        names[i] = new

    def const(self, array: np.ndarray, name: str | None = None) -> str:
        self.count += 1
        name = name or f"/const_{self.count}"
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, np.int64))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A (large) weight: through the external-data store when there is one."""
        if self.store is not None:
            self.initializers.append(self.store.add(name, array))
        else:
            self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


class DecoderGraphBuilder:
    """One decoder graph, built layer by layer from ``read(name)``."""

    def __init__(self, spec: DecoderGraphSpec, read: WeightReader, store: ExternalData | None = None,
                 reuse: dict[str, TensorProto] | None = None):
        """``reuse``: tensors already written (a subset graph over an existing export's data)."""
        spec.check()
        self.spec, self.read, self.reuse = spec, read, reuse
        self.g = _Graph(store)
        self.fused = spec.ops == c.GRAPH_FUSED
        self._head_kn: np.ndarray | None = None  # the LM head weight, between its two quantizations
        # GroupQueryAttention: every fused graph but MMCA over a concat cache (standard attention)
        self.gqa = self.fused and (not spec.mmca or spec.kv_cache == c.KV_FLAG_SHARED)

    # ------------------------------------------------------------------ weights
    def _weight(self, name: str, make: Callable[[], np.ndarray]) -> str:
        if self.reuse is not None:
            self.g.initializers.append(self.reuse[name])
            return name
        return self.g.weight(name, make())

    def _weights(self, names: list[str], make: Callable[[], tuple[np.ndarray, ...]]) -> list[str]:
        """Several tensors made by one computation (one read and quantization of a weight),
        each written as it is handed out and dropped here."""
        made: list[np.ndarray | None] = []

        def take(index: int) -> Callable[[], np.ndarray]:
            def one() -> np.ndarray:
                if not made:
                    made.extend(make())
                array, made[index] = made[index], None
                return array
            return one

        return [self._weight(name, take(i)) for i, name in enumerate(names)]

    def _linear_kn(self, names: list[str]) -> np.ndarray:
        """Linear weights [out, in] (several stacked on out) as one MatMul B [in, out]."""
        parts = [self.read(n) for n in names]
        return np.ascontiguousarray(np.concatenate(parts, 0).T if len(parts) > 1 else parts[0].T)

    def matmul(self, x: str, names: list[str], key: str) -> str:
        """x @ W (several Linear weights packed into one), as MatMul or MatMulNBits. ``key``
        names the weight (``model.layers.0.self_attn.qkv_proj``) and, with a slash, the node."""
        spec = self.spec
        if spec.weights == "float":
            w = self._weight(key + ".weight", lambda: self._linear_kn(names).astype(spec.np_float))
            return self.g.op("MatMul", [x, w], name=f"/{key}/MatMul")
        bits = 4 if spec.weights == "int4" else 8
        if key == "lm_head" and spec.lm_head_bits:
            bits = spec.lm_head_bits
        rescored = key == "lm_head" and self.rescores_head
        block = APPROX_HEAD_BLOCK if rescored else spec.block_size

        def quantize() -> tuple[np.ndarray, np.ndarray]:
            kn = self._linear_kn(names).astype(spec.np_float)
            if rescored:
                self._head_kn = kn  # _rescore's 8-bit rows come from the same read
            return quantize_nbits(kn, bits, block)

        packed, scales = self._weights([f"{key}.weight_Q{bits}", f"{key}.weight_scales"], quantize)
        attrs = dict(K=self._in_features(names[0]), N=sum(self._rows(n) for n in names), bits=bits,
                     block_size=block)
        if spec.accuracy_level:
            attrs["accuracy_level"] = spec.accuracy_level
        return self.g.op("MatMulNBits", [x, packed, scales], name=f"/{key}/MatMulNBits",
                         domain="com.microsoft", **attrs)

    @property
    def rescores_head(self) -> bool:
        """Whether the LM head is 4-bit with its best logits rescored at 8 bits."""
        spec = self.spec
        return spec.weights == "int4" and (spec.lm_head_bits or 4) == 4 and spec.lm_head_rescore > 0

    def _rescore(self, hidden: str, approx: str) -> str:
        """The 4-bit head's ``lm_head_rescore`` best logits recomputed from 8-bit rows."""
        spec, g = self.spec, self.g

        def quantize() -> tuple[np.ndarray, np.ndarray]:
            kn, self._head_kn = self._head_kn, None  # read by matmul for the 4-bit pass
            return rescore_weights(kn, spec.block_size)

        rows, scales = self._weights(["lm_head.weight" + ROWS_SUFFIX, "lm_head.weight" + SCALES_SUFFIX],
                                     quantize)
        names = RescoreNames(hidden=hidden, approx=approx, logits="/lm_head/rescore/logits",
                             rows=rows, scales=scales, greedy=c.NEXT_TOKEN)
        nodes, consts = rescore_nodes(names, spec.lm_head_rescore, spec.block_size)
        g.nodes.extend(nodes)
        g.initializers.extend(consts)
        return names.logits

    def _rows(self, name: str) -> int:
        """Output features of a Linear weight, from the spec (no read needed)."""
        spec = self.spec
        if ".q_proj." in name:
            return spec.num_heads * spec.head_dim
        if ".k_proj." in name or ".v_proj." in name:
            return spec.num_kv_heads * spec.head_dim
        if ".o_proj." in name or ".down_proj." in name:
            return spec.hidden_size
        if name == "lm_head.weight":
            return spec.vocab_size
        return spec.intermediate_size

    def _in_features(self, name: str) -> int:
        spec = self.spec
        if ".down_proj." in name:
            return spec.intermediate_size
        if ".o_proj." in name:
            return spec.num_heads * spec.head_dim
        return spec.hidden_size

    def bias(self, x: str, names: list[str], key: str) -> str:
        b = self._weight(key + ".bias", lambda: np.concatenate(
            [self.read(n) for n in names]).astype(self.spec.np_float))
        return self.g.op("Add", [x, b])

    def norm_weight(self, name: str) -> str:
        return self._weight(name, lambda: self.read(name).astype(self.spec.np_float))

    # ------------------------------------------------------------------ graph
    def build(self) -> onnx.ModelProto:
        spec, g = self.spec, self.g
        layers = spec.layer_ids
        x = c.INPUTS_EMBEDS
        shared = spec.kv_cache == c.KV_FLAG_SHARED
        masks = self._mask_inputs()
        residual = None
        hidden = x
        for index in layers:
            prefix = f"model.layers.{index}"
            normed, residual = self._norm(hidden, residual, f"{prefix}.input_layernorm.weight")
            attn = self._attention(normed, index, masks)
            normed, residual = self._norm(attn, residual, f"{prefix}.post_attention_layernorm.weight")
            hidden = self._mlp(normed, prefix)
        final, _ = self._norm(hidden, residual, "model.norm.weight", last=True)
        if self.fused:
            final = self._keep_last(final)
        logits = self.matmul(final, ["lm_head.weight"], "lm_head")  # no bias in LLaMA
        if self.rescores_head:
            logits = self._rescore(final, logits)  # next_token too
        elif self.fused:  # the generation loop's greedy pick (first index of the maximum, as numpy)
            g.op("ArgMax", [logits], [c.NEXT_TOKEN], axis=-1, keepdims=0, select_last_index=0)
        # The head (or its rescoring) writes the graph's output itself: an Identity would copy the
        # vocabulary's logits on every step (~50 us of a 3 ms small int4 step).
        g.rename(logits, c.LOGITS)
        inputs, outputs = self._io(shared)
        graph = oh.make_graph(g.nodes, "dsvl_decoder", inputs, outputs, g.initializers)
        opsets = [oh.make_opsetid("", 17)] + ([oh.make_opsetid("com.microsoft", 1)] if self.fused else [])
        model = oh.make_model(graph, opset_imports=opsets, producer_name="dsvl-edge")
        model.ir_version = 8
        return model

    def _io(self, shared: bool) -> tuple[list, list]:
        """The graph's inputs and outputs, from the contract's table (runtime/graphs.py)."""
        spec = self.spec
        table = gs.decoder_graph(len(spec.layer_ids), c.KV_SHARED if shared else c.KV_CONCAT,
                                 c.GRAPH_FUSED if self.fused else c.GRAPH_STANDARD)
        sizes = {gs.HIDDEN: spec.hidden_size, gs.KV_HEADS: spec.num_kv_heads,
                 gs.HEAD_DIM: spec.head_dim, gs.VOCAB: spec.vocab_size}

        def value(tensor: gs.TensorSpec):
            elem = spec.float_type if tensor.dtype == gs.IO_FLOAT else TensorProto.INT64
            return oh.make_tensor_value_info(tensor.name, elem, [sizes.get(a, a) for a in tensor.axes])

        return [value(t) for t in table.inputs], [value(t) for t in table.outputs]

    def _keep_last(self, hidden: str) -> str:
        """hidden[:, -logits_to_keep:] (0 keeps every position)."""
        g = self.g
        start = g.op("Neg", [g.op("Reshape", [c.LOGITS_TO_KEEP, g.i64(1)])])
        return g.op("Slice", [hidden, start, g.i64(np.iinfo(np.int64).max), g.i64(1)])

    # ------------------------------------------------------------------ norms
    def _norm(self, x: str, residual: str | None, weight_name: str, last: bool = False
              ) -> tuple[str, str]:
        """RMSNorm(x + residual) and the new residual x + residual (x alone for the first)."""
        g, eps = self.g, self.spec.rms_norm_eps
        w = self.norm_weight(weight_name)
        if self.fused:
            if residual is None:
                out = g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps, stash_type=1)
                return out, x
            base = f"/{weight_name.removesuffix('.weight')}"
            out, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, residual, w],
                                    [f"{base}/out", "", "", f"{base}/residual"],
                                    domain="com.microsoft", epsilon=eps, name=base)
            return out, total
        total = x if residual is None else g.op("Add", [residual, x])
        x32 = g.op("Cast", [total], to=TensorProto.FLOAT)
        mean = g.op("ReduceMean", [g.op("Mul", [x32, x32])], axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(np.float32(eps))])])])
        normed = g.op("Cast", [g.op("Mul", [x32, inv])], to=self.spec.float_type)
        return g.op("Mul", [w, normed]), total

    # ------------------------------------------------------------------ attention
    def _mask_inputs(self) -> dict[str, str]:
        """Per-graph tensors every layer's attention shares."""
        if not self.gqa:
            return self._rope_tables() | self._softmax_masks()
        out = self._gqa_inputs()
        if self.spec.mmca:
            out |= self._mmca_inputs(out["lengths"])
        return out

    def _gqa_inputs(self) -> dict[str, str]:
        """GroupQueryAttention's cache lengths (from the mask's non-zeros; ``lengths`` [B] int32
        each row's count) and rotary tables."""
        g, spec = self.g, self.spec
        out: dict[str, str] = {}
        valid = g.op("Cast", [g.op("Greater", [c.ATTENTION_MASK, g.const(np.int64(0))])],
                     to=TensorProto.INT32)
        out["lengths"] = lengths = g.op("ReduceSum", [valid, g.i64(1)], keepdims=0)
        out["seqlens_k"] = g.op("Sub", [lengths, g.const(np.int32(1))])
        total = g.op("Shape", [c.ATTENTION_MASK], start=1, end=2)
        out["total"] = g.op("Squeeze", [g.op("Cast", [total], to=TensorProto.INT32), g.i64(0)])
        half = spec.head_dim // 2
        freqs = np.arange(spec.max_positions, dtype=np.float32)[:, None] * spec.inv_freq[None, :half]
        out["cos"] = g.const((np.cos(freqs) * spec.rope_scaling).astype(spec.np_float), "rotary.cos_cache")
        out["sin"] = g.const((np.sin(freqs) * spec.rope_scaling).astype(spec.np_float), "rotary.sin_cache")
        return out

    def _mmca_inputs(self, lengths: str) -> dict[str, str]:
        """MMCA as one GroupQueryAttention over 2H query heads, interleaved [h0 image, h0 text,
        h1 image, ...] so each pair stays on its kv head: ``bias`` [B, 2H, S, T] (each copy's
        softmax mask), ``q_keep`` [B, S, 1, 2, 1] (0 zeroes a uniform row's query), and the
        exact completion of uniform rows whose average includes keys after the query (the op is
        causal): ``pair_scale`` [B, S, 1, 1, 2, 1] and ``future`` [B, S, S], the same for every
        head, so it multiplies the pass's values [B, S, kvH * D] as they are (docs/design.md)."""
        g, spec = self.g, self.spec
        masks = self._softmax_masks()
        causal_count = self._causal_counts(lengths)
        scales, future = [], []
        for j in (0, 1):
            scale, weights = self._uniform_future(masks[f"type{j}"], masks["causal"],
                                                  masks[f"keep{j}"], causal_count)
            scales.append(scale)
            future.append(weights)
        return {"bias": self._head_pair_bias(masks["bias0"], masks["bias1"]),
                "q_keep": self._pair(masks["keep0"], masks["keep1"], (0, -1, 1, 2, 1)),
                "pair_scale": self._pair(*scales, (0, -1, 1, 1, 2, 1)),
                "future": g.op("Cast", [g.op("Squeeze", [g.op("Add", future), g.i64(1)])],
                               to=spec.float_type)}

    def _pair(self, first: str, second: str, shape: tuple[int, ...]) -> str:
        """Two per-row flags [B, 1, S, 1] as one [B, S, ..., 2, ...] tensor (``shape``) in the
        graph's float type, broadcasting over the heads of a [B, S, heads, 2, D] layout."""
        g = self.g
        both = g.op("Concat", [first, second], axis=-1)  # [B, 1, S, 2]
        return g.op("Cast", [g.op("Reshape", [both, g.i64(*shape)])], to=self.spec.float_type)

    def _head_pair_bias(self, image: str, text: str) -> str:
        """[B, 1, S, T] per softmax -> [B, 2H, S, T], head 2h + j the softmax j's mask.
        GroupQueryAttention broadcasts a head axis of 1 only, so the bias is per head."""
        g, heads = self.g, self.spec.num_heads
        pair = g.op("Concat", [g.op("Unsqueeze", [b, g.i64(2)]) for b in (image, text)], axis=2)
        pair = g.op("Cast", [pair], to=self.spec.float_type)  # [B, 1, 2, S, T]
        expanded = g.op("Expand", [pair, g.i64(1, heads, 1, 1, 1)])  # [B, H, 2, S, T]
        shape = g.op("Mul", [g.op("Shape", [image]), g.i64(1, 2 * heads, 1, 1)])
        return g.op("Reshape", [expanded, shape])

    def _causal_counts(self, lengths: str) -> str:
        """[B, 1, S, 1] fp32: how many keys query i sees in GroupQueryAttention (its row's
        length, ``_gqa_inputs``' count of the mask's non-zeros, minus S plus i + 1)."""
        g = self.g
        length = g.op("Cast", [g.op("Unsqueeze", [lengths, g.i64(1)])], to=TensorProto.FLOAT)  # [B, 1]
        seq = g.op("Cast", [g.op("Shape", [c.INPUTS_EMBEDS], start=1, end=2)], to=TensorProto.FLOAT)
        one = g.const(np.float32(1))
        steps = g.op("Range", [one, g.op("Add", [g.op("Squeeze", [seq]), one]), one])  # 1..S
        counts = g.op("Add", [g.op("Sub", [length, seq]), g.op("Unsqueeze", [steps, g.i64(0)])])
        return g.op("Reshape", [counts, g.i64(0, 1, -1, 1)])

    def _uniform_future(self, type_ok: str, causal_ok: str, keep: str, causal_count: str
                        ) -> tuple[str, str]:
        """A uniform row (``keep`` 0) averages over its masked-once keys: every key up to the
        query (none has the softmax's type), which GroupQueryAttention averages, and the keys
        of the type after it, all new in this pass. Returns (scale [B, 1, S, 1], weights
        [B, 1, S, S] over the pass's new values), both fp32: the row's output is scale * the
        op's + weights @ V_new; for any other row (and every decode step) exactly 1 and 0."""
        g = self.g
        after = g.op("And", [type_ok, g.op("Not", [causal_ok])])  # [B, 1, S, T]
        seq = g.op("Shape", [c.INPUTS_EMBEDS], start=1, end=2)
        after = g.op("Slice", [after, g.op("Neg", [seq]), g.i64(np.iinfo(np.int64).max),
                               g.i64(3)])  # the new keys: [B, 1, S, S]
        uniform = g.op("Equal", [keep, g.const(np.float32(0))])
        future = g.op("Cast", [g.op("And", [after, uniform])], to=TensorProto.FLOAT)
        total = g.op("Add", [causal_count, g.op("ReduceSum", [future, g.i64(-1)], keepdims=1)])
        return g.op("Div", [causal_count, total]), g.op("Div", [future, total])

    def _rope_tables(self) -> dict[str, str]:
        """cos/sin [B, 1, S, D] for position_ids, as LlamaDecoder.rope computes them."""
        g, spec = self.g, self.spec
        inv = np.concatenate([spec.inv_freq, spec.inv_freq]).astype(np.float32)  # cat(freqs, freqs)
        pos = g.op("Cast", [c.POSITION_IDS], to=TensorProto.FLOAT)
        freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.i64(-1)]), g.const(inv, "rotary.inv_freq")])
        tables = {}
        for name, fn in (("cos", "Cos"), ("sin", "Sin")):
            value = g.op(fn, [freqs])
            if spec.rope_scaling != 1.0:
                value = g.op("Mul", [value, g.const(np.float32(spec.rope_scaling))])
            value = g.op("Cast", [value], to=spec.float_type)
            tables[name] = g.op("Unsqueeze", [value, g.i64(1)])
        return tables

    def _softmax_masks(self) -> dict[str, str]:
        """dsvl/decoder.py's attention_biases in ONNX ops: (bias, keep) per softmax, with the
        causal [S, T] and (MMCA) each softmax's key-type [B, 1, S or 1, T] conditions."""
        g = self.g
        total = g.op("Shape", [c.ATTENTION_MASK], start=1, end=2)
        seq = g.op("Shape", [c.INPUTS_EMBEDS], start=1, end=2)
        past = g.op("Sub", [total, seq])
        zero, one = g.i64(0), g.i64(1)
        key_pos = g.op("Unsqueeze", [g.op("Range", [g.op("Squeeze", [zero]), g.op("Squeeze", [total]),
                                                   g.op("Squeeze", [one])]), zero])  # [1, T]
        query_pos = g.op("Unsqueeze", [g.op("Add", [g.op("Range", [
            g.op("Squeeze", [zero]), g.op("Squeeze", [seq]), g.op("Squeeze", [one])]), past]), one])
        causal_ok = g.op("LessOrEqual", [key_pos, query_pos])  # [S, T]
        keys = g.op("Unsqueeze", [c.ATTENTION_MASK, g.i64(1, 2)])  # [B, 1, 1, T]
        out: dict[str, str] = {"causal": causal_ok}
        if not self.spec.mmca:
            out["bias0"], out["keep0"] = self._softmax_mask(
                g.op("Greater", [keys, g.const(np.int64(0))]), causal_ok)
            return out
        queries = g.op("Slice", [c.ATTENTION_MASK, g.op("Neg", [seq]), g.i64(np.iinfo(np.int64).max),
                                 one])  # [B, S]
        is_image_query = g.op("Equal", [queries, g.const(np.int64(c.MASK_IMAGE))])
        no_past = g.op("Equal", [past, zero])
        image_query = g.op("And", [g.op("Unsqueeze", [is_image_query, g.i64(1, 3)]), no_past])  # [B,1,S,1]
        own_key = g.op("Equal", [key_pos, query_pos])
        image_keys = g.op("Equal", [keys, g.const(np.int64(c.MASK_IMAGE))])
        image_ok = g.op("Or", [g.op("And", [image_query, own_key]),
                               g.op("And", [g.op("Not", [image_query]), image_keys])])
        text_ok = g.op("Equal", [keys, g.const(np.int64(c.MASK_TEXT))])
        out["type0"], out["type1"] = image_ok, text_ok
        out["bias0"], out["keep0"] = self._softmax_mask(image_ok, causal_ok)
        out["bias1"], out["keep1"] = self._softmax_mask(text_ok, causal_ok)
        return out

    def _softmax_mask(self, type_ok: str, causal_ok: str) -> tuple[str, str]:
        g = self.g
        allowed = g.op("And", [type_ok, causal_ok])
        has_allowed = g.op("ReduceMax", [g.op("Cast", [allowed], to=TensorProto.FLOAT)], axes=[-1],
                           keepdims=1)
        masked_once = g.op("Xor", [type_ok, causal_ok])
        uniform = g.op("Equal", [has_allowed, g.const(np.float32(0))])
        keep = g.op("Or", [g.op("And", [allowed, g.op("Not", [uniform])]),
                           g.op("And", [masked_once, uniform])])
        bias = g.op("Where", [keep, g.const(np.float32(0)), g.const(np.float32(MASKED))])
        return bias, has_allowed

    def _projections(self, x: str, names: list[str], key: str, split: bool) -> list[str]:
        """x through several Linear layers: one packed MatMul when fused (split again when the
        caller needs the parts), one MatMul each in standard ops (the traced graph's weights)."""
        spec, g = self.spec, self.g
        biases = [n.replace(".weight", ".bias") for n in names]
        has_bias = spec.attention_bias if ".self_attn." in names[0] else spec.mlp_bias
        if not self.fused:
            outs = []
            for name, bias in zip(names, biases, strict=True):
                part = name.removesuffix(".weight")
                out = self.matmul(x, [name], part)
                outs.append(self.bias(out, [bias], part) if has_bias else out)
            return outs
        out = self.matmul(x, names, key)
        if has_bias:
            out = self.bias(out, biases, key)
        if not split:
            return [out]
        sizes = g.i64(*(self._rows(n) for n in names))
        return g.op("Split", [out, sizes], len(names), axis=-1)

    def _attention(self, x: str, index: int, masks: dict[str, str]) -> str:
        spec = self.spec
        prefix = f"model.layers.{index}.self_attn"
        position = self.spec.layer_ids.index(index)
        names = [f"{prefix}.{p}_proj.weight" for p in ("q", "k", "v")]
        packed = self.gqa and not spec.mmca  # GroupQueryAttention takes the packed QKV as it is
        qkv = self._projections(x, names, f"{prefix}.qkv_proj", split=not packed)
        cache = (c.past_key_name(position), c.past_value_name(position),
                 c.present_key_name(position), c.present_value_name(position))
        if packed:
            out = self._gqa(qkv[0], "", "", cache, masks, prefix, spec.num_heads)
        elif self.gqa:
            out = self._mmca_attention(*qkv, cache, masks, prefix)
        else:
            out = self._standard_attention(*qkv, masks, *cache, prefix)
        return self._projections(out, [f"{prefix}.o_proj.weight"], f"{prefix}.o_proj", split=False)[0]

    def _gqa(self, q: str, k: str, v: str, cache: tuple[str, str, str, str],
             masks: dict[str, str], prefix: str, heads: int, bias: list[str] | None = None) -> str:
        """One GroupQueryAttention node (rotary inside) over the cache; returns its output."""
        g, spec = self.g, self.spec
        past_k, past_v, present_k, present_v = cache
        inputs = [q, k, v, past_k, past_v, masks["seqlens_k"], masks["total"], masks["cos"],
                  masks["sin"], c.POSITION_IDS] + (bias or [])
        return g.op("GroupQueryAttention", inputs, [f"/{prefix}/attn", present_k, present_v],
                    domain="com.microsoft", name=f"/{prefix}/GroupQueryAttention", num_heads=heads,
                    kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0)[0]

    def _mmca_attention(self, q: str, k: str, v: str, cache: tuple[str, str, str, str],
                        masks: dict[str, str], prefix: str) -> str:
        """DSVL's softmax_img + softmax_txt as one GroupQueryAttention over the query heads
        twice (a uniform row's copy zeroed), each pair's outputs summed, plus the average over
        keys after the query that a uniform row of a prompt pass includes (``_mmca_inputs``)."""
        g, spec = self.g, self.spec
        heads, kv, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        pairs = g.op("Mul", [g.op("Reshape", [q, g.i64(0, 0, heads, 1, dim)]), masks["q_keep"]])
        query = g.op("Reshape", [pairs, g.i64(0, 0, 2 * heads * dim)])
        out = self._gqa(query, k, v, cache, masks, prefix, 2 * heads, [masks["bias"]])
        out = g.op("Reshape", [out, g.i64(0, 0, kv, heads // kv, 2, dim)])
        out = g.op("ReduceSum", [g.op("Mul", [out, masks["pair_scale"]]), g.i64(4)], keepdims=0)
        fill = g.op("MatMul", [masks["future"], v])  # [B, S, kv * D]
        fill = g.op("Reshape", [fill, g.i64(0, 0, kv, 1, dim)])  # each kv head's query heads
        return g.op("Reshape", [g.op("Add", [out, fill]), g.i64(0, 0, heads * dim)])

    def _heads(self, x: str, heads: int) -> str:
        """[B, S, heads*D] -> [B, heads, S, D]."""
        g = self.g
        shaped = g.op("Reshape", [x, g.i64(0, 0, heads, self.spec.head_dim)])
        return g.op("Transpose", [shaped], perm=[0, 2, 1, 3])

    def _rotate(self, x: str, masks: dict[str, str]) -> str:
        g, half = self.g, self.spec.head_dim // 2
        first, second = g.op("Split", [x, g.i64(half, half)], 2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [x, masks["cos"]]), g.op("Mul", [rotated, masks["sin"]])])

    def _standard_attention(self, q: str, k: str, v: str, masks: dict[str, str], past_k: str,
                            past_v: str, present_k: str, present_v: str, prefix: str) -> str:
        spec, g = self.spec, self.g
        q = self._rotate(self._heads(q, spec.num_heads), masks)
        k = self._rotate(self._heads(k, spec.num_kv_heads), masks)
        v = self._heads(v, spec.num_kv_heads)
        key = g.op("Concat", [past_k, k], [present_k], axis=2, name=f"/{prefix}/concat_key")
        value = g.op("Concat", [past_v, v], [present_v], axis=2, name=f"/{prefix}/concat_value")
        groups = spec.num_heads // spec.num_kv_heads
        if groups > 1:
            key, value = (self._repeat_kv(t, groups) for t in (key, value))
        scores = g.op("MatMul", [q, g.op("Transpose", [key], perm=[0, 1, 3, 2])])
        scores = g.op("Mul", [scores, g.const(np.array(spec.head_dim ** -0.5, spec.np_float))])
        scores = g.op("Cast", [scores], to=TensorProto.FLOAT)
        probs = self._masked_softmax(scores, masks["bias0"], masks["keep0"])
        if spec.mmca:  # DSVL sums the image and the text softmax
            probs = g.op("Add", [probs, self._masked_softmax(scores, masks["bias1"], masks["keep1"])])
        out = g.op("MatMul", [g.op("Cast", [probs], to=spec.float_type), value])
        out = g.op("Transpose", [out], perm=[0, 2, 1, 3])
        return g.op("Reshape", [out, g.i64(0, 0, spec.num_heads * spec.head_dim)])

    def _masked_softmax(self, scores: str, bias: str, keep: str) -> str:
        g = self.g
        return g.op("Softmax", [g.op("Add", [g.op("Mul", [scores, keep]), bias])], axis=-1)

    def _repeat_kv(self, x: str, groups: int) -> str:
        """[B, KV, T, D] -> [B, KV*groups, T, D], each head repeated (repeat_interleave)."""
        g, spec = self.g, self.spec
        expanded = g.op("Expand", [g.op("Unsqueeze", [x, g.i64(2)]), g.i64(1, 1, groups, 1, 1)])
        return g.op("Reshape", [expanded, g.i64(0, spec.num_heads, -1, spec.head_dim)])

    # ------------------------------------------------------------------ MLP
    def _mlp(self, x: str, prefix: str) -> str:
        g = self.g
        names = [f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up")]
        gate, up = self._projections(x, names, f"{prefix}.mlp.gate_up_proj", split=True)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        return self._projections(g.op("Mul", [act, up]), [f"{prefix}.mlp.down_proj.weight"],
                                 f"{prefix}.mlp.down_proj", split=False)[0]
