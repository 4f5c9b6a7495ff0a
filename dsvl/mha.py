"""``nn.MultiheadAttention``'s math spelled out, every size taken from the inputs.

The legacy ONNX tracer freezes ``nn.MultiheadAttention``'s sequence and batch sizes to the
dummy input's, and its fused fast path does not export (pytorch #111800, #143107), so the
perceiver and Qwen's resampler export this instead. Softmax runs in fp32, so an fp16 graph
stays accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> torch.Tensor:
    """[Lq, N, E], [Lk, N, E], [Lk, N, E] (sequence first, as ``attn`` takes them) -> [Lq, N, E],
    with ``attn``'s weights in PyTorch's [q; k; v] layout."""
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    heads = attn.num_heads
    head_dim = attn.embed_dim // heads

    def split(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, w, b)  # [len, N, E]
        return x.reshape(x.shape[0], x.shape[1] * heads, head_dim).transpose(0, 1)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    scores = torch.bmm(q * head_dim**-0.5, k.transpose(1, 2)).float()
    out = torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [N*heads, Lq, head_dim]
    out = out.transpose(0, 1).reshape(query.shape[0], query.shape[1], attn.embed_dim)
    return attn.out_proj(out)
