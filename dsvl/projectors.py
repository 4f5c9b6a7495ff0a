"""DSVL's three vision-to-language projectors, with the reference's parameter names.

``baseline`` is ``nn.Sequential(Linear, LayerNorm)`` (keys ``0.*``/``1.*``), ``vit`` holds
``vis_layer`` + ``projection``, ``perceiver`` holds ``query``, ``pos_embed``, ``kv_proj``,
``ln_q``, ``ln_kv``, ``attn`` and ``projection``; a DSVL ``pytorch_model.bin`` therefore loads
its ``projection.*`` keys straight into these modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from dsvl.config import PERCEIVER_GRID, PERCEIVER_HEAD_DIM, PROJ_LN_EPS, check_vis_proj
from dsvl.errors import ConfigError
from dsvl.interpolate import resize_table
from dsvl.mha import multihead_attention


def build_projector(vis_proj: str, vis_config: CLIPVisionConfig, lang_dim: int) -> nn.Module:
    check_vis_proj(vis_proj)
    if vis_proj == "baseline":
        return nn.Sequential(nn.Linear(vis_config.hidden_size, lang_dim),
                             nn.LayerNorm(lang_dim, eps=PROJ_LN_EPS))
    if vis_proj == "vit":
        return ViTProjector(vis_config, lang_dim)
    return PerceiverProjector(vis_config, lang_dim)


class ViTProjector(nn.Module):
    """One more CLIP encoder layer over all tokens, then Linear + LayerNorm."""

    def __init__(self, vis_config: CLIPVisionConfig, lang_dim: int):
        super().__init__()
        self.vis_layer = CLIPEncoderLayer(vis_config)
        self.projection = nn.Sequential(nn.Linear(vis_config.hidden_size, lang_dim),
                                        nn.LayerNorm(lang_dim, eps=PROJ_LN_EPS))

    def forward(self, vis_feature: torch.Tensor) -> torch.Tensor:
        out = self.vis_layer(vis_feature, None)
        if isinstance(out, tuple):  # older transformers return a tuple
            out = out[0]
        return self.projection(out)


class PerceiverProjector(nn.Module):
    """256 learned queries cross-attend to the patch tokens (CLS dropped); always 256 out.

    The key positional embedding is ``pos_embed`` resized bicubically from 16x16 to
    ``int(sqrt(tokens incl. CLS))`` squared, as DSVL's ``get_abs_pos`` does. ``pos_embed`` is a
    parameter because DSVL trains and saves it; the sin-cos formula only initialises it.
    """

    def __init__(self, vis_config: CLIPVisionConfig, lang_dim: int):
        super().__init__()
        if lang_dim % PERCEIVER_HEAD_DIM:
            raise ConfigError(f"perceiver needs lang_dim divisible by {PERCEIVER_HEAD_DIM}, got {lang_dim}")
        self.num_queries = PERCEIVER_GRID**2
        self.embed_dim = lang_dim
        self.num_heads = lang_dim // PERCEIVER_HEAD_DIM
        sincos = torch.from_numpy(sincos_pos_embed_2d(lang_dim, PERCEIVER_GRID)).float()
        self.pos_embed = nn.Parameter(sincos, requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, lang_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(vis_config.hidden_size, lang_dim)
        self.attn = nn.MultiheadAttention(lang_dim, self.num_heads)
        self.ln_q = nn.LayerNorm(lang_dim, eps=PROJ_LN_EPS)
        self.ln_kv = nn.LayerNorm(lang_dim, eps=PROJ_LN_EPS)
        self.projection = nn.Sequential(nn.LayerNorm(lang_dim, eps=PROJ_LN_EPS),
                                        nn.Linear(lang_dim, lang_dim))
        self.apply(self._init_weights)
        # Export switches this on: pos resizing as matrix products with a dynamic size.
        self.graph_friendly_resize = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)

    def key_pos_embed(self, num_tokens: torch.Tensor | int) -> torch.Tensor:
        """The key positional embedding for ``num_tokens`` vision tokens (CLS included)."""
        if self.graph_friendly_resize:
            tokens = num_tokens if isinstance(num_tokens, torch.Tensor) else torch.tensor(num_tokens)
            side = torch.floor(torch.sqrt(tokens.to(torch.float32)))
            side = side.to(torch.int64)
            return resize_table(self.pos_embed, PERCEIVER_GRID, side, side)
        side = int(math.sqrt(int(num_tokens)))
        if side == PERCEIVER_GRID:
            return self.pos_embed
        grid = self.pos_embed.float().reshape(1, PERCEIVER_GRID, PERCEIVER_GRID, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, vis_feature: torch.Tensor) -> torch.Tensor:
        pos_embed = self.key_pos_embed(vis_feature.shape[1])
        patches = self.kv_proj(vis_feature[:, 1:, :])
        patches = self.ln_kv(patches).permute(1, 0, 2)  # [tokens, images, dim]
        images = patches.shape[1]
        queries = self.ln_q(self.query).unsqueeze(1).expand(-1, images, -1)
        query_in = queries + self.pos_embed.unsqueeze(1).to(queries.dtype)
        key_in = patches + pos_embed.unsqueeze(1).to(patches.dtype)
        if self.graph_friendly_resize:
            out = multihead_attention(self.attn, query_in, key_in, patches)
        else:
            out = self.attn(query_in, key_in, patches, need_weights=False)[0]
        return self.projection(out.permute(1, 0, 2))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE-style fixed 2-D sin-cos embedding, [grid*grid, embed_dim] (DSVL's initial value)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Angles in float32 as DSVL's and Qwen-VL's code computes them; sin and cos in float64,
    rounded to float32: numpy's float32 sin and cos differ in the last bit between CPUs (AVX2
    and AVX-512 gave different tables), the rounded float64 ones do not, so a seeded model is
    the same model on every machine."""
    omega = np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega).astype(np.float64)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)
