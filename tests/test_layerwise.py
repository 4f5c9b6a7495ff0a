"""LayerwiseReference (layer-major, lazily loaded) against the eager LlamaDecoder run pass by
pass with its KV cache: a prompt with text and image positions, then teacher-forced decode
steps, with and without MMCA, over all layers and over a subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsvl.generate import position_ids_for
from dsvl.layerwise import LayerwiseReference
from dsvl.lazy_weights import materialize_decoder, open_decoder_weights
from dsvl.loading import WeightSource
from runtime.contract import MASK_IMAGE, MASK_TEXT

RTOL = 1e-5
TOKENS = [5, 17, 999, 1001]  # 1001 (<image>) lies among DSVL's added rows


def prompt(hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text, image positions (mask 2) and text again: every MMCA case of the prompt pass."""
    mask = torch.tensor([[MASK_TEXT] * 3 + [MASK_IMAGE] * 4 + [MASK_TEXT] * 2 + [MASK_IMAGE] * 3 + [MASK_TEXT] * 2])
    embeds = torch.randn(1, mask.shape[1], hidden, generator=torch.Generator().manual_seed(seed))
    return embeds, mask


@torch.no_grad()
def eager_passes(decoder, embeds: torch.Tensor, mask: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    logits, past = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
    out = [logits]
    for token in tokens:
        mask = torch.cat([mask, torch.full((1, 1), MASK_TEXT)], dim=1)
        step = decoder.model.embed_tokens(torch.tensor([[token]]))
        logits, past = decoder(step, mask, position_ids_for(mask)[:, -1:], past)
        out.append(logits)
    return out


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = ((g - w).abs().max() / w.abs().max()).item()
        assert err <= RTOL, f"pass {i}: relative error {err:.2e}"


@pytest.mark.parametrize("mmca", [False, True])
def test_layerwise_equals_the_full_decoder(mmca):
    weights = open_decoder_weights(WeightSource(preset="tiny", enable_mmca_attention=mmca, seed=3), 1003)
    decoder = materialize_decoder(weights)
    embeds, mask = prompt(weights.config.hidden_size, seed=1)
    want = eager_passes(decoder, embeds, mask, TOKENS)
    got = LayerwiseReference(weights).run(embeds, mask, TOKENS)
    assert_close(got, want)
    assert got[0].shape == (1, mask.shape[1], 1003) and got[1].shape == (1, 1, 1003)


@pytest.mark.parametrize("mmca", [False, True])
def test_a_subset_of_layers_equals_a_decoder_of_those_layers(mmca):
    weights = open_decoder_weights(WeightSource(preset="tiny", enable_mmca_attention=mmca, seed=5), 1003)
    subset = [1, 0, 1]  # any order, repeats allowed: what a bounded check exports
    decoder = materialize_decoder(weights)
    decoder.model.layers = nn.ModuleList(decoder.model.layers[i] for i in subset)
    embeds, mask = prompt(weights.config.hidden_size, seed=2)
    want = eager_passes(decoder, embeds, mask, TOKENS[:2])
    assert_close(LayerwiseReference(weights, layers=subset).run(embeds, mask, TOKENS[:2]), want)


def test_layer_indices_are_checked():
    weights = open_decoder_weights(WeightSource(preset="tiny"), 1003)
    with pytest.raises(ValueError, match=r"layers \[2\] outside the decoder's 2 layers"):
        LayerwiseReference(weights, layers=[0, 2])
