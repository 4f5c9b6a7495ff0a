"""dsvl.decoder against independent references.

(a) Without MMCA the decoder must be ``LlamaForCausalLM`` (eager attention) with an explicit
    KV cache: same logits for a full pass and for a prompt followed by decode steps, with GQA
    and with linear RoPE scaling.
(b) With MMCA, an oracle written here from DSVL's ``_expand_mask`` / ``_make_causal_mask``
    (the per-j loop included) gives the two additive masks, -inf of ``m + m`` included. Our
    masks (one per softmax, finite, no row without an allowed key) must give the oracle's
    attention weights bit for bit, uniform-average rows included, and one attention layer must
    match softmax(s + M_img) + softmax(s + M_txt) computed from the oracle's masks.
(c) A LLaMA directory written by ``save_pretrained`` plus a tokenizer loads through
    ``dsvl.loading.load_model`` with the vocabulary resized to V + 3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from dsvl.decoder import MASKED, LlamaDecoder, attention_biases, masked_softmax
from dsvl.loading import WeightSource, load_model
from dsvl.tokenizer import build_preset_tokenizer, write_llama_tokenizer_dir

ATOL = 1e-5
NEG = torch.finfo(torch.float32).min


def small_config(**overrides) -> LlamaConfig:
    spec = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    spec.update(overrides)
    return LlamaConfig(**spec)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are O(1..10): an error of 1e-5 then means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() == 2:
                fan_in = param.shape[1]
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
                param.copy_(std * torch.randn(param.shape, generator=gen))


CONFIGS = {
    "gqa": lambda: small_config(),
    "gqa-linear-rope": lambda: small_config(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def models(request):
    config = CONFIGS[request.param]()
    hf = LlamaForCausalLM(config)
    assert hf.config._attn_implementation == "eager"
    randomize(hf, seed=1)
    ours = LlamaDecoder(config, enable_mmca_attention=False)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return request.param, hf.eval(), ours.eval()


def test_rope_settings_reach_the_decoder(models):
    name, hf, ours = models
    rope = LlamaRotaryEmbedding(hf.config)
    torch.testing.assert_close(ours.inv_freq, rope.inv_freq, rtol=0, atol=0)
    if name == "gqa-linear-rope":
        plain = LlamaRotaryEmbedding(small_config())
        torch.testing.assert_close(ours.inv_freq, plain.inv_freq / 2.0, rtol=0, atol=0)


@torch.no_grad()
def test_full_pass_matches_llama_for_causal_lm(models):
    _, hf, ours = models
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    want = hf(input_ids=ids).logits
    mask = torch.ones_like(ids)
    got, present = ours(ours.model.embed_tokens(ids), mask, torch.arange(40)[None], ours.empty_cache())
    assert want.abs().max() > 1.0  # meaningful scale
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"full pass max|err| {err:.2e}"
    assert len(present) == 2 and present[0][0].shape == (1, 2, 40, 16)


@torch.no_grad()
def test_prompt_then_decode_with_past_matches(models):
    _, hf, ours = models
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 97, (1, 17), generator=gen)
    steps = torch.randint(3, 97, (1, 6), generator=gen)
    out = hf(input_ids=prompt, use_cache=True)
    cache = out.cache
    mask = torch.ones(1, 17, dtype=torch.long)
    got, past = ours(ours.model.embed_tokens(prompt), mask, torch.arange(17)[None], ours.empty_cache())
    errors = [(got - out.logits).abs().max().item()]
    for i in range(steps.shape[1]):
        token = steps[:, i:i + 1]
        out = hf(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        mask = torch.ones(1, 18 + i, dtype=torch.long)
        got, past = ours(ours.model.embed_tokens(token), mask, torch.tensor([[17 + i]]), past)
        errors.append((got - out.logits).abs().max().item())
    assert max(errors) <= ATOL, f"prompt+decode max|err| per pass {errors}"
    # A multi-token chunk appended to a cache (what chat KV reuse does).
    chunk = torch.randint(3, 97, (1, 4), generator=gen)
    out = hf(input_ids=chunk, cache=cache, use_cache=True)
    total = 17 + steps.shape[1] + 4
    got, _ = ours(ours.model.embed_tokens(chunk), torch.ones(1, total, dtype=torch.long),
                  torch.arange(total - 4, total)[None], past)
    assert (got - out.logits).abs().max().item() <= ATOL


# --------------------------------------------------------------------------- MMCA oracle
def reference_masks(mask: torch.Tensor, tgt_len: int, dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """DSVL's modeling_llama: ``_expand_mask`` (two masks, image-query loop) then
    ``_prepare_decoder_attention_mask`` adding ``_make_causal_mask`` when tgt_len > 1."""
    bsz, src_len = mask.shape
    m = torch.finfo(dtype).min

    def expand(value: int) -> torch.Tensor:
        keep = mask.clone()
        keep[keep != value] = 0
        keep[keep == value] = 1
        expanded = keep[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
        inverted = 1.0 - expanded
        return inverted.masked_fill(inverted.to(torch.bool), m)

    inverted_img, inverted_text = expand(2), expand(1)
    if tgt_len == src_len:  # the prompt pass: an image token sees only itself among images
        for i in range(bsz):
            for j in range(tgt_len):
                if mask[i, j] == 2:
                    inverted_img[i, :, j, :] = m
                    inverted_img[i, :, j, j] = 0
    if tgt_len > 1:
        past = src_len - tgt_len
        causal = torch.full((tgt_len, tgt_len), m)
        cond = torch.arange(causal.size(-1))
        causal.masked_fill_(cond < (cond + 1).view(causal.size(-1), 1), 0)
        causal = causal.to(dtype)
        if past > 0:
            causal = torch.cat([torch.zeros(tgt_len, past, dtype=dtype), causal], dim=-1)
        causal = causal[None, None].expand(bsz, 1, tgt_len, src_len)
        inverted_img = inverted_img + causal
        inverted_text = inverted_text + causal
    return inverted_img, inverted_text


TEXT_FIRST = [1, 1, 1, 2, 2, 2, 1, 1, 2, 2, 1, 1]  # text before, between and after two images
MASKS = {
    "text-before-first-image": [TEXT_FIRST],
    "image-first": [[2, 2, 2, 1, 1, 2, 2, 1]],
    "three-images": [[1, 2, 2, 1, 2, 2, 1, 2, 1, 1]],
    "left-padding": [[0, 0, 1, 1, 2, 2, 1, 1]],
    "all-text": [[1, 1, 1, 1, 1]],
    "batch-of-two": [[1, 1, 2, 2, 1, 1, 2, 1], [0, 1, 2, 2, 2, 1, 1, 1]],
    "single-image-token": [[2]],
    "single-text-token": [[1]],
}


BIAS_CASES = [(name, new) for name in MASKS for new in ("all", 1, 3)
              if new == "all" or new < len(MASKS[name][0])]


@pytest.mark.parametrize(("name", "new"), BIAS_CASES)
def test_attention_weights_equal_reference_bitwise(name, new):
    """new="all": prompt pass (no past); 1: decode step; 3: a chunk after past. Weights from
    our masks equal softmax(s + M) with DSVL's masks, bit for bit, on random scores."""
    mask = torch.tensor(MASKS[name])
    seq = mask.shape[1] if new == "all" else new
    want_img, want_text = reference_masks(mask, seq)
    got_img, got_text = attention_biases(mask, seq, mmca=True)
    assert got_img.bias.dtype == got_text.bias.dtype == torch.float32
    assert got_img.bias.shape == want_img.shape == (mask.shape[0], 1, seq, mask.shape[1])
    scores = 4 * torch.randn(mask.shape[0], 3, seq, mask.shape[1],
                             generator=torch.Generator().manual_seed(len(BIAS_CASES)))
    for got, want in ((got_img, want_img), (got_text, want_text)):
        reference = F.softmax(scores + want, dim=-1)
        assert not reference.isnan().any()
        assert torch.equal(masked_softmax(scores, got), reference)
    if seq > 1 and name != "all-text":
        # the reference's m + m overflows to -inf; ours never does
        assert torch.isneginf(want_img).any() or torch.isneginf(want_text).any()


@pytest.mark.parametrize(("name", "new"), BIAS_CASES)
@pytest.mark.parametrize("mmca", [True, False])
def test_no_mask_row_is_all_masked_or_infinite(name, new, mmca):
    """Safe under any softmax: every value finite (in fp16 too), every row has an allowed key
    (its maximum is 0, never a mask value), and only 0 and MASKED occur: nothing was summed."""
    mask = torch.tensor(MASKS[name])
    seq = mask.shape[1] if new == "all" else new
    for softmax_mask in attention_biases(mask, seq, mmca=mmca):
        bias = softmax_mask.bias
        assert torch.isfinite(bias).all() and torch.isfinite(bias.half()).all()
        assert set(bias.unique().tolist()) <= {0.0, MASKED}
        assert (bias.amax(-1) == 0).all()
        assert not (bias == torch.finfo(torch.float32).min).any()
        assert set(softmax_mask.keep_scores.unique().tolist()) <= {0.0, 1.0}


def test_reference_masks_have_the_documented_shape():
    """The oracle itself, checked on the text-before-first-image prompt by hand."""
    img, text = reference_masks(torch.tensor([TEXT_FIRST]), len(TEXT_FIRST))
    img, text = img[0, 0], text[0, 0]
    # text query 1: image mask is m on earlier text and later image keys, -inf on later text
    assert img[1].tolist() == [NEG, NEG, -math.inf, NEG, NEG, NEG, -math.inf, -math.inf, NEG, NEG,
                               -math.inf, -math.inf]
    # image query 4: only its own key in the image softmax (future keys -inf by causal + m)
    assert img[4, 4] == 0 and (img[4, :4] == NEG).all() and torch.isneginf(img[4, 5:]).all()
    # text softmax of image query 4: earlier text keys only
    assert text[4, :3].eq(0).all() and (text[4, 3:5] == NEG).all()


def mmca_decoder(seed: int = 4) -> LlamaDecoder:
    config = small_config(num_hidden_layers=1)
    decoder = LlamaDecoder(config, enable_mmca_attention=True)
    randomize(decoder, seed)
    return decoder.eval()


@torch.no_grad()
def oracle_attention(decoder: LlamaDecoder, x: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MMCA attention layer from HF's rope/repeat_kv and the reference masks.
    Returns (output, image probs, key, value)."""
    attn = decoder.model.layers[0].self_attn
    config = decoder.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    bsz, seq, _ = x.shape
    q = F.linear(x, attn.q_proj.weight).view(bsz, seq, heads, head_dim).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(bsz, seq, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(bsz, seq, kv_heads, head_dim).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(config)(v, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    key = torch.cat([past_key, k], dim=2)
    value = torch.cat([past_value, v], dim=2)
    groups = heads // kv_heads
    scores = torch.matmul(q, repeat_kv(key, groups).transpose(2, 3)) / math.sqrt(head_dim)
    m_img, m_text = reference_masks(mask, seq)
    p_img = F.softmax(scores + m_img, dim=-1, dtype=torch.float32)
    p_text = F.softmax(scores + m_text, dim=-1, dtype=torch.float32)
    out = torch.matmul(p_img + p_text, repeat_kv(value, groups))
    out = out.transpose(1, 2).reshape(bsz, seq, heads * head_dim)
    return F.linear(out, attn.o_proj.weight), p_img, key, value


@torch.no_grad()
def ours_attention(decoder: LlamaDecoder, x, mask, positions, past_key, past_value):
    biases = attention_biases(mask, x.shape[1], mmca=True)
    cos, sin = decoder.rope(positions, x.dtype)
    return decoder.model.layers[0].self_attn(x, cos, sin, biases, past_key, past_value)


LAYER_CASES = {
    "text-before-first-image": [TEXT_FIRST],
    "several-images": [[1, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 2, 1, 1]],
    "image-first": [[2, 2, 1, 1, 2, 1]],
    "batch-with-padding": [[0, 0, 1, 2, 2, 1, 2, 1], [1, 1, 2, 2, 1, 1, 2, 2]],
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_mmca_layer_matches_oracle_prompt_and_decode(name):
    decoder = mmca_decoder()
    gen = torch.Generator().manual_seed(5)
    mask = torch.tensor(LAYER_CASES[name])
    bsz, length = mask.shape
    x = torch.randn(bsz, length, 64, generator=gen)
    positions = ((mask > 0).long().cumsum(-1) - 1).clamp(min=0)
    empty = torch.zeros(bsz, 2, 0, 16)
    want, _, want_k, want_v = oracle_attention(decoder, x, mask, positions, empty, empty)
    got, key, value = ours_attention(decoder, x, mask, positions, empty, empty)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(key, want_k, rtol=0, atol=1e-6)
    # Decode steps with past: one query, no causal mask, no image rule.
    for step in range(3):
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=torch.long)], dim=1)
        step_x = torch.randn(bsz, 1, 64, generator=gen)
        step_pos = (mask > 0).long().sum(-1, keepdim=True) - 1
        want, _, want_k, want_v = oracle_attention(decoder, step_x, mask, step_pos, key, value)
        got, key, value = ours_attention(decoder, step_x, mask, step_pos, key, value)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"decode step {step}")
        torch.testing.assert_close(value, want_v, rtol=0, atol=0)
    # A multi-token chunk after past (chat KV reuse): causal, but no image rule.
    mask = torch.cat([mask, torch.tensor([[1, 1, 1]] * bsz)], dim=1)
    chunk = torch.randn(bsz, 3, 64, generator=gen)
    chunk_pos = (mask > 0).long().cumsum(-1)[:, -3:] - 1
    want, _, _, _ = oracle_attention(decoder, chunk, mask, chunk_pos, key, value)
    got, _, _ = ours_attention(decoder, chunk, mask, chunk_pos, key, value)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_text_before_first_image_is_a_uniform_average_in_the_image_softmax():
    mask = torch.tensor([TEXT_FIRST])
    scores = torch.randn(1, 4, len(TEXT_FIRST), len(TEXT_FIRST), generator=torch.Generator().manual_seed(6))
    image_mask, text_mask = attention_biases(mask, len(TEXT_FIRST), mmca=True)
    probs = masked_softmax(scores, image_mask)
    # query 1 (text, before any image): earlier text {0,1} and later image keys {3,4,5,8,9}
    expected = torch.zeros(len(TEXT_FIRST))
    expected[[0, 1, 3, 4, 5, 8, 9]] = 1 / 7
    for head in range(4):
        torch.testing.assert_close(probs[0, head, 1], expected, rtol=0, atol=1e-7)
    # an image query sees only itself in the image softmax
    assert torch.equal(probs[0, :, 4], F.one_hot(torch.tensor(4), len(TEXT_FIRST)).float().expand(4, -1))
    # a text query after images: image softmax over earlier image keys only; text softmax causal
    row = probs[0, 0, 7]
    assert row[[3, 4, 5]].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert row[[0, 1, 2, 6, 7, 8, 9, 10, 11]].abs().max().item() == 0.0
    text_probs = masked_softmax(scores, text_mask)[0, 0, 7]
    assert text_probs[[0, 1, 2, 6, 7]].sum().item() == pytest.approx(1.0, abs=1e-6)
    # and the oracle layer agrees on that uniform case
    decoder = mmca_decoder()
    x = torch.randn(1, len(TEXT_FIRST), 64, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(len(TEXT_FIRST))[None]
    empty = torch.zeros(1, 2, 0, 16)
    _, p_img, _, _ = oracle_attention(decoder, x, mask, positions, empty, empty)
    torch.testing.assert_close(p_img[0, :, 1], expected.expand(4, -1), rtol=0, atol=1e-7)


@torch.no_grad()
def test_decode_step_has_no_image_rule_and_no_causal_mask():
    mask = torch.tensor([[1, 2, 2, 1, 2]])  # the last cached position is an image token
    image_mask, text_mask = attention_biases(mask, 1, mmca=True)
    assert image_mask.bias[0, 0, 0].tolist() == [MASKED, 0.0, 0.0, MASKED, 0.0]
    assert text_mask.bias[0, 0, 0].tolist() == [0.0, MASKED, MASKED, 0.0, MASKED]
    assert image_mask.keep_scores.item() == text_mask.keep_scores.item() == 1.0


@torch.no_grad()
def test_decode_step_without_any_image_averages_uniformly():
    """A chat with no image yet: DSVL's image softmax of a decode step sees only m, so IEEE
    softmax averages all keys; ours zeroes the scores and gets the same uniform weights."""
    mask = torch.tensor([[1, 1, 1, 1, 1]])
    (image_mask, _), (want, _) = attention_biases(mask, 1, mmca=True), reference_masks(mask, 1)
    assert image_mask.keep_scores.item() == 0.0 and (image_mask.bias == 0).all()
    scores = torch.randn(1, 2, 1, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(masked_softmax(scores, image_mask), F.softmax(scores + want, dim=-1))
    assert torch.equal(masked_softmax(scores, image_mask), torch.full((1, 2, 1, 5), 0.2))


# --------------------------------------------------------------------------- loading
@torch.no_grad()
def test_llama_directory_loads_with_resized_vocab(tmp_path):
    config = small_config(vocab_size=1000, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
    hf = LlamaForCausalLM(config)
    randomize(hf, seed=8)
    hf.save_pretrained(tmp_path / "llama")
    write_llama_tokenizer_dir(build_preset_tokenizer(1000), tmp_path / "llama")
    saved = {k: v.clone() for k, v in hf.state_dict().items()}

    model, tokenizer, loaded = load_model(WeightSource(lm_model=tmp_path / "llama", vis_proj="baseline"))
    decoder = model.lang_decoder
    assert len(tokenizer) == 1003
    assert tokenizer.convert_tokens_to_ids(["### Image:", "<image>", "<PAD>"]) == [1000, 1001, 1002]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert decoder.config.vocab_size == 1003
    assert decoder.config.max_position_embeddings == 4096
    state = decoder.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert state[key].shape == (1003, 128)
        assert torch.equal(state[key][:1000], saved[key])
        # DSVL's resize: new rows are the mean of the old ones
        torch.testing.assert_close(state[key][1000:], saved[key].mean(0, keepdim=True).expand(3, -1))
    for key, value in saved.items():
        if key not in ("model.embed_tokens.weight", "lm_head.weight") and "rotary" not in key:
            assert torch.equal(state[key], value), key
    assert torch.equal(model.lang_embed.weight, state["model.embed_tokens.weight"])
    assert any("RANDOM" in note for note in loaded.notes)
    assert any("projector is RANDOM" in note and "lang_embed is a copy" in note for note in loaded.notes)
    assert any("vocabulary resized from 1000 to 1003" in note for note in loaded.notes)
    # and it computes what the saved LLaMA computes, on the old vocabulary
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(9))
    assert hf.config._attn_implementation == "eager"
    want = hf.eval()(input_ids=ids).logits
    got, _ = decoder(decoder.model.embed_tokens(ids), torch.ones_like(ids), torch.arange(12)[None],
                     decoder.empty_cache())
    assert (got[..., :1000] - want).abs().max().item() <= ATOL
