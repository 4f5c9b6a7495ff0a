"""Which files hold a model's weights, opened lazily: DSVL's checkpoint and a LLaMA directory.

Both return ``{key: LazyTensor}`` without reading any tensor's data, so callers decide what to
materialise (the vision export reads only ``vis_encoder.*`` and ``projection.*`` of a 13 GB
checkpoint; the decoder export reads one tensor at a time).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from dsvl.errors import LoadError
from dsvl.lazy_files import (
    EagerTensor,
    LazyTensor,
    TensorSource,
    is_torch_zip,
    open_safetensors,
    open_torch_zip,
)

CHECKPOINT_FILE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def canonical_key(key: str) -> str:
    """transformers 5 flattened CLIPVisionModel (no ``vision_model.`` level); DSVL saved with it."""
    return key.replace("vis_encoder.vision_model.", "vis_encoder.", 1)


def checkpoint_file(path: Path) -> Path:
    """DSVL's checkpoint: a directory holding pytorch_model.bin, or the file itself."""
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        where = f"{path} has no {CHECKPOINT_FILE}" if path.is_dir() else f"{path} does not exist"
        raise LoadError(f"checkpoint not found: {where}; pass DSVL's checkpoint directory or its {CHECKPOINT_FILE}")
    return file


def open_checkpoint(path: Path) -> dict[str, TensorSource]:
    """DSVL's state dict (DeepSpeed's ``{"module": ...}`` unwrapped, keys canonical), lazily."""
    file = checkpoint_file(path)
    state = open_torch_zip(file) if is_torch_zip(file) else _legacy_load(file)
    if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
        state = state["module"]  # DeepSpeed engine checkpoints wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, (LazyTensor, EagerTensor)) for v in state.values()):
        raise LoadError(f"checkpoint {file} does not hold a state dict of tensors")
    return {canonical_key(k): v for k, v in state.items()}


def _legacy_load(file: Path) -> object:
    """A file that is not a zip: torch's legacy format (read whole), or garbage."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            IndexError, KeyError) as err:  # garbage bytes reach the unpickler's stack and memo
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, (IndexError, KeyError)):
            first = f"{type(err).__name__} {first} while unpickling"
        raise LoadError(f"checkpoint {file} is corrupt or truncated ({first[:160]}); "
                        "re-copy or re-save it") from None
    return _wrap(state)


def _wrap(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return EagerTensor(obj)
    if isinstance(obj, dict):
        return {key: _wrap(value) for key, value in obj.items()}
    return obj


def open_weight_file(file: Path) -> dict[str, TensorSource]:
    """One safetensors or torch .bin file of a Hugging Face model directory."""
    if file.suffix == ".safetensors":
        return open_safetensors(file)
    state = open_torch_zip(file) if is_torch_zip(file) else _legacy_load(file)
    if not isinstance(state, dict) or not all(isinstance(v, (LazyTensor, EagerTensor)) for v in state.values()):
        raise LoadError(f"{file} does not hold a state dict of tensors; re-save or re-download it")
    return state


def hf_weight_files(path: Path) -> list[Path]:
    """A Hugging Face directory's weight files: the shards an index names, else every
    ``*.safetensors``, else every ``pytorch_model*.bin``."""
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = path / index_name
        if index.is_file():
            return _indexed_files(index)
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise LoadError(f"--lm-model-name-or-path {path}: no *.safetensors or pytorch_model*.bin weights")


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LoadError(f"{index} is not a usable shard index ({type(err).__name__}: {str(err)[:80]}); "
                        "re-download it or remove it") from None
    files = [index.parent / str(name) for name in names]
    for file in files:
        if not file.is_file():
            raise LoadError(f"{index} names the shard {file.name}, which is missing from "
                            f"{index.parent}; download every shard")
    return files


def open_hf_weights(path: Path) -> dict[str, TensorSource]:
    """Every tensor of a Hugging Face model directory (later shards win a repeated name)."""
    state: dict[str, TensorSource] = {}
    for file in hf_weight_files(path):
        state.update(open_weight_file(file))
    return state
