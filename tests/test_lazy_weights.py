"""DecoderWeights: per-tensor values equal to what the eager ``load_model`` builds, from every
source (preset, LLaMA directory with tied/missing/bf16 tensors, DSVL checkpoint overrides,
vocabulary resizing), and preset draws that depend on (seed, name) only."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from dsvl.errors import LoadError
from dsvl.lazy_weights import (
    EMBED,
    LM_HEAD,
    materialize_decoder,
    open_decoder_weights,
    random_tensor,
    resize_rows,
    tensor_seed,
)
from dsvl.loading import WeightSource, load_model
from dsvl.tokenizer import build_preset_tokenizer, write_llama_tokenizer_dir

VOCAB = 1003  # the tiny presets' 1000 + DSVL's three tokens
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def llama_dir(root: Path, tied: bool, bias: bool = False, drop: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A LLaMA directory (bf16 safetensors, vocabulary 1000) and the tensors it holds."""
    path = root / f"llama-{int(tied)}{int(bias)}"
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         attention_bias=bias)
    config.save_pretrained(path)
    write_llama_tokenizer_dir(build_preset_tokenizer(1000), path)
    with torch.device("meta"):
        from dsvl.decoder import LlamaDecoder
        shapes = {k: v.shape for k, v in LlamaDecoder(config).state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    state = {k: (0.3 * torch.randn(s, generator=gen)).bfloat16() for k, s in shapes.items()
             if k not in drop and not (tied and k == LM_HEAD)}
    save_file(state, str(path / "model.safetensors"))
    return path, state


def test_tensor_seed_is_crc32_of_the_name():
    assert tensor_seed(3, LM_HEAD) == zlib.crc32(b"3/lm_head.weight")
    assert tensor_seed(0, Q0) != tensor_seed(0, "model.layers.1.self_attn.q_proj.weight")


def test_names_are_the_decoders_state_dict(tmp_path):
    path, _ = llama_dir(tmp_path, tied=False, bias=True)
    weights = open_decoder_weights(WeightSource(lm_model=path), VOCAB)
    model, _, _ = load_model(WeightSource(lm_model=path, vis_proj="baseline"))
    assert weights.names() == list(model.lang_decoder.state_dict())
    assert "model.layers.1.self_attn.o_proj.bias" in weights.names()
    assert weights.names()[0] == EMBED and weights.names()[-1] == LM_HEAD
    assert weights.layer_names(1)[0] == "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("mmca", [False, True])
def test_load_model_builds_its_decoder_from_the_weights(mmca):
    src = WeightSource(preset="tiny", enable_mmca_attention=mmca, seed=4)
    model, tokenizer, _ = load_model(src)
    weights = open_decoder_weights(src, len(tokenizer))
    assert weights.mmca is mmca and model.lang_decoder.mmca is mmca
    assert weights.config.to_dict() == model.lang_decoder.config.to_dict()
    state = model.lang_decoder.state_dict()
    for name in reversed(weights.names()):  # any order gives the same tensors
        assert torch.equal(weights.get(name), state[name]), name
    assert torch.equal(weights.prompt_embedding(), model.lang_embed.weight)
    assert torch.equal(model.lang_decoder.inv_freq, materialize_decoder(weights).inv_freq)


def test_preset_draws_per_tensor():
    weights = open_decoder_weights(WeightSource(preset="tiny", seed=2), VOCAB)
    config = weights.config
    assert torch.equal(weights.get(Q0), random_tensor(Q0, (128, 128), config, 2))
    other = open_decoder_weights(WeightSource(preset="tiny", seed=3), VOCAB)
    assert not torch.equal(weights.get(Q0), other.get(Q0))
    assert torch.equal(weights.get("model.norm.weight"), torch.ones(128))
    assert abs(weights.get(EMBED).std().item() - 1.0) < 0.02
    assert abs(weights.get(LM_HEAD).std().item() - 4.0 / 128 ** 0.5) < 0.01
    assert abs(weights.get(Q0).std().item() - config.initializer_range) < 0.002
    assert any("every tensor is seeded RANDOM" in note for note in weights.notes)


def test_a_7b_preset_opens_without_drawing_it():
    weights = open_decoder_weights(WeightSource(preset="dsvl-7b"), 32003)
    assert len(weights.names()) == 2 + 9 * 32 + 1
    assert weights.shape(LM_HEAD) == (32003, 4096)
    assert weights.get("model.layers.31.post_attention_layernorm.weight").shape == (4096,)


def test_llama_directory_tied_missing_bf16_and_resized(tmp_path):
    path, state = llama_dir(tmp_path, tied=True, drop=(UP1,))
    weights = open_decoder_weights(WeightSource(lm_model=path, seed=1), VOCAB)
    assert weights.config.vocab_size == VOCAB and weights.base_vocab == 1000
    embed = resize_rows(state[EMBED].float(), VOCAB)
    assert torch.equal(weights.get(EMBED), embed)
    assert torch.equal(weights.get(EMBED)[1000:], state[EMBED].float().mean(0, keepdim=True).expand(3, -1))
    assert torch.equal(weights.get(LM_HEAD), embed)  # tied, as LlamaForCausalLM ties it
    assert torch.equal(weights.get(Q0), state[Q0].float())
    assert torch.equal(weights.get(Q0, torch.bfloat16), state[Q0])
    assert torch.equal(weights.get(Q0, torch.float16), state[Q0].float().half())
    assert torch.equal(weights.get(UP1), random_tensor(UP1, (128, 64), weights.config, 1))
    assert torch.equal(weights.prompt_embedding(), embed)
    assert torch.equal(weights.embedding_rows([5, 1001, 5]), embed[[5, 1001, 5]])
    assert any("vocabulary resized from 1000 to 1003" in note for note in weights.notes)
    assert any("1 tensors are in no weight file" in note and UP1 in note for note in weights.notes)


def test_checkpoint_overrides_and_lang_embed(tmp_path):
    path, state = llama_dir(tmp_path, tied=False)
    gen = torch.Generator().manual_seed(11)
    ckpt = {"lang_decoder." + Q0: torch.randn(64, 64, generator=gen).half(),
            "lang_decoder." + EMBED: torch.randn(VOCAB, 64, generator=gen),
            "lang_decoder.model.rotary_emb.inv_freq": torch.ones(8),  # not a parameter: ignored
            "projection.0.weight": torch.zeros(1)}
    torch.save(ckpt, tmp_path / "pytorch_model.bin")
    weights = open_decoder_weights(WeightSource(lm_model=path, checkpoint=tmp_path), VOCAB)
    assert torch.equal(weights.get(Q0), ckpt["lang_decoder." + Q0].float())
    assert torch.equal(weights.get(EMBED), ckpt["lang_decoder." + EMBED])
    assert torch.equal(weights.embedding_rows([7, 1002]), ckpt["lang_decoder." + EMBED][[7, 1002]])
    # lang_embed copies embed_tokens as the LLaMA directory gives it, before the checkpoint
    assert torch.equal(weights.prompt_embedding(), resize_rows(state[EMBED].float(), VOCAB))
    assert torch.equal(weights.get(LM_HEAD), resize_rows(state[LM_HEAD].float(), VOCAB))
    assert not weights.random_names()
    ckpt["lang_embed.weight"] = torch.randn(VOCAB, 64, generator=gen)
    torch.save(ckpt, tmp_path / "pytorch_model.bin")
    weights = open_decoder_weights(WeightSource(lm_model=path, checkpoint=tmp_path), VOCAB)
    assert torch.equal(weights.prompt_embedding(), ckpt["lang_embed.weight"])


def test_shape_mismatches_name_the_key(tmp_path):
    path, state = llama_dir(tmp_path, tied=False)
    torch.save({"lang_embed.weight": torch.zeros(3, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match=r"checkpoint key lang_embed.weight has shape \(3, 2\) but the "
                                        r"model expects \(1003, 64\)"):
        open_decoder_weights(WeightSource(lm_model=path, checkpoint=tmp_path), VOCAB)
    torch.save({"lang_decoder." + Q0: torch.zeros(3, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match=f"checkpoint key lang_decoder.{Q0} has shape"):
        open_decoder_weights(WeightSource(lm_model=path, checkpoint=tmp_path), VOCAB)
    state[Q0] = torch.zeros(2, 2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(LoadError, match=f"checkpoint key {Q0} has shape"):
        open_decoder_weights(WeightSource(lm_model=path), VOCAB)
