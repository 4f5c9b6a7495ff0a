"""Model configuration and the embedded presets (shapes only; weights are seeded random).

A preset is data, as in gpt-fast: one dict per named shape. ``DSVLConfig`` holds the two
Hugging Face configs (CLIP vision, LLaMA) plus the DSVL-specific choices, so the rest of the
package reads one object.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import CLIPVisionConfig, LlamaConfig

from dsvl.errors import ConfigError
from dsvl.presets import PERCEIVER_GRID, PRESETS, VIS_PROJS, VISION_ENCODERS  # noqa: F401  (re-exported)
from runtime.preprocess import CLIP_MEAN, CLIP_STD  # CLIPImageProcessor's defaults

PERCEIVER_HEAD_DIM = 128  # nn.MultiheadAttention(lang_dim, lang_dim // 128)
DSVL_MAX_SEQ_LEN = 4096  # DSVL replaces max_position_embeddings with its max_seq_len
DSVL_ROPE_THETA = 10000.0  # DSVL's LlamaRotaryEmbedding takes no base: always 10000
PROJ_LN_EPS = 1e-12
# transformers 4.33's GenerationConfig defaults for what DSVL's generate() leaves unset.
HF_GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                          "repetition_penalty": 1.0}

# Qwen-VL's ViT as DSVL builds it: VisionTransformer(image_size=448, ..., output_dim=4096).
QWEN_IMAGE_SIZE = 448
QWEN_OUTPUT_DIM = 4096
QWEN_QUERIES = 256  # the resampler's 16x16 queries, and the positional table's 256 rows
QWEN_LN_EPS = 1e-6
QWEN_HEAD_DIM = 128  # the resampler's nn.MultiheadAttention(output_dim, output_dim // 128)


@dataclass(frozen=True)
class QwenVisionConfig:
    """Qwen-VL's ViT shapes. DSVL reads width/layers/heads/mlp/patch from ViT-bigG/14's CLIP
    config and hard-codes the image size (448) and the resampler's width (4096)."""

    width: int
    layers: int
    heads: int
    mlp_size: int
    patch_size: int
    image_size: int = QWEN_IMAGE_SIZE
    output_dim: int = QWEN_OUTPUT_DIM

    @classmethod
    def from_clip(cls, vision: CLIPVisionConfig, image_size: int = QWEN_IMAGE_SIZE,
                  output_dim: int = QWEN_OUTPUT_DIM) -> QwenVisionConfig:
        if output_dim % QWEN_HEAD_DIM:
            raise ConfigError(f"the qwen resampler width {output_dim} is not a multiple of "
                              f"{QWEN_HEAD_DIM} (its heads are {QWEN_HEAD_DIM} wide)")
        if vision.hidden_size % vision.num_attention_heads:
            raise ConfigError(f"the qwen ViT width {vision.hidden_size} is not divisible by its "
                              f"{vision.num_attention_heads} heads")
        return cls(width=vision.hidden_size, layers=vision.num_hidden_layers,
                   heads=vision.num_attention_heads, mlp_size=vision.intermediate_size,
                   patch_size=vision.patch_size, image_size=image_size, output_dim=output_dim)

    def projector_config(self, vision: CLIPVisionConfig) -> CLIPVisionConfig:
        """What DSVL's projector sees: the CLIP config with ``hidden_size = output_dim``
        (heads, mlp, activation and eps stay the ViT-bigG config's, as in DSVL's vit projector)."""
        config = copy.deepcopy(vision)
        config.hidden_size = self.output_dim
        config._attn_implementation = "eager"  # plain matmul/softmax: identical math in ONNX
        return config


@dataclass
class DSVLConfig:
    """Everything that defines one DSVL model's shapes and behaviour."""

    vision: CLIPVisionConfig
    lang: LlamaConfig
    vis_proj: str = "perceiver"
    enable_mmca_attention: bool = False
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    preset: str | None = None  # set when the weights are a preset's seeded random ones
    seed: int = 0
    extra: dict = field(default_factory=dict)
    qwen: QwenVisionConfig | None = None  # set for Qwen-VL's ViT; ``vision`` is then the projector's view

    @property
    def vision_encoder(self) -> str:
        return "qwen" if self.qwen is not None else "clip"

    @property
    def lang_dim(self) -> int:
        return self.lang.hidden_size

    @property
    def vis_dim(self) -> int:
        return self.vision.hidden_size

    @property
    def image_size(self) -> int:
        return self.qwen.image_size if self.qwen is not None else self.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.qwen.patch_size if self.qwen is not None else self.vision.patch_size


def vision_config_from_preset(name: str) -> CLIPVisionConfig:
    spec = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5} | _preset(name)["vision"]
    return CLIPVisionConfig(**spec)


def preset_vision_encoder(name: str) -> str:
    return _preset(name).get("vision_encoder", "clip")


def qwen_config_from_preset(name: str) -> QwenVisionConfig:
    return QwenVisionConfig.from_clip(vision_config_from_preset(name), **_preset(name)["qwen"])


def lang_config_from_preset(name: str, vocab_size: int, layers: int | None = None) -> LlamaConfig:
    """``layers``: the decoder's depth instead of the preset's (same widths)."""
    spec = dict(_preset(name)["lang"])
    spec.pop("base_vocab_size")
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return llama_config(LlamaConfig(**spec, vocab_size=vocab_size, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False))


def llama_config(config: LlamaConfig) -> LlamaConfig:
    """Apply what DSVL's LLaMA does with the config: max positions become its max_seq_len, and
    its rotary embedding (modeling_llama.py) ignores ``rope_theta`` (always 10000) and knows
    only linear and dynamic scaling."""
    config.max_position_embeddings = DSVL_MAX_SEQ_LEN
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "dynamic"):
        raise ConfigError(f"the LLaMA config asks for rope type {rope_type!r}, which DSVL's LLaMA "
                          "cannot run (it knows plain, linear and dynamic rotary embeddings)")
    rope["rope_theta"] = DSVL_ROPE_THETA
    config.rope_parameters = rope
    return config


def generation_defaults(lm_dir: Path | None) -> dict:
    """What DSVL's ``generate()`` samples with: it passes only ``max_new_tokens`` and the pad
    id, so the LLaMA directory's generation_config.json (loaded by ``from_pretrained``) over
    transformers 4.33's defaults decides greedy or sampling."""
    values, source = dict(HF_GENERATION_DEFAULTS), "transformers 4.33 defaults"
    file = lm_dir / "generation_config.json" if lm_dir is not None else None
    if file is not None and file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            for key, default in HF_GENERATION_DEFAULTS.items():
                if isinstance(data, dict) and data.get(key) is not None:
                    values[key] = type(default)(data[key])
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
            raise ConfigError(f"{file} is not a usable generation config ({err}); fix or remove it") from None
        source = "generation_config.json"
    return {**values, "source": source}


def base_vocab_size(name: str) -> int:
    return _preset(name)["lang"]["base_vocab_size"]


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def check_vis_proj(name: str) -> str:
    if name not in VIS_PROJS:
        raise ConfigError(f"unknown --vis-proj {name!r}: choose one of {', '.join(VIS_PROJS)}")
    return name
