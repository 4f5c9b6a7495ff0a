"""Typed manifests for artefact directories the tests make up without exporting (engine builds
over fake TensorRT, profile planning): every section complete, as a reader checks it. File
entries describe the files that exist under ``root``; others get placeholder entries."""

from __future__ import annotations

import json
from pathlib import Path

from runtime import contract
from runtime.manifest import DecoderSection, FileEntry, Manifest, TokenizerSection, VisionSection


def entry(root: Path | None, name: str) -> FileEntry:
    if root is not None and (root / name).is_file():
        return FileEntry.describe(root, name)
    return FileEntry(name, 0, "0" * 64)


def fake_vision(root: Path | None = None, *, image_size: int = 224, patch_size: int = 14,
                dynamic: bool = False, image_tokens: int = 256, lang_dim: int = 512,
                vis_proj: str = "perceiver", io_dtype: str = "float16") -> VisionSection:
    precision = "fp16" if io_dtype == "float16" else "fp32"
    return VisionSection(
        file=entry(root, contract.VISION_FILE), preprocessor=contract.PREPROCESSOR_NAME,
        vis_proj=vis_proj, image_size=image_size, patch_size=patch_size, image_tokens=image_tokens,
        vis_dim=64, lang_dim=lang_dim, precision=precision, io_dtype=io_dtype, random_weights=True,
        dynamic_resolution=dynamic)


def fake_decoder(root: Path | None = None, *, num_layers: int = 8, num_heads: int = 8,
                 num_kv_heads: int = 8, head_dim: int = 64, hidden_size: int = 512,
                 intermediate_size: int = 2048, vocab_size: int = 32003,
                 max_positions: int = 4096, mmca: bool = False, io_dtype: str = "float16",
                 kv_cache: str = contract.KV_CONCAT) -> DecoderSection:
    precision = "fp16" if io_dtype == "float16" else "fp32"
    return DecoderSection(
        file=entry(root, contract.DECODER_FILE), prompt_embeddings=entry(root, contract.PROMPT_EMBED_FILE),
        decoder_embeddings=entry(root, contract.DECODER_EMBED_FILE), num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size,
        intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_positions, enable_mmca_attention=mmca, precision=precision,
        io_dtype=io_dtype, random_weights=True, kv_cache=kv_cache)


def fake_tokenizer() -> TokenizerSection:
    return TokenizerSection(dir=contract.TOKENIZER_DIR, bos_token_id=1, eos_token_id=2, image_token_id=3)


def fake_manifest(vision: VisionSection | None = None, decoder: DecoderSection | None = None) -> Manifest:
    return Manifest(vision=vision or fake_vision(), decoder=decoder or fake_decoder(),
                    tokenizer=fake_tokenizer(), precision="fp16")


def write_manifest(root: Path, manifest: Manifest) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    manifest.validate("manifest")
    (root / contract.MANIFEST_NAME).write_text(manifest.dumps())
    return root


def read_json(root: Path) -> dict:
    return json.loads((root / contract.MANIFEST_NAME).read_text())
