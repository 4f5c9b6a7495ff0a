"""Open an artefact directory: manifest checks, embeddings, tokenizer, preprocessing.

Cheap consistency checks (file sizes and dimensions against the manifest) catch files mixed
from different exports before ONNX Runtime would fail deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import contract as c
from runtime.preprocess import ImagePreprocessor
from runtime.tokenizer import TextTokenizer


@dataclass
class Artifacts:
    root: Path
    manifest: dict[str, Any]
    vision: dict[str, Any]
    decoder: dict[str, Any]
    tokens: dict[str, Any]
    prompt_embeddings: np.ndarray  # lang_embed  [vocab, hidden]
    decoder_embeddings: np.ndarray  # embed_tokens [vocab, hidden]
    tokenizer: TextTokenizer
    preprocessor: ImagePreprocessor

    @property
    def mmca(self) -> bool:
        return bool(self.decoder["enable_mmca_attention"])


def _check_file(root: Path, entry: dict, verify_hash: bool) -> Path:
    path = root / entry["path"]
    if not path.is_file():
        raise c.ArtifactError(f"{path} is missing: re-run the export into {root}")
    if (path.stat().st_size != entry["bytes"]
            or ("fingerprint" in entry and c.fingerprint_file(path) != entry["fingerprint"])
            or (verify_hash and c.sha256_file(path) != entry["sha256"])):
        raise c.ArtifactError(f"{path} does not match manifest.json (it comes from a different "
                              f"export); re-run `python -m export.all --out {root}`")
    if "external_data" in entry:
        _check_file(root, entry["external_data"], verify_hash)
    return path


def open_artifacts(root: Path | str, verify_hash: bool = False) -> Artifacts:
    root = Path(root)
    if not root.is_dir():
        raise c.ArtifactError(f"--artifacts {root}: directory not found; export one with "
                              f"`python -m export.all --out {root}`")
    manifest = c.read_manifest(root)
    vision = c.require_section(manifest, "vision", root)
    decoder = c.require_section(manifest, "decoder", root)
    tokens = c.require_section(manifest, "tokenizer", root)
    for entry in (vision["file"], decoder["file"], decoder["prompt_embeddings"], decoder["decoder_embeddings"]):
        _check_file(root, entry, verify_hash)
    prompt = np.load(root / decoder["prompt_embeddings"]["path"], mmap_mode="r")
    generated = np.load(root / decoder["decoder_embeddings"]["path"], mmap_mode="r")
    hidden, vocab = decoder["hidden_size"], decoder["vocab_size"]
    for name, table in (("prompt", prompt), ("decoder", generated)):
        if table.shape != (vocab, hidden):
            raise c.ArtifactError(f"the {name} embedding table is {table.shape}, the manifest says "
                                  f"({vocab}, {hidden}): mixed exports; re-run export.all")
    if vision["lang_dim"] != hidden:
        raise c.ArtifactError(f"vision.onnx outputs width {vision['lang_dim']} but the decoder's hidden "
                              f"size is {hidden}: mixed exports; re-run export.all")
    tokenizer = TextTokenizer.from_dir(root / tokens["dir"], tokens)
    if tokenizer.vocab_size > vocab:
        raise c.ArtifactError(f"the tokenizer has {tokenizer.vocab_size} tokens but the decoder only "
                              f"{vocab}: mixed exports; re-run export.all")
    preprocessor = ImagePreprocessor.from_file(root / vision["preprocessor"])
    return Artifacts(root, manifest, vision, decoder, tokens, prompt, generated, tokenizer, preprocessor)
