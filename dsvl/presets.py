"""The embedded presets: shapes only (weights are seeded random), as data, like gpt-fast's.

Kept free of torch/transformers imports so command-line parsing (``--preset`` choices) is
instant.
"""

from __future__ import annotations

VIS_PROJS = ("baseline", "vit", "perceiver")
VISION_ENCODERS = ("clip", "qwen")  # transformers' CLIPVisionModel, or Qwen-VL's ViT (qwen-clip)
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
    # Benchmarks of a 7B-sized decode step in minutes: LLaMA-2-7B's layer and vocabulary shapes,
    # 2 of its 32 layers (the LM head is then a quarter of the weights, not 2%), small's vision.
    "7b-2layers": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=6, image_size=224, patch_size=14),
        lang=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=32, base_vocab_size=32000),
    ),
    # Qwen-VL's ViT (DSVL's qwen-clip) for tests: "vision" is the CLIP-style config DSVL reads
    # (here tiny), "qwen" what DSVL hard-codes (448 px, output 4096), shrunk: 56 px, 4x4 patches,
    # a 256-wide resampler (2 heads of 128) so the [q; k; v] head layout is exercised.
    "qwen-tiny": dict(
        vision_encoder="qwen",
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, image_size=224, patch_size=14, hidden_act="gelu"),
        qwen=dict(image_size=56, output_dim=256),
        lang=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, base_vocab_size=1000),
    ),
    # DSVL's chat recipe (chat/chat_scripts/run.sh): qwen-clip = ViT-bigG/14 (laion's CLIP config)
    # at 448 px with the 256-query resampler to 4096, + LLaMA-2-13B (vocabulary 32000 + 3).
    "dsvl-qwen-13b": dict(
        vision_encoder="qwen",
        vision=dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                    num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
        qwen=dict(image_size=448, output_dim=4096),
        lang=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, base_vocab_size=32000),
    ),
}
