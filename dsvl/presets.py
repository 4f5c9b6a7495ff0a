"""The embedded presets: shapes only (weights are seeded random), as data, like gpt-fast's.

Kept free of torch/transformers imports so command-line parsing (``--preset`` choices) is
instant.
"""

from __future__ import annotations

VIS_PROJS = ("baseline", "vit", "perceiver")
PERCEIVER_GRID = 16  # DSVL's perceiver: 16x16 = 256 learned queries

PRESETS: dict[str, dict] = {
    # Tests: runs in seconds. 56 px / 14 = 4x4 patches (+CLS = 17 tokens).
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, image_size=56, patch_size=14),
        lang=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, base_vocab_size=1000),
    ),
    # CPU benchmarks: 224 px, 257 vision tokens, a ~60M-parameter decoder with LLaMA-2's vocab.
    "small": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=6, image_size=224, patch_size=14),
        lang=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, base_vocab_size=32000),
    ),
    # DSVL's released shape: CLIP ViT-L/14 at 224 px + LLaMA-2-7B (vocabulary 32000 + 3).
    "dsvl-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=224, patch_size=14),
        lang=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, base_vocab_size=32000),
    ),
}
