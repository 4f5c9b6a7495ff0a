"""What each position of a spliced sequence holds, as one int64 per position.

The pipeline keeps this beside its KV cache, so a new prompt can reuse exactly the cached
positions that hold the same thing and recompute the rest (chat turns, see docs/runtime.md):

- a text token embedded with the prompt table (``lang_embed``): ``2 * id``;
- a text token embedded with the decoder table (``embed_tokens``, generated tokens): ``2 * id + 1``;
- row ``r`` of image ``u`` (an image's index in its conversation): ``-(1 + u * 2**24 + r)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.contract import MASK_IMAGE, MASK_TEXT

IMAGE_ROW_BITS = 24
UNKNOWN = np.iinfo(np.int64).min  # a position filled from raw embeddings: never reused


def text(ids: Sequence[int] | np.ndarray, decoder_table: bool = False) -> np.ndarray:
    return np.asarray(ids, np.int64) * 2 + int(decoder_table)


def image(uid: int, tokens: int) -> np.ndarray:
    return -(1 + (uid << IMAGE_ROW_BITS) + np.arange(tokens, dtype=np.int64))


def layout(ids: Sequence[int], slots: Sequence[int], image_uids: Sequence[int],
           image_tokens: Sequence[int]) -> np.ndarray:
    """Prompt ids with the image at each slot (an index into ``ids``) spliced in.

    DSVL's ``concat`` pairs images with ``<image>`` positions in reverse
    (``zip(images, flip(positions))``): the first image fills the last slot.
    """
    if len(slots) != len(image_uids):
        raise ValueError(f"{len(slots)} image slots for {len(image_uids)} images")
    pieces, start = [], 0
    for slot, uid, tokens in zip(slots, image_uids[::-1], image_tokens[::-1], strict=True):
        pieces += [text(ids[start:slot]), image(uid, tokens)]
        start = slot + 1
    pieces.append(text(ids[start:]))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def mask(sources: np.ndarray) -> np.ndarray:
    """DSVL's attention mask values: 2 for image positions, 1 for text."""
    return np.where(sources < 0, MASK_IMAGE, MASK_TEXT).astype(np.int64)


def is_image(sources: np.ndarray) -> np.ndarray:
    return (sources < 0) & (sources != UNKNOWN)


def embed(sources: np.ndarray, prompt_table: np.ndarray, decoder_table: np.ndarray,
          images: Sequence[np.ndarray]) -> np.ndarray:
    """The embeddings [1, L, hidden] float32 that ``sources`` describe."""
    out = np.empty((1, len(sources), prompt_table.shape[1]), np.float32)
    texts = sources >= 0
    ids, from_decoder = sources[texts] >> 1, (sources[texts] & 1).astype(bool)
    rows = np.empty((len(ids), prompt_table.shape[1]), np.float32)
    rows[~from_decoder] = prompt_table[ids[~from_decoder]]
    rows[from_decoder] = decoder_table[ids[from_decoder]]
    out[0, texts] = rows
    where = np.flatnonzero(~texts)
    if len(where):
        code = -sources[where] - 1
        uids, rows_in_image = code >> IMAGE_ROW_BITS, code & ((1 << IMAGE_ROW_BITS) - 1)
        for uid in np.unique(uids):
            pick = uids == uid
            out[0, where[pick]] = images[uid][rows_in_image[pick]]
    return out
