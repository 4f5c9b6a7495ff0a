"""What a backend must provide: a vision runner and a decoder runner that owns its KV cache.

The generation loop (runtime/generation.py) only talks to these two interfaces, so ONNX
Runtime (CPU/CUDA/TensorRT EP) and native TensorRT engines are interchangeable.
All arrays crossing this boundary are numpy on the host; batch size is 1.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VisionRunner(Protocol):
    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[images, 3, H, W] float32 -> image_embeds [images, tokens, lang_dim] float32."""


class DecoderRunner(Protocol):
    num_layers: int
    max_context: int  # most positions the cache holds (prompt + generated)

    @property
    def past_length(self) -> int:
        """Positions already in the KV cache."""

    def forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run S new positions after the cached past and append their keys/values to the cache.

        inputs_embeds [1, S, hidden] float32; attention_mask [1, past + S] int64 (0/1/2);
        position_ids [1, S] int64. Returns float32 logits [S, vocab] when ``all_logits``,
        else [1, vocab] for the last position only.
        """

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (0 empties the cache)."""
