"""The artefact contract: ONNX tensor names and the manifest schema, in one place.

Exporters write what this module describes and the runtime (any backend) reads it; tests check
both against it. No torch here: the runtime imports this module on edge devices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "dsvl-edge"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAMP_NAME = ".manifest.verified.json"  # runtime/integrity.py: files fully hashed, by stat
PREPROCESSOR_NAME = "preprocessor_config.json"

VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
PROMPT_EMBED_FILE = "lang_embed.npy"  # DSVL's lang_embed: embeds the prompt
DECODER_EMBED_FILE = "embed_tokens.npy"  # the decoder's embed_tokens: embeds generated tokens
TOKENIZER_DIR = "tokenizer"
ENGINES_DIR = "engines"

# vision.onnx
VISION_INPUT = "pixel_values"  # [images, 3, H, W] float
VISION_OUTPUT = "image_embeds"  # [images, tokens, lang_dim]

# decoder.onnx (names as Optimum / ONNX Runtime GenAI use them)
INPUTS_EMBEDS = "inputs_embeds"  # [batch, seq, hidden]
ATTENTION_MASK = "attention_mask"  # [batch, past + seq] int64: 0 pad, 1 text, 2 image
POSITION_IDS = "position_ids"  # [batch, seq] int64
LOGITS = "logits"  # [batch, seq, vocab]

MASK_PAD, MASK_TEXT, MASK_IMAGE = 0, 1, 2


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def decoder_input_names(num_layers: int) -> list[str]:
    names = [INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS]
    for i in range(num_layers):
        names += [past_key_name(i), past_value_name(i)]
    return names


def decoder_output_names(num_layers: int) -> list[str]:
    names = [LOGITS]
    for i in range(num_layers):
        names += [present_key_name(i), present_value_name(i)]
    return names


class ArtifactError(ValueError):
    """The artefact directory is missing something, or does not fit this runtime."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FINGERPRINT_CHUNK = 1 << 20


def fingerprint_file(path: Path) -> str:
    """A cheap identity for large files: sha256 of the size and 1 MiB at the start, middle and
    end (the whole file when small). Checked on every load; full sha256 only on request."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 3 * FINGERPRINT_CHUNK:
            digest.update(fh.read())
        else:
            for offset in (0, size // 2, size - FINGERPRINT_CHUNK):
                fh.seek(offset)
                digest.update(fh.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


def read_manifest(artifacts: Path | str) -> dict[str, Any]:
    path = Path(artifacts) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} not found: export first with `python -m export.all --out {artifacts}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-run the export") from err
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {manifest.get('format_version')}, this runtime reads "
            f"{FORMAT_VERSION}: re-export with this version of the package")
    return manifest


def require_section(manifest: dict[str, Any], section: str, artifacts: Path | str) -> dict[str, Any]:
    if section not in manifest:
        raise ArtifactError(
            f"{Path(artifacts) / MANIFEST_NAME} has no '{section}' section: this directory was made "
            f"by another exporter; run `python -m export.all --out {artifacts}`")
    return manifest[section]
