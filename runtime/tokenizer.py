"""Tokenization with the `tokenizers` library from the exported tokenizer.json (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from runtime.contract import TOKENIZER_FILE
from runtime.errors import ArtifactError
from runtime.manifest import TokenizerSection
from runtime.prompt import IMAGE_PRETOKEN, image_label

# A non-special added token no user text contains: tokenizing SEPARATOR + text gives the ids
# the text gets right after an added token inside a whole prompt (see ``encode_round``).
SEPARATOR = "\ue000dsvl-edge-separator\ue000"


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    bos_token_id: int
    eos_token_id: int
    image_token_id: int
    _plain: Tokenizer | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path: Path, ids: TokenizerSection) -> TextTokenizer:
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: re-run the export")
        return cls(Tokenizer.from_file(str(file)), ids.bos_token_id, ids.eos_token_id, ids.image_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with BOS, as ``tokenizer(prompt).input_ids`` gives them in DSVL."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def special_strings_in(self, text: str) -> list[str]:
        """The special tokens (``<image>``, ``### Image:``, ``<s>``...) that ``text`` spells out."""
        specials = self.tokenizer.get_added_tokens_decoder().values()
        return sorted({t.content for t in specials if t.special and t.content in text})

    def encode_round(self, head: str, tail: str, allow_special_tokens: bool = False) -> tuple[list[int], list[int]]:
        """A DSVL round's ids (BOS first) and its image slots, from ``runtime.prompt.round_parts``.

        When the user text in ``tail`` spells no special token, this is DSVL's own
        ``tokenizer(head + tail)``. When it does, DSVL's chat.py would turn it into a special
        id (a typed ``<image>`` becomes an image slot, a typed ``</s>`` an EOS); here, unless
        ``allow_special_tokens``, the tail is tokenized as plain text instead: the ids it would
        get as text right after the head's last added token.
        """
        head_ids = self.encode(head) if head else []
        if allow_special_tokens or not self.special_strings_in(tail):
            ids = self.encode(head + tail)
        elif head:
            ids = head_ids + self.plain_tokenizer().encode(SEPARATOR + tail, add_special_tokens=False).ids[1:]
        else:
            ids = self.plain_tokenizer().encode(tail, add_special_tokens=True).ids
        # DSVL splices an image at every <image> id; here only at the template's own (the head's)
        return ids, self.image_slots(ids if allow_special_tokens else ids[:len(head_ids)])

    def number_images_as_eval(self, ids: list[int], slots: list[int], images_so_far: int
                              ) -> tuple[list[int], list[int]]:
        """DSVL's eval/batch_generation.py numbering of a round's images, on the ids of a round
        built without numbers (``round_parts(..., number_images=False)``): the round's first
        ``### Image:`` id becomes the ids of "### Image N:" tokenized on its own (BOS dropped),
        N the conversation's images so far, this round's included; its other ``### Image:``
        ids stay. chat.py instead names each image in the text before tokenizing."""
        pretoken = self.tokenizer.token_to_id(IMAGE_PRETOKEN)
        if pretoken is None:
            raise ArtifactError(f"the tokenizer has no {IMAGE_PRETOKEN!r} token: re-run the export")
        at = ids.index(pretoken)
        label = self.encode(image_label(images_so_far))[1:]
        shift = len(label) - 1
        return ids[:at] + label + ids[at + 1:], [s + shift if s > at else s for s in slots]

    def image_slots(self, ids: list[int]) -> list[int]:
        """Where DSVL splices an image: every ``<image>`` id."""
        return [i for i, t in enumerate(ids) if t == self.image_token_id]

    def plain_tokenizer(self) -> Tokenizer:
        """The same tokenizer with special tokens read as text (``encode_special_tokens``)."""
        if self._plain is None:
            plain = Tokenizer.from_str(self.tokenizer.to_str())
            plain.encode_special_tokens = True
            plain.add_tokens([AddedToken(SEPARATOR, special=False, normalized=False)])
            self._plain = plain
        return self._plain


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
