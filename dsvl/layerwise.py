"""A PyTorch parity reference for decoders that do not fit in RAM: one layer at a time.

The passes are teacher-forced (a prompt pass, then single-token decode passes with given ids),
so every pass's input to layer 0 is known up front. The reference therefore runs layer-major:
load layer i once, push every pass through it in order (keeping only that layer's KV cache),
free it, go on. Peak memory is one layer, the largest table (lm_head) and the hidden states,
whatever the depth. The math is dsvl.decoder's own modules (DecoderLayer, RMSNorm,
attention_biases, rope), so it is the eager decoder's, op for op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsvl.decoder import DecoderLayer, RMSNorm, attention_biases, rope_tables, rotary_parameters
from dsvl.generate import position_ids_for
from dsvl.lazy_weights import DecoderWeights
from runtime.contract import MASK_TEXT


class LayerwiseReference:
    """Logits of a prompt pass plus teacher-forced decode passes, computed layer by layer.

    ``layers``: the layer indices to run, in order (e.g. ``[0, 1, N - 1]``); a bounded ONNX
    check exports the same subset. None runs them all."""

    def __init__(self, weights: DecoderWeights, layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32):
        count = weights.num_layers
        self.layers = list(range(count)) if layers is None else [int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < count]
        if bad:
            raise ValueError(f"layers {bad} outside the decoder's {count} layers")
        self.weights = weights
        self.dtype = dtype
        self.inv_freq, self.rope_scaling = rotary_parameters(weights.config)

    @torch.no_grad()
    def run(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
            decode_tokens: Sequence[int]) -> list[torch.Tensor]:
        """inputs_embeds [1, S, D] and attention_mask [1, S] (0/1/2) of the prompt, then one pass
        per token of ``decode_tokens`` (embedded with embed_tokens, mask value 1). Returns the
        logits of every pass: [1, S, V], then [1, 1, V] per decode token."""
        tokens = [int(t) for t in decode_tokens]
        masks = [attention_mask]
        for _ in tokens:
            masks.append(torch.cat([masks[-1], torch.full((1, 1), MASK_TEXT, dtype=masks[-1].dtype)], 1))
        positions = [position_ids_for(masks[0])] + [position_ids_for(m)[:, -1:] for m in masks[1:]]
        hidden = [inputs_embeds.to(self.dtype)]
        if tokens:
            rows = self.weights.embedding_rows(tokens, self.dtype)
            hidden += [rows[i].view(1, 1, -1) for i in range(len(tokens))]
        mmca = self.weights.mmca
        biases = [attention_biases(mask, h.shape[1], mmca) for mask, h in zip(masks, hidden, strict=True)]
        ropes = [rope_tables(p, self.inv_freq, self.rope_scaling, self.dtype) for p in positions]
        for index in self.layers:
            layer = self._layer(index)
            key, value = self._empty_cache()
            for i, (cos, sin) in enumerate(ropes):
                hidden[i], key, value = layer(hidden[i], cos, sin, biases[i], key, value)
            del layer, key, value
        return self._logits(hidden)

    def _layer(self, index: int) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.weights.config, self.weights.mmca)
        layer.load_state_dict(self.weights.layer(index, self.dtype), strict=True, assign=True)
        return layer.eval()

    def _empty_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.weights.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (1, config.num_key_value_heads, 0, head_dim)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def _logits(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        config = self.weights.config
        with torch.device("meta"):
            norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        norm.load_state_dict({"weight": self.weights.get("model.norm.weight", self.dtype)}, assign=True)
        lm_head = self.weights.get("lm_head.weight", self.dtype)
        return [F.linear(norm(h), lm_head) for h in hidden]
