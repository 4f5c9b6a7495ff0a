"""Build a DSVL model from a preset (seeded random weights) or from real weights.

Real weights follow DSVL's chat: a Hugging Face CLIP directory (or, when the path contains
``qwen`` or ``--vision-encoder qwen`` says so, DSVL's qwen-clip directory), a LLaMA directory with
its tokenizer, and DSVL's ``pytorch_model.bin`` (the whole model's state dict, loaded non-strictly,
overriding the two directories). Every problem is raised as ``LoadError`` with one line that
names the file or key and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

try:  # transformers 5 names the PIL implementation; the plain name needs torchvision
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor

from dsvl import config as cfgmod
from dsvl.config import VISION_ENCODERS, DSVLConfig, QwenVisionConfig, check_vis_proj
from dsvl.errors import ConfigError, LoadError
from dsvl.lazy_files import TensorSource
from dsvl.lazy_sources import CHECKPOINT_FILE, open_checkpoint  # noqa: F401  (re-exported)
from dsvl.model import DSVLModel
from dsvl.projectors import build_projector
from dsvl.tokenizer import load_tokenizer, preset_tokenizer
from dsvl.vision import DSVLVision, build_clip
from runtime.prompt import IMAGE_TOKEN


@dataclass
class WeightSource:
    """Where the weights come from; with no paths, the preset's seeded random weights."""

    preset: str = "tiny"
    vision_model: Path | None = None
    lm_model: Path | None = None
    checkpoint: Path | None = None
    vis_proj: str | None = None
    enable_mmca_attention: bool = False
    seed: int = 0
    vision_encoder: str | None = None  # None: DSVL's rule on the vision path, else the preset's
    preset_layers: int | None = None  # a preset's decoder depth, overridden (real widths, quick)

    @property
    def random(self) -> bool:
        return self.vision_model is None and self.lm_model is None and self.checkpoint is None

    def describe(self) -> str:
        if self.random:
            return f"preset '{self.preset}' with seeded RANDOM weights (seed {self.seed}): outputs are meaningless"
        parts = [f"{name}={path}" for name, path in (("vision", self.vision_model), ("lm", self.lm_model),
                                                     ("checkpoint", self.checkpoint)) if path]
        return ", ".join(parts)


@dataclass
class Loaded:
    config: DSVLConfig
    preprocessor: dict
    notes: list[str] = field(default_factory=list)  # what was random, what was inferred
    generation: dict = field(default_factory=dict)  # DSVL's sampling defaults (config.generation_defaults)


# ---------------------------------------------------------------- checkpoint
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """DSVL's checkpoint (a directory holding pytorch_model.bin, or the file), every tensor read.
    Prefer ``open_checkpoint``, which reads a tensor only when it is loaded."""
    return {key: source.load() for key, source in open_checkpoint(path).items()}


def _load_prefixes(state: Mapping[str, TensorSource], *prefixes: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefixes`` only: the vision half never reads the decoder's bytes."""
    return {key: source.load() for key, source in state.items() if key.startswith(prefixes)}


def infer_vis_proj(state: Mapping[str, object]) -> str | None:
    keys = {k for k in state if k.startswith("projection.")}
    if "projection.query" in keys:
        return "perceiver"
    if any(k.startswith("projection.vis_layer.") for k in keys):
        return "vit"
    if "projection.0.weight" in keys:
        return "baseline"
    return None


def resolve_vision_encoder(src: WeightSource) -> tuple[str, str | None]:
    """``clip`` or ``qwen``, and a note saying how it was chosen. The flag wins; else DSVL's rule
    (``'qwen'`` anywhere in the vision path, case-insensitive); else the preset's encoder."""
    from dsvl.qwen_loading import looks_like_qwen

    flag = src.vision_encoder
    if flag is not None and flag not in VISION_ENCODERS:
        raise ConfigError(f"unknown --vision-encoder {flag!r}: choose one of {', '.join(VISION_ENCODERS)}")
    if src.vision_model is None:
        own = cfgmod.preset_vision_encoder(src.preset)
        if flag is not None and flag != own:
            raise ConfigError(f"--vision-encoder {flag} contradicts --preset {src.preset} (a {own} preset): "
                              f"pass --vision-model-name-or-path or a {flag} preset")
        return own, None
    if flag is not None:
        return flag, None
    if looks_like_qwen(src.vision_model):
        return "qwen", "vision encoder: Qwen-VL's ViT ('qwen' in the vision path, as DSVL decides)"
    return "clip", None


QWEN_PERCEIVER = ("does not work with Qwen-VL's vision encoder: DSVL's perceiver drops token 0 as if "
                  "it were CLS, leaving 255 keys against 256 key positions, so DSVL itself fails "
                  "(its training script allows only baseline with qwen); use baseline or vit")


def resolve_vis_proj(requested: str | None, state: Mapping | None,
                     encoder: str = "clip") -> tuple[str, str | None]:
    """The projector to build, and a note when it was inferred from the checkpoint."""
    vis_proj, note = _resolve_vis_proj(requested, state, encoder)
    if encoder == "qwen" and vis_proj == "perceiver":
        origin = "--vis-proj perceiver" if requested else "the checkpoint's perceiver projector"
        raise ConfigError(f"{origin} {QWEN_PERCEIVER}")
    return vis_proj, note


def _resolve_vis_proj(requested: str | None, state: Mapping | None, encoder: str) -> tuple[str, str | None]:
    if requested is not None:
        check_vis_proj(requested)
    found = infer_vis_proj(state) if state is not None else None
    if state is not None and found is None:
        if not any(k.startswith("projection.") for k in state):
            raise LoadError("the checkpoint has no projection.* keys: it is not a DSVL checkpoint")
        if requested is None:  # keys present, but not the one that tells the type apart
            raise LoadError("cannot tell the projector type from the checkpoint's projection.* keys "
                            "(none of projection.query, projection.vis_layer.*, projection.0.weight); "
                            "pass --vis-proj")
        # with --vis-proj given, loading reports the missing key by name
    if requested and found and requested != found:
        raise LoadError(f"--vis-proj {requested} contradicts the checkpoint, which holds a '{found}' "
                        f"projector; drop --vis-proj or pass --vis-proj {found}")
    if requested:
        return requested, None
    if found:
        return found, f"projector '{found}' inferred from the checkpoint's keys"
    return ("baseline" if encoder == "qwen" else "perceiver"), None


def load_into(module: nn.Module, state: dict[str, torch.Tensor], prefix: str,
              required: bool) -> int:
    """Copy ``prefix``-ed tensors into ``module``; shape mismatches (and, when ``required``,
    missing keys) are errors naming the key. Returns how many tensors were loaded."""
    own = module.state_dict()
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for name, tensor in sub.items():
        if name in own and own[name].shape != tensor.shape:
            raise LoadError(f"checkpoint key {prefix}{name} has shape {tuple(tensor.shape)} but the model "
                            f"expects {tuple(own[name].shape)}: the checkpoint does not fit these configs")
    if required:
        missing = sorted(set(own) - set(sub))
        if missing:
            raise LoadError(f"checkpoint is missing {prefix}{missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + ": it does not hold this projector's weights")
    usable = {k: v.to(own[k].dtype) for k, v in sub.items() if k in own}
    module.load_state_dict(usable, strict=False)
    return len(usable)


# ---------------------------------------------------------------- configs
def _require_dir(path: Path, what: str, flag: str) -> Path:
    if not path.is_dir():
        raise LoadError(f"{flag} {path}: directory not found; pass a Hugging Face {what} directory")
    return path


def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


def vision_config(src: WeightSource) -> CLIPVisionConfig:
    if src.vision_model is None:
        return cfgmod.vision_config_from_preset(src.preset)
    path = _require_dir(src.vision_model, "CLIP", "--vision-model-name-or-path")
    try:
        return CLIPVisionConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise LoadError(f"--vision-model-name-or-path {path}: no usable CLIP config ({str(err).splitlines()[0][:160]})") from None


def lang_config(src: WeightSource, vocab_size: int | None) -> LlamaConfig:
    if src.lm_model is None:
        return cfgmod.lang_config_from_preset(
            src.preset, vocab_size or cfgmod.base_vocab_size(src.preset) + 3, src.preset_layers)
    path = _require_dir(src.lm_model, "LLaMA", "--lm-model-name-or-path")
    try:
        config = LlamaConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise LoadError(f"--lm-model-name-or-path {path}: no usable LLaMA config ({str(err).splitlines()[0][:160]})") from None
    return cfgmod.llama_config(config)


def preprocessor_config(src: WeightSource, image_size: int) -> dict:
    if src.vision_model is not None and (src.vision_model / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(src.vision_model).to_dict()
    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size},
                              image_mean=list(cfgmod.CLIP_MEAN), image_std=list(cfgmod.CLIP_STD)).to_dict()


# ---------------------------------------------------------------- models
def _qwen_modules(src: WeightSource, lang_dim: int, vis_proj: str
                  ) -> tuple[nn.Module, nn.Module, CLIPVisionConfig, QwenVisionConfig]:
    """Qwen-VL's ViT (directory or preset) and the projector on its 4096-wide output: DSVL sets
    ``vis_config.hidden_size = 4096`` on ViT-bigG's CLIP config before building the projector."""
    from dsvl.qwen_loading import load_qwen_dir
    from dsvl.qwen_vision import QwenVisionTransformer

    torch.manual_seed(src.seed)
    if src.vision_model is not None:
        encoder, vcfg = load_qwen_dir(src.vision_model)
        qcfg = encoder.config
    else:
        vcfg, qcfg = cfgmod.vision_config_from_preset(src.preset), cfgmod.qwen_config_from_preset(src.preset)
        encoder = QwenVisionTransformer(qcfg)
    pcfg = qcfg.projector_config(vcfg)
    return encoder.eval(), build_projector(vis_proj, pcfg, lang_dim).eval(), pcfg, qcfg


def _vision_modules(src: WeightSource, vcfg: CLIPVisionConfig | None, lang_dim: int, vis_proj: str
                    ) -> tuple[nn.Module, nn.Module, CLIPVisionConfig, QwenVisionConfig | None]:
    """Encoder, projector, the CLIP config the projector sees, and the qwen shapes (or None).
    ``vcfg`` is CLIP's config; None means Qwen-VL's ViT."""
    if vcfg is None:
        return _qwen_modules(src, lang_dim, vis_proj)
    torch.manual_seed(src.seed)
    if src.vision_model is not None:
        _quiet_transformers()
        try:
            encoder, info = CLIPVisionModel.from_pretrained(src.vision_model, attn_implementation="eager",
                                                            output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise LoadError(f"--vision-model-name-or-path {src.vision_model}: cannot load CLIP weights "
                            f"({str(err).splitlines()[0][:160]})") from None
        if any(k.startswith("attn_pool.") for k in info.get("unexpected_keys", ())):
            raise LoadError(f"--vision-model-name-or-path {src.vision_model} holds Qwen-VL's vision "
                            "weights (attn_pool.*), not CLIP's: pass --vision-encoder qwen")
    else:
        encoder = build_clip(vcfg)
    projection = build_projector(vis_proj, encoder.config, lang_dim)
    return encoder.eval(), projection.eval(), encoder.config, None


def _apply_checkpoint(modules: dict[str, nn.Module], state: Mapping[str, TensorSource]) -> None:
    for prefix, module in modules.items():
        load_into(module, _load_prefixes(state, prefix + "."), prefix + ".",
                  required=(prefix == "projection"))


def load_vision(src: WeightSource) -> tuple[DSVLVision, Loaded]:
    """The vision half only: the LLaMA directory is read for its hidden size alone, and the
    checkpoint for its vis_encoder.* and projection.* tensors alone."""
    kind, kind_note = resolve_vision_encoder(src)
    state = open_checkpoint(src.checkpoint) if src.checkpoint else None
    vis_proj, note = resolve_vis_proj(src.vis_proj, state, kind)
    vcfg = vision_config(src) if kind == "clip" else None
    lcfg = lang_config(src, vocab_size=None)
    encoder, projection, vcfg, qcfg = _vision_modules(src, vcfg, lcfg.hidden_size, vis_proj)
    if state is not None:
        _apply_checkpoint({"vis_encoder": encoder, "projection": projection}, state)
    config = DSVLConfig(vision=vcfg, lang=lcfg, vis_proj=vis_proj,
                        enable_mmca_attention=src.enable_mmca_attention,
                        preset=src.preset if src.random else None, seed=src.seed, qwen=qcfg)
    loaded = Loaded(config, preprocessor_config(src, config.image_size), _notes(src, note, kind_note))
    return DSVLVision(encoder, projection, vis_proj).eval(), loaded


def load_model(src: WeightSource):
    """The whole model, its tokenizer (with DSVL's tokens) and the preprocessing config. The
    decoder is built from ``open_decoder_weights`` one tensor at a time: the same values a
    streamed export reads."""
    from dsvl.lazy_weights import materialize_decoder, open_decoder_weights

    kind, kind_note = resolve_vision_encoder(src)
    state = open_checkpoint(src.checkpoint) if src.checkpoint else None
    vis_proj, note = resolve_vis_proj(src.vis_proj, state, kind)
    if src.lm_model is not None:
        _require_dir(src.lm_model, "LLaMA", "--lm-model-name-or-path")
        tokenizer = load_tokenizer(src.lm_model)
    else:
        tokenizer = preset_tokenizer(cfgmod.base_vocab_size(src.preset))
    vcfg = vision_config(src) if kind == "clip" else None
    lcfg = lang_config(src, vocab_size=len(tokenizer))
    encoder, projection, vcfg, qcfg = _vision_modules(src, vcfg, lcfg.hidden_size, vis_proj)
    if state is not None:
        _apply_checkpoint({"vis_encoder": encoder, "projection": projection}, state)
    weights = open_decoder_weights(src, len(tokenizer), checkpoint=state or {})
    decoder = materialize_decoder(weights)
    config = DSVLConfig(vision=vcfg, lang=decoder.config, vis_proj=vis_proj,
                        enable_mmca_attention=src.enable_mmca_attention,
                        preset=src.preset if src.random else None, seed=src.seed, qwen=qcfg)
    model = DSVLModel(config, encoder, projection, decoder,
                      tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).eval()
    with torch.no_grad():
        model.lang_embed.weight.copy_(weights.prompt_embedding())
    loaded = Loaded(config, preprocessor_config(src, config.image_size),
                    _notes(src, note, kind_note, weights.resize_note),
                    cfgmod.generation_defaults(src.lm_model))
    return model, tokenizer, loaded


def _notes(src: WeightSource, *extra: str | None) -> list[str]:
    notes = [f"weights: {src.describe()}"]
    notes += [note for note in extra if note]
    if not src.random and src.checkpoint is None:
        notes.append("no --checkpoint-path: the projector is RANDOM (lang_embed is a copy of the "
                     "LLaMA's embed_tokens, as DSVL starts training from)" if src.lm_model is not None
                     else "no --checkpoint-path: the projector is RANDOM")
    return notes
