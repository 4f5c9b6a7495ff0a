"""The runtime's Python API: a pipeline built from an artefact directory and a backend name.

    pipe = Pipeline.from_artifacts("artifacts", backend="ort-cpu")
    result = pipe.generate(["cat.jpg"], "What is in the image?")
    chat = pipe.chat(); chat.ask("Describe it.", ["cat.jpg"]); chat.ask("And the colours?")

Generation follows DSVL: the prompt (DSVL's template, BOS first) is embedded with the prompt
table ``lang_embed``; every image slot is replaced by an image's tokens (mask 2), pairing
images with slots in reverse order as DSVL's ``concat`` does; positions are
``cumsum(mask > 0) - 1``; generated tokens are embedded with the decoder's ``embed_tokens``.

Beside the KV cache the pipeline keeps what each cached position holds (runtime/sources.py)
and whose conversation it belongs to, so a chat turn reuses exactly the positions that its
full re-encoding would compute the same way (runtime/conversation.py, docs/runtime.md).
One pipeline serves one call at a time: a lock serializes calls from several threads. A
pipeline holds its runners' sessions and device memory: ``close()`` (or ``with Pipeline...``)
frees them. Seams for callers that measure or steer generation (benchmarks, evaluations):
``decode``'s ``sampler``, ``stop_ids`` and ``on_step``, the runners' ``last_inference_time()``
and an injectable ``clock`` for the timings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import sources as src
from runtime.artifacts import Artifacts, open_artifacts
from runtime.backends import load_runners
from runtime.backends.base import DecoderRunner, VisionRunner
from runtime.errors import UserError
from runtime.preprocess import as_image_list
from runtime.prompt import PromptError, round_parts
from runtime.sampling import Sampler, SamplingOptions
from runtime.tokenizer import StreamDecoder

StreamCallback = Callable[[str], None]
# (logits, tokens so far), before each pick; it reads them: a greedy pick may come from the graph
StepCallback = Callable[[np.ndarray, list[int]], None]
PickToken = Callable[[np.ndarray, list[int]], int]  # (logits, tokens so far) -> next token
Clock = Callable[[], float]


class InputError(UserError):
    """A request the model cannot serve (too long, image count mismatch...)."""


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    stop_reason: str  # "eos", "max_new_tokens", "context" or "interrupted"
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user

    def to_json(self, backend: str) -> dict:
        """One object for `--json` output: the same fields for generate and every chat turn."""
        return {"prompt_ids": self.prompt_ids, "generated_ids": self.tokens, "text": self.text,
                "stop_reason": self.stop_reason, "backend": backend, "timings": self.timings,
                "notes": self.notes}


class Pipeline:
    def __init__(self, artifacts: Artifacts, vision: VisionRunner, decoder: DecoderRunner,
                 clock: Clock = time.perf_counter):
        self.artifacts, self.vision, self.decoder = artifacts, vision, decoder
        self.clock = clock
        self.tokenizer = artifacts.tokenizer
        context = decoder.max_context
        self.mask = np.zeros((1, context), np.int64)  # mask of everything cached
        self.sources = np.full(context, src.UNKNOWN, np.int64)  # what each cached position holds
        self.positive = 0  # count of mask > 0 among cached positions (next position id)
        self.owner: object | None = None  # the conversation the cache belongs to (None: nobody's)
        self.images_whole = True  # every cached image row was computed in a pass from position 0
        self.lock = threading.RLock()
        self._generated_codes: dict[int, int] = {}
        # generated_code compares a token's two embedding rows through flat float32 memoryviews:
        # with numpy indexing (memmap rows, array_equal), a token's first sight cost ~0.2 ms of
        # cold Python in the decode loop, 5% of a small int4 step.
        tables = [np.asarray(t) for t in (artifacts.prompt_embeddings, artifacts.decoder_embeddings)]
        flat = (all(t.dtype == np.float32 and t.ndim == 2 and t.flags.c_contiguous for t in tables)
                and tables[0].shape == tables[1].shape)
        self._row_count, self._row_width = tables[1].shape if flat else (0, 0)
        self._row_values = [memoryview(t).cast("B").cast("f") for t in tables] if flat else None
        # The decoder table as one ndarray (a memmap's rows cost more to index), the same object
        # every decode: the runner's step_from keeps its byte view for as long as it is passed.
        self._decoder_table = tables[1]

    @classmethod
    def from_artifacts(cls, path: Path | str, backend: str = "ort-cpu", max_context: int | None = None,
                       threads: int = 0, verify_hash: bool = False,
                       clock: Clock = time.perf_counter, huge_pages: bool = True) -> Pipeline:
        artifacts = open_artifacts(path, verify_hash)
        vision, decoder = load_runners(artifacts, backend, max_context, threads, huge_pages)
        return cls(artifacts, vision, decoder, clock)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free both runners (sessions, device buffers); the pipeline cannot be used after."""
        with self.lock:
            self.vision.close()
            self.decoder.close()

    # ------------------------------------------------------------ building blocks
    def encode_images(self, images: Sequence) -> np.ndarray:
        """Images (paths, PIL images or HWC uint8 arrays) -> [N, tokens, hidden] float32."""
        if not images:
            return np.zeros((0, 0, self.artifacts.decoder.hidden_size), np.float32)
        return self.vision.encode(self.artifacts.preprocessor(list(images)))

    def embed(self, sources: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
        return src.embed(sources, self.artifacts.prompt_embeddings, self.artifacts.decoder_embeddings,
                         images)

    def splice(self, ids: list[int], image_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt ids + images -> embeds [1, L, D] and mask [1, L] (1 text, 2 image), an image
        at every ``<image>`` id, as DSVL's ``concat`` does."""
        sources = self.layout(ids, self.tokenizer.image_slots(ids), image_embeds)
        return self.embed(sources, list(image_embeds)), src.mask(sources)[None]

    def layout(self, ids: list[int], slots: list[int], image_embeds: Sequence[np.ndarray],
               first_uid: int = 0) -> np.ndarray:
        if len(slots) != len(image_embeds):
            raise InputError(slot_mismatch(len(slots), len(image_embeds), raw_prompt=True))
        uids = list(range(first_uid, first_uid + len(image_embeds)))
        return src.layout(ids, slots, uids, [len(e) for e in image_embeds])

    def check_fits(self, positions: int) -> None:
        if positions > self.decoder.max_context:
            raise InputError(f"the prompt needs {positions} positions but the context holds "
                             f"{self.decoder.max_context}: shorten the prompt or use fewer images")

    def reset(self) -> None:
        self.decoder.truncate(0)
        self.positive = 0
        self.owner = None

    def forget(self) -> None:
        """Give up any claim on the cache's content (after an error or an interruption)."""
        self.owner = None

    def prefill(self, embeds: np.ndarray, mask: np.ndarray,
                sources: np.ndarray | None = None) -> np.ndarray:
        """Append positions to the cache; returns the last position's logits [vocab]."""
        start, seq = self.decoder.past_length, mask.shape[1]
        self.check_fits(start + seq)
        self.mask[0, start:start + seq] = mask[0]
        self.sources[start:start + seq] = src.UNKNOWN if sources is None else sources
        if start == 0:
            self.images_whole = True
        elif (mask[0] == src.MASK_IMAGE).any():
            self.images_whole = False
        positions = self.positive + np.cumsum(mask[0] > 0) - 1
        self.positive += int((mask[0] > 0).sum())
        return self.decoder.forward(embeds, self.mask[:, :start + seq], positions[None])[0]

    def run_prompt(self, sources: np.ndarray, images: Sequence[np.ndarray], owner: object | None,
                   exact: bool = True) -> tuple[np.ndarray, int]:
        """Make the cache hold ``sources`` and return the last position's logits, reusing the
        cached prefix that ``owner`` left there when that is exact. Returns (logits, reused)."""
        self.check_fits(len(sources))
        reused = self.reusable(sources, exact) if owner is not None and owner is self.owner else 0
        reused = min(reused, len(sources) - 1)  # the last position must run, for its logits
        self.owner = None  # until the cache holds ``sources`` again
        self.decoder.truncate(reused)
        self.positive = int((self.mask[0, :reused] > 0).sum())
        suffix = sources[reused:]
        logits = self.prefill(self.embed(suffix, images), src.mask(suffix)[None], suffix)
        self.owner = owner
        return logits, reused

    def reusable(self, target: np.ndarray, exact: bool) -> int:
        """How many cached positions a full pass over ``target`` would compute the same way.

        Causal attention: the common prefix. MMCA (exact): a text position before the first
        image averages over *later* image keys in DSVL's image softmax (docs/design.md), and an
        image position gets DSVL's image-query rule only in a pass from position 0; so the
        prefix is reusable only when no image lies past it, in the cache or the target, and the
        cached images were computed from position 0.
        """
        past = self.decoder.past_length
        n = min(past, len(target))
        differ = np.flatnonzero(self.sources[:n] != target[:n])
        common = int(differ[0]) if len(differ) else n
        if exact and self.artifacts.mmca and (
                not self.images_whole or src.is_image(target[common:]).any()
                or src.is_image(self.sources[common:past]).any()):
            return 0
        return common

    def generated_code(self, token: int) -> int:
        """The source code of a generated (fed) token: the decoder table's row, recorded as the
        prompt table's when the two rows are equal (then a re-encoding computes the same)."""
        code = self._generated_codes.get(token)
        if code is None:
            if self._row_values is not None and 0 <= token < self._row_count:
                start = token * self._row_width
                prompt, generated = (v[start:start + self._row_width] for v in self._row_values)
                same = prompt == generated  # as floats: as np.array_equal
            else:
                same = np.array_equal(self.artifacts.prompt_embeddings[token],
                                      self.artifacts.decoder_embeddings[token])
            code = self._generated_codes[token] = 2 * token + (0 if same else 1)
        return code

    def decode(self, first_logits: np.ndarray, options: SamplingOptions,
               stream: StreamCallback | None = None, tokens: list[int] | None = None,
               on_step: StepCallback | None = None, sampler: PickToken | None = None,
               stop_ids: Collection[int] | None = None) -> tuple[list[int], str]:
        """Sample up to ``max_new_tokens`` into ``tokens``; each token is fed back unless it
        ends generation. ``tokens`` keeps what was sampled if the loop is interrupted.
        ``on_step`` sees each step's logits before the pick (evaluations, benchmarks; changing
        them changes no greedy pick the graph made, ``DecoderRunner.step_pick``);
        ``sampler`` replaces the options' sampler (teacher forcing); ``stop_ids`` (default: EOS)
        end generation, so ``()`` decodes exactly ``max_new_tokens``."""
        pick, logits = sampler or Sampler(options), first_logits
        greedy = sampler is None and pick.greedy  # inlined below: a step's Python runs cold
        tokens = [] if tokens is None else tokens
        stop = {self.tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
        table = self._decoder_table
        streamer = StreamDecoder(self.tokenizer) if stream else None
        decoder, mask, cache = self.decoder, self.mask, self.decoder.cache
        limit, context, text = options.max_new_tokens, decoder.max_context, src.MASK_TEXT
        # The loop writes its buffers through memoryviews: right after a run, numpy's indexing
        # costs several times what it does hot (docs/design.md, "The generation loop calls
        # `step`, not `forward`").
        mask_values = memoryview(mask).cast("B").cast("q")
        source_values = memoryview(self.sources).cast("B").cast("q")
        # The graph's own greedy pick for each step's logits (the first logits' is taken here):
        # reading it spares a scan of the vocabulary that, right after a run, costs ~3% of a
        # small model's step (docs/design.md, "The greedy pick in the graph").
        graph_pick = decoder.step_pick if greedy else None
        if graph_pick is not None:
            graph_pick = memoryview(graph_pick).cast("B").cast("q")
        picked = False
        while True:
            if on_step is not None:
                on_step(logits, tokens)
            if picked:
                token = graph_pick[0]
            else:
                token = int(logits.argmax()) if greedy else pick(logits, tokens)
            tokens.append(token)
            if streamer:
                piece = streamer.push(token)
                if piece:
                    stream(piece)
            if token in stop:
                return tokens, "eos"
            if len(tokens) >= limit:
                return tokens, "max_new_tokens"
            length = cache.length
            if length >= context:
                return tokens, "context"
            mask_values[length] = text
            source_values[length] = self.generated_code(token)
            position = self.positive
            self.positive += 1
            logits = decoder.step_from(table, token, mask, position)
            picked = graph_pick is not None

    # ------------------------------------------------------------ one-shot
    def generate(self, images: Sequence, prompt: str, options: SamplingOptions | None = None,
                 stream: StreamCallback | None = None, raw_prompt: bool = False,
                 allow_special_tokens: bool = False, on_step: StepCallback | None = None,
                 sampler: PickToken | None = None) -> GenerationResult:
        """Answer ``prompt`` about ``images`` (DSVL's template unless ``raw_prompt``).

        The question cannot spell special tokens (``<image>``, ``</s>``...) unless
        ``allow_special_tokens`` (DSVL's behaviour); a ``raw_prompt`` is tokenized as DSVL would.
        ``sampler`` replaces the options' token picker (teacher forcing, as in ``decode``).
        """
        options = options or SamplingOptions()
        options.validate()
        images = as_image_list(images)  # "x.png" is one image, not five
        with self.lock:
            timings = {}
            clock = self.clock
            start = clock()
            if raw_prompt:
                ids = self.tokenizer.encode(prompt)
                slots = self.tokenizer.image_slots(ids)
            else:
                try:
                    head, tail = round_parts(prompt, len(images))
                except PromptError as err:
                    raise InputError(str(err)) from None
                ids, slots = self.tokenizer.encode_round(head, tail, allow_special_tokens)
            if len(slots) != len(images):
                raise InputError(slot_mismatch(len(slots), len(images), raw_prompt))
            image_embeds = list(self.encode_images(images))
            timings["vision_s"] = clock() - start
            sequence = self.layout(ids, slots, image_embeds)
            first, _ = self.run_prompt(sequence, image_embeds, owner=None)
            timings["time_to_first_token_s"] = clock() - start
            decode_start = clock()
            tokens, reason = self.decode(first, options, stream, on_step=on_step, sampler=sampler)
            timings["decode_s"] = clock() - decode_start
            timings["decode_tokens_per_s"] = (len(tokens) - 1) / timings["decode_s"] if len(tokens) > 1 and timings["decode_s"] > 0 else None
            timings["total_s"] = clock() - start
            return GenerationResult(ids, tokens, self.tokenizer.decode(tokens), reason, timings)

    def chat(self, mode: str = "exact", allow_special_tokens: bool = False,
             truncate_history: bool = False, template: str = "chat"):
        """A conversation (runtime/conversation.py): ``exact`` (DSVL's tokens, default),
        ``reencode`` or ``approximate``; prompts as DSVL's chat.py builds them, or with
        ``template="eval"`` as its eval/batch_generation.py does."""
        from runtime.conversation import Chat

        return Chat(self, mode, allow_special_tokens, truncate_history, template)


def slot_mismatch(slots: int, images: int, raw_prompt: bool) -> str:
    if raw_prompt:
        return (f"the prompt has {slots} <image> tokens but {images} images were given: "
                "give one image per <image>")
    return (f"the question spells {slots - images} extra <image> token(s), which special-token mode "
            "turns into image slots as DSVL's chat does; remove them or drop --allow-special-tokens")
