"""Tokenization with the `tokenizers` library from the exported tokenizer.json (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from runtime.contract import ArtifactError


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_token_id: int
    eos_token_id: int
    image_token_id: int

    @classmethod
    def from_dir(cls, path: Path, ids: dict) -> TextTokenizer:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: re-run the export")
        return cls(Tokenizer.from_file(str(file)), ids["bos_token_id"], ids["eos_token_id"],
                   ids["image_token_id"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with BOS, as ``tokenizer(prompt).input_ids`` gives them in DSVL."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of ids into text pieces; holds back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
