"""The vision half of DSVL: the vision encoder followed by a projector.

The encoder is CLIP (its ``last_hidden_state``) or Qwen-VL's ViT (dsvl/qwen_vision.py, a tensor
``[images, 256, 4096]``), as DSVL's ``create_dsvl_model_and_transforms`` chooses.

Attribute names match DSVL's ``DeepSpeedViLModel`` (``vis_encoder``, ``projection``) so the
``vis_encoder.*`` / ``projection.*`` keys of a DSVL checkpoint load directly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from dsvl.interpolate import resize_table
from dsvl.projectors import PerceiverProjector, build_projector
from dsvl.qwen_vision import QwenVisionTransformer


def build_clip(config: CLIPVisionConfig) -> CLIPVisionModel:
    config._attn_implementation = "eager"  # plain matmul/softmax: identical math in ONNX
    return CLIPVisionModel(config)


class DSVLVision(nn.Module):
    """pixel_values [images, 3, H, W] -> image_embeds [images, tokens, lang_dim]."""

    def __init__(self, vis_encoder: CLIPVisionModel | QwenVisionTransformer, projection: nn.Module,
                 vis_proj: str):
        super().__init__()
        self.vis_encoder = vis_encoder
        self.projection = projection
        self.vis_proj = vis_proj
        self.graph_friendly = False  # set by the exporter

    @classmethod
    def from_config(cls, vis_config: CLIPVisionConfig, lang_dim: int, vis_proj: str) -> DSVLVision:
        return cls(build_clip(vis_config), build_projector(vis_proj, vis_config, lang_dim), vis_proj)

    def set_graph_friendly(self, enabled: bool = True) -> None:
        """Compute every resize as dynamic matrix products (for ONNX/TensorRT export)."""
        self.graph_friendly = enabled
        if isinstance(self.vis_encoder, QwenVisionTransformer):
            self.vis_encoder.set_graph_friendly(enabled)
        if isinstance(self.projection, PerceiverProjector):
            self.projection.graph_friendly_resize = enabled

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's last_hidden_state (or Qwen's resampled tokens); positions follow the input's
        patch grid."""
        if isinstance(self.vis_encoder, QwenVisionTransformer):
            return self.vis_encoder(pixel_values)
        if not self.graph_friendly:
            size = self.vis_encoder.config.image_size
            same = pixel_values.shape[-2] == size and pixel_values.shape[-1] == size
            out = self.vis_encoder(pixel_values=pixel_values, interpolate_pos_encoding=not same)
            return out.last_hidden_state
        hidden = self._embeddings(pixel_values)
        hidden = self.vis_encoder.pre_layrnorm(hidden)
        return self.vis_encoder.encoder(inputs_embeds=hidden).last_hidden_state

    def _embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.vis_encoder.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))
        grid_h, grid_w = patches.shape[2], patches.shape[3]
        patches = patches.flatten(2).transpose(1, 2)
        cls = emb.class_embedding.reshape(1, 1, -1).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        table = emb.position_embedding.weight
        side = emb.image_size // emb.patch_size  # the trained grid (a Python int)
        patch_pos = resize_table(table[1:], side, grid_h, grid_w)
        pos = torch.cat([table[:1], patch_pos], dim=0)
        return tokens + pos.unsqueeze(0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encode(pixel_values))
