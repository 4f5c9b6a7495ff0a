"""The runtime's Python API: a pipeline built from an artefact directory and a backend name.

    pipe = Pipeline.from_artifacts("artifacts", backend="ort-cpu")
    result = pipe.generate(["cat.jpg"], "What is in the image?")
    chat = pipe.chat(); chat.ask("Describe it.", ["cat.jpg"]); chat.ask("And the colours?")

Generation follows DSVL: the prompt (DSVL's template, BOS first) is embedded with the prompt
table ``lang_embed``; every ``<image>`` token is replaced by an image's tokens (mask 2), pairing
images with ``<image>`` positions in reverse order as DSVL's ``concat`` does; positions are
``cumsum(mask > 0) - 1``; generated tokens are embedded with the decoder's ``embed_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifacts import Artifacts, open_artifacts
from runtime.backends import load_runners
from runtime.contract import MASK_IMAGE, MASK_TEXT
from runtime.preprocess import as_image_list
from runtime.prompt import PromptError, format_round
from runtime.sampling import Sampler, SamplingOptions
from runtime.tokenizer import StreamDecoder

StreamCallback = Callable[[str], None]


class InputError(ValueError):
    """A request the model cannot serve (too long, image count mismatch...)."""


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    stop_reason: str  # "eos", "max_new_tokens" or "context"
    timings: dict = field(default_factory=dict)


class Pipeline:
    def __init__(self, artifacts: Artifacts, vision, decoder):
        self.artifacts, self.vision, self.decoder = artifacts, vision, decoder
        self.tokenizer = artifacts.tokenizer
        self.mask = np.zeros((1, decoder.max_context), np.int64)  # mask of everything cached
        self.positive = 0  # count of mask > 0 among cached positions (next position id)

    @classmethod
    def from_artifacts(cls, path: Path | str, backend: str = "ort-cpu", max_context: int | None = None,
                       threads: int = 0, verify_hash: bool = False) -> Pipeline:
        artifacts = open_artifacts(path, verify_hash)
        vision, decoder = load_runners(artifacts, backend, max_context, threads)
        return cls(artifacts, vision, decoder)

    # ------------------------------------------------------------ building blocks
    def encode_images(self, images: Sequence) -> np.ndarray:
        """Images (paths, PIL images or HWC uint8 arrays) -> [N, tokens, hidden] float32."""
        if not images:
            return np.zeros((0, 0, self.artifacts.decoder["hidden_size"]), np.float32)
        return self.vision.encode(self.artifacts.preprocessor(list(images)))

    def splice(self, ids: list[int], image_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt ids + images -> embeds [1, L, D] and mask [1, L] (1 text, 2 image)."""
        ids_arr = np.asarray(ids, np.int64)
        positions = np.flatnonzero(ids_arr == self.tokenizer.image_token_id)
        if len(positions) != len(image_embeds):
            raise InputError(f"the prompt has {len(positions)} <image> tokens but {len(image_embeds)} "
                             "images were given: give one image per <image>")
        text = np.asarray(self.artifacts.prompt_embeddings[ids_arr], np.float32)
        pieces, masks, start = [], [], 0
        # DSVL pairs the first image with the last <image>: reverse the images.
        for pos, image in zip(positions, image_embeds[::-1], strict=True):
            pieces += [text[start:pos], image]
            masks += [np.full(pos - start, MASK_TEXT), np.full(len(image), MASK_IMAGE)]
            start = pos + 1
        pieces.append(text[start:])
        masks.append(np.full(len(ids_arr) - start, MASK_TEXT))
        return np.concatenate(pieces)[None], np.concatenate(masks).astype(np.int64)[None]

    def reset(self) -> None:
        self.decoder.truncate(0)
        self.positive = 0

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Append positions to the cache; returns the last position's logits [vocab]."""
        start, seq = self.decoder.past_length, mask.shape[1]
        if start + seq > self.decoder.max_context:
            raise InputError(f"the prompt needs {start + seq} positions but the context holds "
                             f"{self.decoder.max_context}: shorten the prompt or use fewer images")
        self.mask[0, start:start + seq] = mask[0]
        positions = self.positive + np.cumsum(mask[0] > 0) - 1
        self.positive += int((mask[0] > 0).sum())
        return self.decoder.forward(embeds, self.mask[:, :start + seq], positions[None])[0]

    def decode(self, first_logits: np.ndarray, options: SamplingOptions,
               stream: StreamCallback | None = None) -> tuple[list[int], str]:
        """Sample up to ``max_new_tokens``; each token is fed back unless it ends generation."""
        sampler, tokens, logits = Sampler(options), [], first_logits
        eos = self.tokenizer.eos_token_id
        table = self.artifacts.decoder_embeddings
        streamer = StreamDecoder(self.tokenizer) if stream else None
        step_input = np.empty((1, 1, table.shape[1]), np.float32)
        position = np.empty((1, 1), np.int64)
        while True:
            token = sampler(logits, tokens)
            tokens.append(token)
            if streamer:
                piece = streamer.push(token)
                if piece:
                    stream(piece)
            if token == eos:
                return tokens, "eos"
            if len(tokens) >= options.max_new_tokens:
                return tokens, "max_new_tokens"
            length = self.decoder.past_length
            if length >= self.decoder.max_context:
                return tokens, "context"
            self.mask[0, length] = MASK_TEXT
            position[0, 0] = self.positive
            self.positive += 1
            step_input[0, 0] = table[token]
            logits = self.decoder.forward(step_input, self.mask[:, :length + 1], position)[0]

    # ------------------------------------------------------------ one-shot
    def generate(self, images: Sequence, prompt: str, options: SamplingOptions | None = None,
                 stream: StreamCallback | None = None, raw_prompt: bool = False) -> GenerationResult:
        """Answer ``prompt`` about ``images`` (DSVL's template unless ``raw_prompt``)."""
        options = options or SamplingOptions()
        options.validate()
        images = as_image_list(images)  # "x.png" is one image, not five
        timings = {}
        start = time.perf_counter()
        try:
            text = prompt if raw_prompt else format_round(prompt, len(images))
        except PromptError as err:
            raise InputError(str(err)) from None
        ids = self.tokenizer.encode(text)
        image_embeds = self.encode_images(images)
        timings["vision_s"] = time.perf_counter() - start
        embeds, mask = self.splice(ids, image_embeds)
        self.reset()
        first = self.prefill(embeds, mask)
        timings["time_to_first_token_s"] = time.perf_counter() - start
        decode_start = time.perf_counter()
        tokens, reason = self.decode(first, options, stream)
        timings["decode_s"] = time.perf_counter() - decode_start
        timings["decode_tokens_per_s"] = (len(tokens) - 1) / timings["decode_s"] if len(tokens) > 1 and timings["decode_s"] > 0 else None
        timings["total_s"] = time.perf_counter() - start
        return GenerationResult(ids, tokens, self.tokenizer.decode(tokens), reason, timings)

    def chat(self, reuse_cache: bool = True) -> Chat:
        return Chat(self, reuse_cache)


def history_tokens(tokens: list[int], bos: int, eos: int) -> list[int]:
    """What DSVL's chat keeps of an answer: leading BOS and trailing EOS/pad stripped, one EOS
    appended (pad is EOS in DSVL)."""
    kept = list(tokens)
    while kept and kept[-1] == eos:
        kept.pop()
    while kept and kept[0] == bos:
        kept.pop(0)
    return kept + [eos]


class Chat:
    """Multi-turn chat in DSVL's template.

    ``reuse_cache=True`` keeps the KV cache between turns: earlier turns and images are never
    encoded again, and a turn costs only its new tokens. ``reuse_cache=False`` re-encodes the
    whole conversation every turn, exactly as DSVL's chat.py does. They give the same tokens when
    images come only in the first turn and ``lang_embed`` equals ``embed_tokens`` (see
    docs/runtime.md for why they can differ otherwise).
    """

    def __init__(self, pipeline: Pipeline, reuse_cache: bool = True):
        self.pipe, self.reuse_cache = pipeline, reuse_cache
        self.history: list[int] = []  # token ids of the conversation so far (DSVL's system_instruct)
        self.images: list = []
        self.encoded: np.ndarray | None = None  # every image's embeddings, in order
        self.rounds = 0
        pipeline.reset()

    def ask(self, question: str, images: Sequence = (), options: SamplingOptions | None = None,
            stream: StreamCallback | None = None) -> GenerationResult:
        pipe, tok = self.pipe, self.pipe.tokenizer
        options = options or SamplingOptions()
        options.validate()
        images = as_image_list(images)
        try:
            text = format_round(question, len(images), len(self.images), first_round=self.rounds == 0)
        except PromptError as err:
            raise InputError(str(err)) from None
        start = time.perf_counter()
        ids = tok.encode(text)
        new_embeds = pipe.encode_images(images)
        if self.reuse_cache:
            embeds, mask = pipe.splice(ids, new_embeds)
        else:
            all_images = self._all_images(new_embeds)
            embeds, mask = pipe.splice(self.history + ids, all_images)
            pipe.reset()
        first = pipe.prefill(embeds, mask)
        ttft = time.perf_counter() - start
        tokens, reason = pipe.decode(first, options, stream)
        kept = history_tokens(tokens, tok.bos_token_id, tok.eos_token_id)
        if self.reuse_cache:
            self._append_history(tokens, kept)
        self.encoded = self._all_images(new_embeds)
        self.images += list(images)
        self.history += ids + kept
        self.rounds += 1
        return GenerationResult(ids, tokens, tok.decode(tokens), reason,
                                {"time_to_first_token_s": ttft, "total_s": time.perf_counter() - start})

    def _all_images(self, new_embeds: np.ndarray) -> np.ndarray:
        if self.encoded is None or not len(self.encoded):
            return new_embeds
        return np.concatenate([self.encoded, new_embeds]) if len(new_embeds) else self.encoded

    def _append_history(self, tokens: list[int], kept: list[int]) -> None:
        """Make the cache hold exactly this round's prompt + ``kept`` (DSVL's history)."""
        pipe = self.pipe
        base = pipe.decoder.past_length - (len(tokens) - 1) if tokens else pipe.decoder.past_length
        fed = tokens[:-1]  # the last sampled token was never fed
        common = 0
        while common < min(len(fed), len(kept)) and fed[common] == kept[common]:
            common += 1
        if common < len(fed):
            pipe.decoder.truncate(base + common)
            pipe.positive = int((pipe.mask[0, :base + common] > 0).sum())
        tail = kept[common:]
        if tail:
            embeds = np.asarray(pipe.artifacts.prompt_embeddings[np.asarray(tail)], np.float32)[None]
            pipe.prefill(embeds, np.full((1, len(tail)), MASK_TEXT, np.int64))
