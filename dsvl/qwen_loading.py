"""Read DSVL's ``qwen-clip`` directory: Qwen-VL's vision weights plus ViT-bigG's CLIP config.

The directory holds what DSVL's ``helper/`` makes: ``pytorch_model.bin`` (Qwen-VL's
``transformer.visual.*`` tensors, prefix stripped, ``proj`` dropped), ``config.json`` (a CLIPModel
config whose ``vision_config`` is ViT-bigG/14's; DSVL reads laion's copy from the hub) and
``preprocessor_config.json`` (448 px). DSVL loads the weights with ``strict=True``; so do we, with
one-line errors that name the key.

DSVL hard-codes the image size (448) and the resampler's width (4096). A ``config.json`` may set
``qwen_image_size`` / ``qwen_output_dim`` at its top level: that is this package's extension (for
small test models), absent from DSVL's files.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from dsvl.config import QWEN_IMAGE_SIZE, QWEN_OUTPUT_DIM, QwenVisionConfig
from dsvl.errors import LoadError
from dsvl.qwen_vision import QwenVisionTransformer

WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"
QWEN_PREFIX = "transformer.visual."  # Qwen-VL's name for the vision tower
FLAG = "--vision-model-name-or-path"


def looks_like_qwen(path: Path | str) -> bool:
    """DSVL's rule: ``'qwen' in args.vision_model_name_or_path.lower()`` (the whole path)."""
    return "qwen" in str(path).lower()


def read_config(path: Path) -> tuple[CLIPVisionConfig, QwenVisionConfig]:
    """The CLIP vision config DSVL's projector reads, and the ViT's own shapes."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise LoadError(f"{FLAG} {path}: no {CONFIG_FILE}; a qwen-clip directory needs ViT-bigG/14's "
                        "CLIP config (DSVL's helper/qwen_clip/config.json) beside pytorch_model.bin")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoadError(f"{file} is not valid JSON ({err}); re-copy it") from None
    spec = raw.get("vision_config", raw) if isinstance(raw, dict) else None
    if not isinstance(spec, dict) or "hidden_size" not in spec:
        raise LoadError(f"{file} has no vision_config with a hidden_size: it must be a CLIPModel config "
                        "such as laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's")
    fields = {k: v for k, v in spec.items() if not k.startswith("_") and k != "model_type"}
    try:
        vision = CLIPVisionConfig(**fields)
        qwen = QwenVisionConfig.from_clip(vision, int(raw.get("qwen_image_size", QWEN_IMAGE_SIZE)),
                                          int(raw.get("qwen_output_dim", QWEN_OUTPUT_DIM)))
    except (TypeError, ValueError) as err:
        raise LoadError(f"{file}: unusable vision config ({str(err).splitlines()[0][:160]})") from None
    return vision, qwen


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        hint = (" (it looks like a Hugging Face CLIP directory: pass --vision-encoder clip)"
                if list(path.glob("*.safetensors")) else "")
        raise LoadError(f"{FLAG} {path}: no {WEIGHTS_FILE} with Qwen-VL's vision weights{hint}; "
                        "make it with DSVL's helper/extract_qwen_vl.py")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"{file} is corrupt or truncated ({first[:160]}); re-copy or re-extract it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{file} does not hold a state dict of tensors")
    return state


def load_strict(model: QwenVisionTransformer, state: dict[str, torch.Tensor], file: Path) -> None:
    """``load_state_dict(strict=True)`` as DSVL does, each failure one line naming the key."""
    own = model.state_dict()
    prefixed = sorted(k for k in state if k.startswith(QWEN_PREFIX))
    if prefixed:
        raise LoadError(f"{file}: key {prefixed[0]} still has Qwen-VL's '{QWEN_PREFIX}' prefix; "
                        "strip it (and drop 'proj') as DSVL's helper/extract_qwen_vl.py does")
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise LoadError(f"{file} is missing {missing[0]}" + _more(missing)
                        + ": it does not hold Qwen-VL's whole vision tower")
    if extra:
        why = (" (DSVL drops Qwen-VL's output 'proj'; remove it)" if extra[0] == "proj"
               else ": not a parameter of Qwen-VL's ViT")
        raise LoadError(f"{file} has an unexpected key {extra[0]}" + _more(extra) + why)
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise LoadError(f"{file}: {name} has shape {tuple(tensor.shape)} but {CONFIG_FILE} gives "
                            f"{tuple(own[name].shape)}: the weights and the config do not match")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_qwen_dir(path: Path) -> tuple[QwenVisionTransformer, CLIPVisionConfig]:
    """The ViT with the directory's weights, and the CLIP vision config it came with."""
    if not path.is_dir():
        raise LoadError(f"{FLAG} {path}: directory not found; pass DSVL's qwen-clip directory")
    vision, qwen = read_config(path)
    state = read_weights(path)
    model = QwenVisionTransformer(qwen)
    load_strict(model, state, path / WEIGHTS_FILE)
    return model.eval(), vision
