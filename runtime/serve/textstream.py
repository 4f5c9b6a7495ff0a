"""Generated ids to text pieces, cut at the first ``stop`` string.

The pieces add up to ``tokenizer.decode`` of the whole answer, the text ``runtime.generate``
prints. LLaMA's byte-fallback tokens (``<0xE2>``...) decode as one group per run, so a new
byte can change how the run's earlier bytes decode: text is released only up to the last
token that is not a byte token. A piece that might be the start of a stop string is held back
until the next tokens show whether it is one, so a stop string never reaches the client.
"""

from __future__ import annotations

import re

from runtime.tokenizer import TextTokenizer

BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def byte_token_ids(tokenizer: TextTokenizer) -> frozenset[int]:
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    return frozenset(i for piece, i in vocab.items() if BYTE_TOKEN.match(piece))


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stops: list[str], byte_ids: frozenset[int]):
        self.tokenizer, self.byte_ids = tokenizer, byte_ids
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text, self.sent = "", 0  # the released text; how much of it went out

    def push(self, token: int) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self.ids.append(token)
        if token in self.byte_ids:
            return "", False
        return self._add(self.tokenizer.decode(self.ids)[len(self.text):])

    def finish(self) -> str:
        """The rest, at the end of generation."""
        piece, stopped = self._add(self.tokenizer.decode(self.ids)[len(self.text):])
        return piece if stopped else piece + self._flush()

    def _add(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent = self.text[self.sent:end], end
            return out, True
        safe = len(self.text) - self._held()
        if safe <= self.sent:
            return "", False
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def _held(self) -> int:
        """Length of the longest tail of the text that starts some stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
