"""The int4 LM head's best candidates rescored at 8 bits.

A 4-bit LM head moves the top-1 token more than the rest of a 4-bit decoder does (docs/
benchmarks.md: on SmolLM2-135M, top-1 against fp32 goes from 83 to 91 of 128 with an 8-bit
head). An 8-bit head costs what its bytes cost on every step; llama.cpp pays it (Q4_0 keeps the
output tensor at Q6_K). Rescoring pays it only for ``k`` rows: the 4-bit head gives every
logit, ``TopK`` takes its ``k`` best, ``GatherBlockQuantized`` reads those rows of an 8-bit copy
of the head (dequantized by its block scales), one small MatMul with the fp32 hidden state gives
their logits, and ``ScatterElements`` writes them over the 4-bit ones. The top-1 token is then
the 8-bit head's whenever it lies among the 4-bit head's ``k`` best, and the other logits stay
at 4 bits (what sampling from the tail sees). The 8-bit rows cost memory (1.06 bytes per head
weight beside the 4-bit head's 0.53 at block 128) but no step reads more than ``k`` of them.

The graph's greedy pick (``next_token``, runtime/contract.py) comes from the same ``TopK``
without scanning the logits again: it takes ``k + 1`` candidates, rescores the first ``k``, and
the pick is the best of the ``k`` rescored logits and the ``k + 1``-th 4-bit one, which is the
largest logit of every token not rescored (``TopK`` orders equal values by index, so it is also
the first such token). Among equal logits the lowest token id wins, as numpy's ``argmax``
picks the first: the pick is ``argmax`` of the rescored logits, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from export.onnx_stream import quantize_nbits
from runtime import contract as c

DEFAULT_TOP_K = 16  # candidates rescored per position
# The rescored head's 4-bit pass only picks the candidates and gives the tail's logits, so it
# takes 128-wide blocks (4.25 bits per weight against 5 at block 32: ~20% less to read) and the
# rescoring rows keep block 32.
APPROX_HEAD_BLOCK = 128
ROWS_SUFFIX = ".rescore_rows_Q8"  # initializer names, after the head weight's name
SCALES_SUFFIX = ".rescore_scales"


@dataclass
class RescoreNames:
    """The tensors the rescoring reads and writes."""

    hidden: str  # the final normed hidden state [B, S, K] the head multiplies
    approx: str  # the 4-bit head's logits [B, S, V]
    logits: str  # the rescored logits [B, S, V]
    rows: str  # uint8 [V, K]: the head at 8 bits, zero point 128
    scales: str  # [V, K / block]: its block scales, in the graph's float type
    prefix: str = "/lm_head/rescore"
    greedy: str | None = None  # int64 [B, S]: each position's pick from ``logits`` (None: not built)


def rescore_weights(weight_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit rows [V, K] and scales [V, K / block] of a head weight [K, V]: MatMulNBits'
    symmetric 8-bit layout, which is also GatherBlockQuantized's (uint8, zero point 128)."""
    packed, scales = quantize_nbits(weight_kn, 8, block_size)
    return packed.reshape(packed.shape[0], -1), scales


def rescore_nodes(names: RescoreNames, top_k: int, block_size: int) -> tuple[list[onnx.NodeProto],
                                                                           list[TensorProto]]:
    """The nodes that turn ``approx`` into ``logits`` (and ``greedy``, if named), and their
    small constants."""
    p = names.prefix
    k_name, axis_name = f"{p}/k", f"{p}/last_axis"
    picks = top_k + (1 if names.greedy else 0)  # the k+1-th: the best logit not rescored
    consts = [onnx.numpy_helper.from_array(np.array([picks], np.int64), k_name),
              onnx.numpy_helper.from_array(np.array([-1], np.int64), axis_name)]
    index = f"{p}/index"
    nodes = [oh.make_node("TopK", [names.approx, k_name], [f"{p}/values", f"{p}/candidates" if names.greedy
                                                            else index], axis=-1, name=f"{p}/TopK")]
    if names.greedy:
        consts += [onnx.numpy_helper.from_array(np.array([v], np.int64), f"{p}/at{v}") for v in (0, top_k, picks)]
        nodes += [oh.make_node("Slice", [f"{p}/candidates", f"{p}/at0", f"{p}/at{top_k}", axis_name], [index],
                               name=f"{p}/Slice")]
    nodes += [
        oh.make_node("GatherBlockQuantized", [names.rows, index, names.scales],
                     [f"{p}/rows"], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                     block_size=block_size, bits=8, name=f"{p}/GatherBlockQuantized"),  # [B,S,k,K]
        oh.make_node("Unsqueeze", [names.hidden, axis_name], [f"{p}/hidden"], name=f"{p}/Unsqueeze"),
        oh.make_node("MatMul", [f"{p}/rows", f"{p}/hidden"], [f"{p}/dot"], name=f"{p}/MatMul"),
        oh.make_node("Squeeze", [f"{p}/dot", axis_name], [f"{p}/exact"], name=f"{p}/Squeeze"),
        oh.make_node("ScatterElements", [names.approx, index, f"{p}/exact"], [names.logits],
                     axis=-1, name=f"{p}/ScatterElements"),
    ]
    if names.greedy:
        nodes += greedy_nodes(p, top_k, picks, names.greedy)
        consts.append(onnx.numpy_helper.from_array(np.array(np.iinfo(np.int64).max, np.int64), f"{p}/no_token"))
    return nodes, consts


def greedy_nodes(p: str, top_k: int, picks: int, out: str) -> list[onnx.NodeProto]:
    """The pick among the ``top_k`` rescored logits and the best one not rescored: the lowest
    token id among those equal to their maximum (opset 17: reductions take ``axes`` attributes)."""
    return [
        oh.make_node("Slice", [f"{p}/values", f"{p}/at{top_k}", f"{p}/at{picks}", f"{p}/last_axis"],
                     [f"{p}/rest"], name=f"{p}/SliceRest"),
        oh.make_node("Concat", [f"{p}/exact", f"{p}/rest"], [f"{p}/finalists"], axis=-1, name=f"{p}/Concat"),
        oh.make_node("ReduceMax", [f"{p}/finalists"], [f"{p}/best"], axes=[-1], keepdims=1, name=f"{p}/ReduceMax"),
        oh.make_node("Equal", [f"{p}/finalists", f"{p}/best"], [f"{p}/is_best"], name=f"{p}/Equal"),
        oh.make_node("Where", [f"{p}/is_best", f"{p}/candidates", f"{p}/no_token"], [f"{p}/best_ids"],
                     name=f"{p}/Where"),
        oh.make_node("ReduceMin", [f"{p}/best_ids"], [out], axes=[-1], keepdims=0, name=f"{p}/ReduceMin"),
    ]


def add_to_model(model: onnx.ModelProto, head_node: str, weight_kn: np.ndarray, block_size: int,
                 top_k: int = DEFAULT_TOP_K) -> None:
    """Rescore the logits of a quantized model's LM head node ``head_node`` (a MatMulNBits)
    in place: its consumers read the rescored logits instead. A graph's ``next_token`` (an
    ``ArgMax`` of its logits) comes from the rescoring's candidates instead."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == head_node)
    approx = node.output[0]
    if any(output.name == approx for output in graph.output):
        # The head writes the graph's logits itself: it now writes the 4-bit logits under a
        # name of their own, and the rescoring writes the graph's output (which its readers
        # go on reading).
        rescored, approx = approx, approx + "/approx"
        node.output[0] = approx
    else:
        rescored = approx + "/rescored"
        for consumer in graph.node:
            for i, name in enumerate(consumer.input):
                if name == approx:
                    consumer.input[i] = rescored
    greedy = None
    argmax = [n for n in graph.node if c.NEXT_TOKEN in n.output]
    if argmax:
        graph.node.remove(argmax[0])
        greedy = c.NEXT_TOKEN
    rows, scales = rescore_weights(weight_kn, block_size)
    weight_name = node.input[1]
    names = RescoreNames(hidden=node.input[0], approx=approx, logits=rescored,
                         rows=weight_name + ROWS_SUFFIX, scales=weight_name + SCALES_SUFFIX, greedy=greedy)
    nodes, consts = rescore_nodes(names, top_k, block_size)
    graph.initializer.extend([onnx.numpy_helper.from_array(rows, names.rows),
                              onnx.numpy_helper.from_array(scales, names.scales), *consts])
    position = list(graph.node).index(node) + 1
    for offset, new in enumerate(nodes):  # the head node is a MatMulNBits: com.microsoft is imported
        graph.node.insert(position + offset, new)
