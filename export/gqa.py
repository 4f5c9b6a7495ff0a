"""Export-only: trace the decoder's attention as ONNX Runtime's GroupQueryAttention over an
in-place KV cache, as a context manager in the style of Optimum's ``ModelPatcher``.

dsvl/decoder.py stays the PyTorch reference (its own attention math, softmax masks); inside
``group_query_attention(decoder)`` each layer's attention is swapped for the contrib op and the
decoder hands the layers cache lengths instead of masks, and on leaving the reference is back
as it was. Causal attention only: the traced graph has no MMCA form over this cache (the built
fused graph has, export/decoder_graph.py's ``_mmca_attention``).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsvl.decoder import Attention, LlamaDecoder, rotate_half


class GroupQueryAttentionOp(torch.autograd.Function):
    """Exports as ONNX Runtime's ``com.microsoft.GroupQueryAttention`` with the KV cache in
    shared, preallocated buffers: the op writes the new keys/values in place at the positions
    given by ``seqlens_k``, so no step copies the cache. Its eager forward only produces
    correctly shaped outputs for tracing; PyTorch itself runs ``Attention``'s own math."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length,
                num_heads: int, kv_heads: int):
        return query.new_zeros(query.shape), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length,
                 num_heads: int, kv_heads: int):
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value,
            seqlens_k, total_length, num_heads_i=num_heads, kv_num_heads_i=kv_heads, outputs=3)
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def cache_lengths(attention_mask: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupQueryAttention wants lengths, not masks: (seqlens_k [B] = P + S - 1, P + S)."""
    total = torch.ones_like(attention_mask[:1]).sum().to(torch.int32)  # P + S, traced
    return (total - 1).reshape(1).expand(attention_mask.shape[0]), total


def gqa_forward(self: Attention, x, cos, sin, lengths, past_key, past_value):
    """``Attention.forward`` for export: rope in [B, S, heads, D] layout, then the op."""
    batch, seq, _ = x.shape
    q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
    k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, S, 1, D]
    q = (q * cos + rotate_half(q) * sin).reshape(batch, seq, -1)
    k = (k * cos + rotate_half(k) * sin).reshape(batch, seq, -1)
    seqlens_k, total_length = lengths
    out, key, value = GroupQueryAttentionOp.apply(
        q, k, self.v_proj(x), past_key, past_value, seqlens_k, total_length,
        self.num_heads, self.num_kv_heads)
    return self.o_proj(out), key, value


@contextmanager
def group_query_attention(decoder: LlamaDecoder) -> Iterator[LlamaDecoder]:
    """Within the block, ``decoder`` traces as GroupQueryAttention over in-place KV buffers
    (ONNX Runtime only); the instance overrides are removed on leaving."""
    if decoder.mmca:
        raise ValueError("the traced graph's shared (in-place) KV cache has no MMCA: export "
                         "MMCA models with --decoder-graph fused, or --kv-cache concat")
    attentions = [layer.self_attn for layer in decoder.model.layers]
    decoder.attention_inputs = cache_lengths
    for attention in attentions:
        attention.forward = types.MethodType(gqa_forward, attention)
    try:
        yield decoder
    finally:
        del decoder.attention_inputs
        for attention in attentions:
            del attention.forward
