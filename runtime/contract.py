"""The artefact contract: ONNX tensor names and the manifest schema, in one place.

Exporters write what this module describes and the runtime (any backend) reads it; tests check
both against it. No torch here: the runtime imports this module on edge devices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ArtifactError  # noqa: F401  (re-exported: the contract's error)

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
# Fused (ONNX Runtime) decoder graphs only: int64 scalar, 0 = logits for every position, k = the
# last k only (a prompt pass needs one row of the LM head, not S).
LOGITS_TO_KEEP = "logits_to_keep"

MASK_PAD, MASK_TEXT, MASK_IMAGE = 0, 1, 2


PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."  # Optimum / ORT GenAI names
PAST_GLOB = PAST_PREFIX + "*"  # every layer's cache input, in manifests and engine metadata

# The export's precision -> the graph's floating I/O type (manifest ``io_dtype``).
IO_DTYPES = {"fp32": "float32", "fp16": "float16"}


def io_dtype(precision: str) -> str:
    return IO_DTYPES[precision]


def numpy_dtype(io_dtype_name: str) -> type:
    """The numpy type of a manifest ``io_dtype`` (``float32`` or ``float16``)."""
    return {"float32": np.float32, "float16": np.float16}[io_dtype_name]


def is_past_name(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def is_present_name(name: str) -> bool:
    return name.startswith(PRESENT_PREFIX)


def past_key_name(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.key"


def past_value_name(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.value"


def present_key_name(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.key"


def present_value_name(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.value"


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
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-run the export") from None
    except OSError as err:
        raise ArtifactError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a JSON {type(manifest).__name__}, not an object: it is not "
                            f"a {FORMAT} manifest; re-run the export")
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
    if not isinstance(manifest[section], dict):
        raise ArtifactError(f"{Path(artifacts) / MANIFEST_NAME}: '{section}' is not an object; "
                            f"re-run `python -m export.all --out {artifacts}`")
    return manifest[section]


# ------------------------------------------------------------------ manifest schema
# What the runtime reads, field by field: validated once at load so that no KeyError or
# TypeError escapes later. A field type is a Python type, a tuple of allowed values, or a dict
# (a nested object). The typed contract of issue 9 grows from this table.
FILE_ENTRY = {"path": "relpath", "bytes": int, "sha256": str}
SCHEMA: dict[str, dict[str, Any]] = {
    "vision": {"file": FILE_ENTRY, "preprocessor": "relpath", "image_size": int, "image_tokens": int,
               "lang_dim": int, "io_dtype": ("float32", "float16")},
    "decoder": {"file": FILE_ENTRY, "prompt_embeddings": FILE_ENTRY, "decoder_embeddings": FILE_ENTRY,
                "num_layers": int, "num_kv_heads": int, "head_dim": int, "hidden_size": int,
                "vocab_size": int, "max_position_embeddings": int, "enable_mmca_attention": bool,
                "io_dtype": ("float32", "float16")},
    "tokenizer": {"dir": "relpath", "bos_token_id": int, "eos_token_id": int, "image_token_id": int},
}
OPTIONAL: dict[str, dict[str, Any]] = {  # absent in older exports; checked when present
    "vision": {"preprocessor_file": FILE_ENTRY, "dynamic_resolution": bool},
    "decoder": {"kv_cache": ("concat", "shared-buffer"), "graph": ("traced", "standard", "fused")},
    "tokenizer": {"files": "entries"},
}


def _field_error(where: str, problem: str, artifacts: Path | str) -> ArtifactError:
    return ArtifactError(f"{Path(artifacts) / MANIFEST_NAME}: {where} {problem}; re-run "
                         f"`python -m export.all --out {artifacts}`")


def _check_value(value: Any, kind: Any, where: str, artifacts: Path | str) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise _field_error(where, "is not an object", artifacts)
        for key, sub in kind.items():
            if key not in value:
                raise _field_error(f"{where}.{key}", "is missing", artifacts)
            _check_value(value[key], sub, f"{where}.{key}", artifacts)
        if "external_data" in value:
            _check_value(value["external_data"], FILE_ENTRY, f"{where}.external_data", artifacts)
    elif kind == "relpath":
        if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise _field_error(where, f"must be a path inside the directory, got {value!r}", artifacts)
    elif kind == "entries":
        if not isinstance(value, dict):
            raise _field_error(where, "is not an object", artifacts)
        for name, entry in value.items():
            _check_value(entry, FILE_ENTRY, f"{where}.{name}", artifacts)
    elif isinstance(kind, tuple):
        if value not in kind:
            raise _field_error(where, f"is {value!r}, expected one of {', '.join(map(repr, kind))}", artifacts)
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _field_error(where, f"must be a non-negative integer, got {value!r}", artifacts)
    elif not isinstance(value, kind):
        raise _field_error(where, f"must be a {kind.__name__}, got {value!r}", artifacts)


def validate_manifest(manifest: dict[str, Any], artifacts: Path | str,
                      sections: tuple[str, ...] = ("vision", "decoder", "tokenizer")) -> None:
    """Every field the runtime reads is present and well typed: one line naming the field."""
    for section in sections:
        body = require_section(manifest, section, artifacts)
        _check_value(body, SCHEMA[section], section, artifacts)
        for key, kind in OPTIONAL[section].items():
            if key in body:
                _check_value(body[key], kind, f"{section}.{key}", artifacts)


def file_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry of a validated manifest that the runtime reads (external data included)."""
    vision, decoder, tokens = manifest["vision"], manifest["decoder"], manifest["tokenizer"]
    entries = [vision["file"], decoder["file"], decoder["prompt_embeddings"], decoder["decoder_embeddings"]]
    if "preprocessor_file" in vision:
        entries.append(vision["preprocessor_file"])
    entries += list(tokens.get("files", {}).values())
    entries += [e["external_data"] for e in entries if "external_data" in e]
    return entries
