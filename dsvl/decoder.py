"""LLaMA decoder with DSVL's multi-modal causal attention (MMCA), gpt-fast style.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.i.
self_attn.q_proj`` ...), so its checkpoints and DSVL's ``lang_decoder.*`` keys load as they are.
The forward takes explicit ``past`` tensors and returns the ``present`` ones: the same
signature the ONNX graph has, so the exporter traces this module directly.

MMCA, as DSVL's modeling_llama computes it (see docs/design.md): attention =
softmax(s + M_img) + softmax(s + M_txt). DSVL builds each M by adding two masks of
``finfo.min``, so ``m + m`` overflows to -inf and a row with no allowed key becomes a uniform
average only because IEEE softmax subtracts a row maximum of ``m``. Here each softmax gets one
mask built with ``where`` (never a sum) from a finite ``MASKED`` and, per query row, a flag that
replaces the scores of a row with no allowed key by zeros: the same weights, bit for bit, with
no -inf and no row whose maximum is a mask value, whatever softmax kernel runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dsvl.errors import ConfigError
from runtime.contract import MASK_IMAGE, MASK_TEXT

# A masked score: finite in fp16, bf16 and fp32 (a cast never makes it -inf) and far below any
# real attention score, so exp(MASKED + s - max) is exactly 0 in fp32 whenever the masked score
# is less than 32,664 above the row's best allowed one (DSVL's finfo.min gives 0 for any score).
MASKED = -32768.0

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class SoftmaxMask(NamedTuple):
    """One softmax's mask: ``bias`` [B, 1, S, T] is 0 or MASKED; ``keep_scores`` [B, 1, S, 1] is
    1.0, or 0.0 on a row with no allowed key, where DSVL's IEEE softmax averages uniformly over
    the keys masked once (``m``, not ``m + m``): zeroed scores plus this bias give that average."""

    bias: torch.Tensor
    keep_scores: torch.Tensor


def softmax_mask(type_ok: torch.Tensor, causal_ok: torch.Tensor) -> SoftmaxMask:
    """DSVL's ``M_type + M_causal`` as one mask. ``allowed`` keys are 0 in both (DSVL: 0); keys
    masked by exactly one are ``m`` in DSVL; keys masked by both are ``m + m = -inf``."""
    allowed = type_ok & causal_ok
    has_allowed = allowed.to(torch.float32).amax(-1, keepdim=True)  # [B, 1, S, 1], 1.0 or 0.0
    masked_once = torch.logical_xor(type_ok, causal_ok)  # what an all-m row averages over
    uniform_row = has_allowed == 0
    keep = (allowed & ~uniform_row) | (masked_once & uniform_row)  # no Where on bools in ORT
    return SoftmaxMask(torch.where(keep, 0.0, MASKED), has_allowed)


def masked_softmax(scores: torch.Tensor, mask: SoftmaxMask) -> torch.Tensor:
    """softmax over the last axis of fp32 ``scores`` with one SoftmaxMask."""
    return F.softmax(scores * mask.keep_scores + mask.bias, dim=-1)


def attention_biases(attention_mask: torch.Tensor, seq_len: int | torch.Tensor,
                     mmca: bool) -> tuple[SoftmaxMask, ...]:
    """Softmax masks over [B, 1, S, P+S] from a 0/1/2 mask over past + new positions.

    Without MMCA: one mask (padding and future keys masked). With MMCA: (image, text) masks.
    The image-query rule (an image token attends only to itself in the image softmax) applies
    only in a pass without past, as in the reference.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    key_pos = torch.arange(total).unsqueeze(0)  # [1, T]
    query_pos = (torch.arange(seq_len) + past).unsqueeze(1)  # [S, 1]
    causal_ok = key_pos <= query_pos  # [S, T]; all true for one query
    keys = attention_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, T]
    if not mmca:
        return (softmax_mask(keys > 0, causal_ok),)
    queries = attention_mask[:, total - seq_len:]  # [B, S]
    image_query = (queries == MASK_IMAGE).unsqueeze(1).unsqueeze(-1) & (past == 0)  # [B,1,S,1]
    own_key = key_pos == query_pos  # [S, T]
    image_ok = (image_query & own_key) | (~image_query & (keys == MASK_IMAGE))  # [B, 1, S, T]
    return softmax_mask(image_ok, causal_ok), softmax_mask(keys == MASK_TEXT, causal_ok)


def rotary_parameters(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """``inv_freq`` and the attention scaling of the config's rotary embedding (theta, linear
    scaling). Call it outside a meta-device context: it computes real values."""
    rotary = LlamaRotaryEmbedding(config)
    return rotary.inv_freq.clone(), float(rotary.attention_scaling)


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, S, head_dim] for ``position_ids`` [B, S], computed in fp32."""
    freqs = position_ids.unsqueeze(-1).float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype).unsqueeze(1)
    sin = (emb.sin() * scaling).to(dtype).unsqueeze(1)
    return cos, sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, mmca: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.mmca = mmca

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                biases: tuple[SoftmaxMask, ...], past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        key_all = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        value_all = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        scores = torch.matmul(q, key_all.transpose(2, 3)) * (self.head_dim ** -0.5)
        scores = scores.float()
        probs = masked_softmax(scores, biases[0])
        if self.mmca:  # DSVL sums the image and the text softmax (weights sum to 2)
            probs = probs + masked_softmax(scores, biases[1])
        out = torch.matmul(probs.to(value_all.dtype), value_all)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), key, value


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, mmca: bool):
        super().__init__()
        self.self_attn = Attention(config, mmca)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, biases, past_key, past_value):
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, biases, past_key, past_value)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, key, value


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, mmca: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, mmca) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """``LlamaForCausalLM``-compatible decoder (+MMCA) with an explicit, functional KV cache."""

    def __init__(self, config: LlamaConfig, enable_mmca_attention: bool = False):
        super().__init__()
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ConfigError(f"rope_type {rope_type!r} changes with sequence length and cannot be "
                             "exported as a fixed graph")
        self.config = config
        self.mmca = enable_mmca_attention
        self.model = LlamaModel(config, enable_mmca_attention)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, self.rope_scaling = rotary_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        first = self.model.layers[0].self_attn if len(self.model.layers) else None
        self.num_kv_heads = first.num_kv_heads if first else config.num_key_value_heads
        self.head_dim = first.head_dim if first else config.hidden_size // config.num_attention_heads

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def empty_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.lm_head.weight.dtype
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(self.num_layers)]

    def attention_inputs(self, attention_mask: torch.Tensor, seq_len: int) -> tuple:
        """What every layer's attention takes besides its input: the softmax masks
        (export/gqa.py swaps in GroupQueryAttention's cache lengths for export)."""
        return attention_biases(attention_mask, seq_len, self.mmca)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(position_ids, self.inv_freq, self.rope_scaling, dtype)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """inputs_embeds [B,S,D], attention_mask [B,P+S] (0/1/2), position_ids [B,S] -> logits, present."""
        hidden = inputs_embeds
        biases = self.attention_inputs(attention_mask, inputs_embeds.shape[1])
        cos, sin = self.rope(position_ids, hidden.dtype)
        present: KVCache = []
        for layer, (past_key, past_value) in zip(self.model.layers, past, strict=False):
            hidden, key, value = layer(hidden, cos, sin, biases, past_key, past_value)
            present.append((key, value))
        logits = self.lm_head(self.model.norm(hidden))
        return logits, present


class FlatDecoder(nn.Module):
    """The decoder with the ONNX graph's flat signature, for tracing:
    (embeds, mask, positions, k0, v0, k1, v1, ...) -> (logits, k0, v0, ...)."""

    def __init__(self, decoder: LlamaDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.decoder(inputs_embeds, attention_mask, position_ids, pairs)
        return (logits, *[t for pair in present for t in pair])
