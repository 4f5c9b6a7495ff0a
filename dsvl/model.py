"""DSVL's composed model: vision tower + projector + two embedding tables + LLaMA decoder.

Attribute names are DSVL's (``vis_encoder``, ``projection``, ``lang_embed``, ``lang_decoder``)
so ``model.load_state_dict(torch.load("pytorch_model.bin"), strict=False)`` works as in DSVL's
chat. ``splice`` reproduces ``DeepSpeedViLModel.concat``: the prompt is embedded with
``lang_embed`` and each ``<image>`` token is replaced by an image's tokens, mask value 2.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from dsvl.config import DSVLConfig
from dsvl.decoder import LlamaDecoder
from dsvl.vision import DSVLVision
from runtime.contract import MASK_IMAGE, MASK_TEXT


class DSVLModel(nn.Module):
    def __init__(self, config: DSVLConfig, vis_encoder: CLIPVisionModel, projection: nn.Module,
                 lang_decoder: LlamaDecoder, image_token_id: int):
        super().__init__()
        self.config = config
        self.vis_encoder = vis_encoder
        self.projection = projection
        self.lang_decoder = lang_decoder
        # DSVL deep-copies the decoder's (resized) token embedding and trains the copy.
        self.lang_embed = nn.Embedding.from_pretrained(
            lang_decoder.model.embed_tokens.weight.detach().clone(), freeze=True)
        self.image_token_id = image_token_id

    def vision(self) -> DSVLVision:
        """The vision half as one module (shares this model's parameters)."""
        return DSVLVision(self.vis_encoder, self.projection, self.config.vis_proj)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision()(pixel_values)

    @torch.no_grad()
    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """[L] prompt ids + [N, T, D] images -> embeds [1, L', D], mask [1, L'] (1 text, 2 image).

        Like DSVL's ``concat``, images are paired with the ``<image>`` positions in reverse
        (``zip(images, flip(positions))``): the first image fills the last ``<image>``. DSVL was
        trained this way, so a faithful export keeps it.
        """
        return splice_embeds(input_ids, image_embeds, self.lang_embed, self.image_token_id)


def splice_embeds(input_ids: torch.Tensor, image_embeds: torch.Tensor | None, embed, image_token_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``DSVLModel.splice`` with the prompt table as any ``embed(ids) -> [L, D]`` (a module, or
    rows of a table read lazily, as the streaming export does)."""
    positions = (input_ids == image_token_id).nonzero(as_tuple=True)[0]
    num_images = 0 if image_embeds is None else image_embeds.shape[0]
    if len(positions) != num_images:
        raise ValueError(f"the prompt has {len(positions)} <image> tokens but {num_images} images were given")
    embeds = embed(input_ids)
    mask = torch.full((len(input_ids),), MASK_TEXT, dtype=torch.long)
    for image, pos in zip(image_embeds if num_images else [], torch.flip(positions, dims=(0,)), strict=False):
        image_mask = torch.full((image.shape[0],), MASK_IMAGE, dtype=torch.long)
        embeds = torch.cat([embeds[:pos], image.to(embeds.dtype), embeds[pos + 1:]])
        mask = torch.cat([mask[:pos], image_mask, mask[pos + 1:]])
    return embeds.unsqueeze(0), mask.unsqueeze(0)
