"""Open an artefact directory: manifest checks, embeddings, tokenizer, preprocessing.

The manifest is validated field by field, every file it lists is checked (runtime/integrity.py),
and cheap consistency checks (dimensions, the preprocessor's output size) catch files mixed
from different exports before ONNX Runtime would fail deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import contract as c
from runtime.integrity import check_files
from runtime.manifest import (
    SECTIONS,
    DecoderSection,
    Manifest,
    TokenizerSection,
    VisionSection,
    read_manifest,
)
from runtime.preprocess import ImagePreprocessor
from runtime.tokenizer import TextTokenizer


@dataclass
class Artifacts:
    root: Path
    manifest: Manifest
    vision: VisionSection
    decoder: DecoderSection
    tokens: TokenizerSection
    prompt_embeddings: np.ndarray  # lang_embed  [vocab, hidden]
    decoder_embeddings: np.ndarray  # embed_tokens [vocab, hidden]
    tokenizer: TextTokenizer
    preprocessor: ImagePreprocessor

    @property
    def mmca(self) -> bool:
        return self.decoder.enable_mmca_attention


def load_table(path: Path, root: Path) -> np.ndarray:
    """An embedding table, memory-mapped; anything but a plain numeric .npy is an artefact error
    (object arrays are never unpickled)."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise c.ArtifactError(f"{path} is not a numeric .npy table ({first}); re-run "
                              f"`python -m export.all --out {root}`") from None
    if not isinstance(table, np.ndarray) or table.dtype.kind != "f" or table.ndim != 2:
        raise c.ArtifactError(f"{path} is not a 2-D float table; re-run `python -m export.all --out {root}`")
    return table


def load_preprocessor(root: Path, vision: VisionSection) -> ImagePreprocessor:
    """preprocessor_config.json, checked against what vision.onnx takes."""
    path = root / vision.preprocessor
    if not path.is_file():
        raise c.ArtifactError(f"{path} is missing: re-run `python -m export.all --out {root}`")
    try:
        preprocessor = ImagePreprocessor.from_file(path)
    except (ValueError, TypeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise c.ArtifactError(f"{path} is not a usable preprocessor config ({first}); re-run "
                              f"`python -m export.all --out {root}`") from None
    size = vision.image_size
    if not vision.dynamic_resolution and preprocessor.output_size() != (size, size):
        got = preprocessor.output_size()
        shape = f"{got[0]}x{got[1]}" if got else "variable-size"
        raise c.ArtifactError(f"{path} gives {shape} images but vision.onnx takes {size}x{size}: the "
                              f"preprocessor comes from another model; re-run export.all")
    return preprocessor


def open_artifacts(root: Path | str, verify_hash: bool = False) -> Artifacts:
    root = Path(root)
    if not root.is_dir():
        raise c.ArtifactError(f"--artifacts {root}: directory not found; export one with "
                              f"`python -m export.all --out {root}`")
    manifest = read_manifest(root).require(*SECTIONS, root=root)
    vision, decoder, tokens = manifest.vision, manifest.decoder, manifest.tokenizer
    check_files(root, manifest.runtime_files(), verify_hash)
    prompt = load_table(root / decoder.prompt_embeddings.path, root)
    generated = load_table(root / decoder.decoder_embeddings.path, root)
    hidden, vocab = decoder.hidden_size, decoder.vocab_size
    for name, table in (("prompt", prompt), ("decoder", generated)):
        if table.shape != (vocab, hidden):
            raise c.ArtifactError(f"the {name} embedding table is {table.shape}, the manifest says "
                                  f"({vocab}, {hidden}): mixed exports; re-run export.all")
    if vision.lang_dim != hidden:
        raise c.ArtifactError(f"vision.onnx outputs width {vision.lang_dim} but the decoder's hidden "
                              f"size is {hidden}: mixed exports; re-run export.all")
    try:
        tokenizer = TextTokenizer.from_dir(root / tokens.dir, tokens)
    except c.ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise c.ArtifactError(f"{root / tokens.dir} holds no usable tokenizer ({first[:160]}); re-run "
                              f"`python -m export.all --out {root}`") from None
    if tokenizer.vocab_size > vocab:
        raise c.ArtifactError(f"the tokenizer has {tokenizer.vocab_size} tokens but the decoder only "
                              f"{vocab}: mixed exports; re-run export.all")
    preprocessor = load_preprocessor(root, vision)
    return Artifacts(root, manifest, vision, decoder, tokens, prompt, generated, tokenizer, preprocessor)
