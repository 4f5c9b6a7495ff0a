"""Qwen-VL's vision transformer as DSVL uses it (``qwen-clip``): ViT-bigG/14 + a 256-query resampler.

Parameter names are Qwen-VL's ``transformer.visual.*`` without that prefix and without ``proj``
(DSVL's ``helper/extract_qwen_vl.py`` drops it), so the directory's ``pytorch_model.bin`` loads
strictly and a DSVL checkpoint's ``vis_encoder.*`` keys load over it. The output is a tensor
``[images, 256, output_dim]`` (no ``last_hidden_state``).

Two forwards, switched by ``graph_friendly`` (set by the exporter):

* eager, the reference: ``F.interpolate`` resizes the position tables, the resampler calls
  its ``nn.MultiheadAttention``;
* graph: the tables are resized by matrix products of dynamic size (dsvl/interpolate.py) and the
  resampler's attention is spelled out as matmuls, because the legacy ONNX tracer freezes
  ``nn.MultiheadAttention``'s batch and sequence sizes and its fused fast path does not export
  (pytorch #111800, #143107).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dsvl.config import QWEN_HEAD_DIM, QWEN_LN_EPS, QWEN_QUERIES, QwenVisionConfig
from dsvl.interpolate import resize_table
from dsvl.mha import multihead_attention
from dsvl.projectors import sincos_pos_embed_2d

GRID = math.isqrt(QWEN_QUERIES)  # both position tables are 16x16


def abs_pos(table: torch.Tensor, tokens: torch.Tensor | int, graph_friendly: bool) -> torch.Tensor:
    """Qwen's ``get_abs_pos``: a 16x16 [256, C] table resized bicubically (in fp32) to
    ``int(sqrt(tokens))`` squared rows; unchanged when the side already matches."""
    src = GRID  # a Python constant: the tracer must not see the table's size as data
    if graph_friendly:
        count = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens)
        side = torch.floor(torch.sqrt(count.to(torch.float32))).to(torch.int64)
        return resize_table(table, src, side, side)  # the identity when side == src
    side = int(math.sqrt(int(tokens)))
    if side == src:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, Lq, d] x [B, Lk, d] -> [B, Lq, d]; softmax in fp32 so an fp16 graph stays accurate."""
    scores = torch.bmm(q / math.sqrt(head_dim), k.transpose(1, 2))
    return torch.bmm(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


class VisualAttention(nn.Module):
    """Self-attention over [tokens, images, width] with one fused ``in_proj``.

    The fused projection is laid out per head: output rows ``[h*3*d, (h+1)*3*d)`` hold head h's
    q, k and v in turn (not PyTorch's [q; k; v] blocks).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, images, width = x.shape
        mixed = self.in_proj(x).reshape(tokens, images * self.heads, 3 * self.head_dim).transpose(0, 1)
        q, k, v = mixed.split(self.head_dim, dim=-1)  # each [images*heads, tokens, d]
        out = _attend(q, k, v, self.head_dim)
        out = out.reshape(images, self.heads, tokens, self.head_dim).permute(2, 0, 1, 3)
        return self.out_proj(out.reshape(tokens, images, width))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=QWEN_LN_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=QWEN_LN_EPS)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_size)),
            ("gelu", nn.GELU()),  # exact (erf)
            ("c_proj", nn.Linear(mlp_size, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Holds ``resblocks`` (the checkpoint's ``transformer.resblocks.{i}.*`` keys)."""

    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(config.width, config.heads, config.mlp_size)
                                       for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """256 learned queries cross-attend once to the ViT tokens (``attn_pool``).

    Queries get the fixed 16x16 sin-cos positions (``pos_embed``, saved in the weights), keys the
    same table resized to the token grid, values none. ``attn`` has nn.MultiheadAttention's
    [q; k; v] ``in_proj_weight`` layout.
    """

    def __init__(self, embed_dim: int, kv_dim: int):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, embed_dim // QWEN_HEAD_DIM
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed_2d(embed_dim, GRID)).float(),
                                      requires_grad=False)
        self.query = nn.Parameter(torch.zeros(QWEN_QUERIES, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, self.num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=QWEN_LN_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=QWEN_LN_EPS)
        self.graph_friendly = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [images, tokens, kv_dim]
        key_pos = abs_pos(self.pos_embed, x.shape[1], self.graph_friendly)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [tokens, images, dim]
        queries = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        query_in = queries + self.pos_embed.unsqueeze(1)
        key_in = x + key_pos.unsqueeze(1)
        if self.graph_friendly:
            out = multihead_attention(self.attn, query_in, key_in, x)
        else:
            out = self.attn(query_in, key_in, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class QwenVisionTransformer(nn.Module):
    """pixel_values [images, 3, H, W] -> [images, 256, output_dim], H = W a multiple of the patch."""

    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(QWEN_QUERIES, width))
        self.ln_pre = nn.LayerNorm(width, eps=QWEN_LN_EPS)
        self.transformer = Transformer(config)
        self.attn_pool = Resampler(config.output_dim, width)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=QWEN_LN_EPS)
        self.graph_friendly = False

    def set_graph_friendly(self, enabled: bool) -> None:
        self.graph_friendly = self.attn_pool.graph_friendly = enabled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.graph_friendly and pixel_values.shape[-1] != pixel_values.shape[-2]:
            raise ValueError(f"Qwen-VL's ViT takes square images (its position tables are resized "
                             f"to int(sqrt(tokens)) squared), got {tuple(pixel_values.shape[-2:])}")
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [images, width, grid, grid]
        x = x.flatten(2).permute(0, 2, 1)  # [images, tokens, width]
        x = x + abs_pos(self.positional_embedding, x.shape[1], self.graph_friendly)
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND, as Qwen's blocks expect
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(self.attn_pool(x))
