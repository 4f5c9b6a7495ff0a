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
    input the graph has (0 for a concat cache; the whole check's length for an in-place one), in
    that input's own type (int8 for an export.quantize --kv-cache int8 graph)."""

    def __init__(self, session, kv_heads: int, head_dim: int, length: int = 0):
        inputs = {arg.name: arg for arg in session.get_inputs()}
        self.session = session
        self.dtype = c.numpy_dtype(c.ORT_DTYPES[inputs[c.INPUTS_EMBEDS].type])
        self.outputs = [arg.name for arg in session.get_outputs()]
        # every logit row, where a fused graph would otherwise compute the last one only
        self.keep = {c.LOGITS_TO_KEEP: np.array(0, np.int64)} if c.LOGITS_TO_KEEP in inputs else {}
        shape = (1, kv_heads, length, head_dim)
        self.cache = {name: np.zeros(shape, c.numpy_dtype(c.ORT_DTYPES[arg.type]))
                      for name, arg in inputs.items() if c.is_past_name(name)}

    def feeds(self, embeds: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One pass's inputs: embeddings in the graph's dtype, mask, positions, every logit row
        kept, and the cache as it stands."""
        mask = np.asarray(mask, np.int64)
        return {c.INPUTS_EMBEDS: np.asarray(embeds).astype(self.dtype), c.ATTENTION_MASK: mask,
                c.POSITION_IDS: positions_of(mask, embeds.shape[1])} | self.keep | self.cache

    def __call__(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = dict(zip(self.outputs, self.session.run(self.outputs, self.feeds(embeds, mask)),
                       strict=True))
        self.cache = {c.PAST_PREFIX + name.removeprefix(c.PRESENT_PREFIX): value
                      for name, value in out.items() if c.is_present_name(name)}
        if c.NEXT_TOKEN in out:
            check_picks(out[c.NEXT_TOKEN], out[c.LOGITS])
        return out[c.LOGITS]


def check_picks(picks: np.ndarray, logits: np.ndarray) -> None:
    """A graph's ``next_token`` [B, S] must be its logits' [B, S, V] argmax, first index on
    ties: the generation loop reads it in place of the argmax (an exporter bug otherwise).

    fp16 logits are the exception on ties: ONNX Runtime's CPU provider runs an fp16 head in
    fp32 and drops the Cast pair between it and ``ArgMax``, so the pick sees the unrounded
    logits, and two of them that round to one fp16 value may be picked in either order. There a
    pick must be a maximal logit (docs/design.md, "Greedy picks in fp16")."""
    want = logits.argmax(-1)
    if picks.shape == want.shape and np.array_equal(picks, want):
        return
    if logits.dtype == np.float16 and picks.shape == want.shape:
        picked = np.take_along_axis(logits, picks[..., None], -1)[..., 0]
        if np.array_equal(picked, logits.max(-1)):
            return
    differ = np.flatnonzero(picks.ravel() != want.ravel()) if picks.shape == want.shape else [0]
    at = int(differ[0]) if len(differ) else 0
    raise ContractError(f"decoder.onnx's {c.NEXT_TOKEN} {picks.ravel()[at:at + 8].tolist()} is not its "
                        f"logits' argmax {want.ravel()[at:at + 8].tolist()} (from position {at}, "
                        f"shapes {list(picks.shape)} and {list(want.shape)}): a bug in the exporter")
