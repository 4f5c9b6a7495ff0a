"""A decoder.onnx session run pass after pass, each pass's present cache fed back as the next
pass's past: the loop every parity check of a decoder graph runs (export.decoder's whole-graph
check, export.decoder_stream's per-layer check, the graph tests), written once so the three
bind the cache, positions and ``logits_to_keep`` alike, and check a graph's ``next_token``
against its logits' argmax alike. numpy and onnxruntime only."""

from __future__ import annotations

import numpy as np

from export.checks import ContractError
from runtime import contract as c


def positions_of(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` positions of a 0/1/2 mask: ``cumsum(mask > 0) - 1``,
    as dsvl.generate.position_ids_for computes them."""
    return ((mask > 0).astype(np.int64).cumsum(-1) - 1)[:, -seq:]


class CacheFeed:
    """Call with (embeds [1, S, hidden], mask [1, past + S]) per pass; returns that pass's
    logits for every position. The cache starts as zeros of ``length`` positions for each cache
    input the graph has (0 for a concat cache; the whole check's length for an in-place one)."""

    def __init__(self, session, kv_heads: int, head_dim: int, length: int = 0):
        inputs = {arg.name: arg for arg in session.get_inputs()}
        self.session = session
        self.dtype = c.numpy_dtype(c.ORT_DTYPES[inputs[c.INPUTS_EMBEDS].type])
        self.outputs = [arg.name for arg in session.get_outputs()]
        # every logit row, where a fused graph would otherwise compute the last one only
        self.keep = {c.LOGITS_TO_KEEP: np.array(0, np.int64)} if c.LOGITS_TO_KEEP in inputs else {}
        shape = (1, kv_heads, length, head_dim)
        self.cache = {name: np.zeros(shape, self.dtype) for name in inputs if c.is_past_name(name)}

    def __call__(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, np.int64)
        feeds = {c.INPUTS_EMBEDS: np.asarray(embeds).astype(self.dtype), c.ATTENTION_MASK: mask,
                 c.POSITION_IDS: positions_of(mask, embeds.shape[1])}
        out = dict(zip(self.outputs, self.session.run(self.outputs, feeds | self.keep | self.cache),
                       strict=True))
        self.cache = {c.PAST_PREFIX + name.removeprefix(c.PRESENT_PREFIX): value
                      for name, value in out.items() if c.is_present_name(name)}
        if c.NEXT_TOKEN in out:
            check_picks(out[c.NEXT_TOKEN], out[c.LOGITS])
        return out[c.LOGITS]


def check_picks(picks: np.ndarray, logits: np.ndarray) -> None:
    """A graph's ``next_token`` [B, S] must be its logits' [B, S, V] argmax, first index on
    ties: the generation loop reads it in place of the argmax (an exporter bug otherwise)."""
    want = logits.argmax(-1)
    if picks.shape != want.shape or not np.array_equal(picks, want):
        raise ContractError(f"decoder.onnx's {c.NEXT_TOKEN} {picks.ravel()[:8].tolist()} is not its logits' "
                            f"argmax {want.ravel()[:8].tolist()}: a bug in the exporter")
