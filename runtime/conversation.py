"""Multi-turn chat in DSVL's template, answering as DSVL's chat.py does.

DSVL's chat.py re-encodes the whole conversation every turn: the history ids (each round's
prompt, BOS first, then its answer without BOS/EOS plus one EOS), the new round, all images
again (paired in reverse over the whole conversation), everything embedded with ``lang_embed``.
The modes:

- ``exact`` (default): DSVL's tokens. The turn's sequence is DSVL's full re-encoding; the
  pipeline reuses the cached prefix that a full pass would compute the same way and runs the
  rest (runtime/pipeline.py ``reusable``). A previous answer, generated through
  ``embed_tokens``, is re-run through ``lang_embed`` when the two tables' rows differ; a turn
  that adds images recomputes from the first image slot (DSVL re-pairs all images), or from
  the start with MMCA (see docs/runtime.md for when and why).
- ``reencode``: the whole conversation re-run every turn, no reuse; the same tokens as
  ``exact`` up to floating-point rounding, at a higher cost. For checking and measuring.
- ``approximate``: keeps everything cached and only runs the new round. It gives up DSVL's
  re-embedding of answers with ``lang_embed``, its cross-turn image pairing, and (MMCA) its
  attention rules for positions before and at images; tokens can then differ from DSVL's.

A chat is a value: its history lives here, the pipeline's cache is only reused while it still
holds this chat's sequence, and a failed or interrupted turn leaves the history as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime import sources as src
from runtime.errors import UserError
from runtime.pipeline import (
    GenerationResult,
    InputError,
    Pipeline,
    StepCallback,
    StreamCallback,
    slot_mismatch,
)
from runtime.preprocess import as_image_list
from runtime.prompt import PromptError, round_parts
from runtime.sampling import SamplingOptions

MODES = ("exact", "reencode", "approximate")
# Whose prompts: chat/chat.py's (images named "### Image n:" in the text), or
# eval/batch_generation.py's (see TextTokenizer.number_images_as_eval). Both keep the same history.
TEMPLATES = ("chat", "eval")


@dataclass
class Turn:
    """One round as DSVL's history holds it."""

    ids: list[int]  # the round's prompt ids, BOS first
    slots: list[int]  # indices into ``ids`` of its image slots
    answer: list[int]  # the kept answer: no leading BOS, no trailing EOS, one EOS appended
    first_image: int  # index of its first image in the conversation
    num_images: int


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
    def __init__(self, pipeline: Pipeline, mode: str = "exact", allow_special_tokens: bool = False,
                 truncate_history: bool = False, template: str = "chat"):
        if mode not in MODES:
            raise UserError(f"unknown chat mode {mode!r}: choose one of {', '.join(MODES)}")
        if template not in TEMPLATES:
            raise UserError(f"unknown prompt template {template!r}: choose one of {', '.join(TEMPLATES)}")
        self.pipe, self.mode, self.template = pipeline, mode, template
        self.allow_special_tokens, self.truncate_history = allow_special_tokens, truncate_history
        self.turns: list[Turn] = []
        self.image_embeds: list[np.ndarray] = []  # every image's embeddings, in order
        self.kept_from = 0  # turns before this were dropped to fit the context
        self.approximate_sequence = np.zeros(0, np.int64)  # what approximate mode keeps cached

    @property
    def history(self) -> list[int]:
        """DSVL's ``system_instruct``: every kept round's prompt ids and answer."""
        return [t for turn in self.turns[self.kept_from:] for t in turn.ids + turn.answer]

    @property
    def num_images(self) -> int:
        return len(self.image_embeds)

    def ask(self, question: str, images: Sequence = (), options: SamplingOptions | None = None,
            stream: StreamCallback | None = None, on_step: StepCallback | None = None) -> GenerationResult:
        pipe, tok = self.pipe, self.pipe.tokenizer
        options = options or SamplingOptions()
        options.validate()
        images = as_image_list(images)
        with pipe.lock:
            start = pipe.clock()
            turn = self._turn(question, len(images))
            embeds = self.image_embeds + list(pipe.encode_images(images))
            sequence, kept_from, notes = self._sequence(turn, embeds)
            owner = None if self.mode == "reencode" else self
            try:
                first, reused = pipe.run_prompt(sequence, embeds, owner, exact=self.mode != "approximate")
            except BaseException:
                pipe.forget()
                raise
            ttft = pipe.clock() - start
            tokens: list[int] = []
            try:
                _, reason = pipe.decode(first, options, stream, tokens, on_step)
            except KeyboardInterrupt:  # stop the answer, keep the conversation
                pipe.forget()
                reason = "interrupted"
            except BaseException:
                pipe.forget()
                raise
            turn.answer = history_tokens(tokens, tok.bos_token_id, tok.eos_token_id)
            self._commit(turn, embeds, kept_from, sequence)
            if reason == "context":
                notes.append("the context filled up mid-answer: the answer is cut; /clear starts "
                             "over" + ("" if self.truncate_history else
                                       ", --truncate-history drops the oldest turns"))
            prompt_ids = turn.ids if self.mode == "approximate" else self.history[:-len(turn.answer)]
            timings = {"time_to_first_token_s": ttft, "total_s": pipe.clock() - start,
                       "reused_positions": reused, "prefilled_positions": len(sequence) - reused}
            return GenerationResult(prompt_ids, tokens, tok.decode(tokens), reason, timings, notes)

    # ------------------------------------------------------------ client-held history
    def record(self, question: str, image_embeds: Sequence[np.ndarray], answer: list[int]) -> None:
        """Append a finished round without running it: a server gets the history from its
        client. ``answer`` is the answer's ids (as generated, or the re-tokenized text)."""
        if self.mode == "approximate":
            raise UserError("approximate mode keeps its own cache: record() needs exact or reencode")
        turn = self._turn(question, len(image_embeds))
        tok = self.pipe.tokenizer
        turn.answer = history_tokens(answer, tok.bos_token_id, tok.eos_token_id)
        self._commit(turn, self.image_embeds + list(image_embeds), self.kept_from, np.zeros(0, np.int64))

    def sequence_for(self, question: str, image_embeds: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The sequence ``ask`` would run for this round (DSVL's re-encoding) and every image's
        embeddings, without running it or changing the chat: a server batches its decoding.
        The caller checks that it fits the context."""
        if self.mode == "approximate":
            raise UserError("approximate mode keeps its own cache: sequence_for() needs exact or reencode")
        turn = self._turn(question, len(image_embeds))
        embeds = self.image_embeds + list(image_embeds)
        return self._dsvl_sequence(self.turns[self.kept_from:] + [turn], embeds), embeds

    # ------------------------------------------------------------ the turn's sequence
    def _turn(self, question: str, num_images: int) -> Turn:
        """The round's ids and image slots in DSVL's template (no answer yet)."""
        as_eval = self.template == "eval"
        try:
            head, tail = round_parts(question, num_images, self.num_images, not self.turns,
                                     number_images=not as_eval)
        except PromptError as err:
            raise InputError(str(err)) from None
        tokenizer = self.pipe.tokenizer
        ids, slots = tokenizer.encode_round(head, tail, self.allow_special_tokens)
        if as_eval and num_images:
            ids, slots = tokenizer.number_images_as_eval(ids, slots, self.num_images + num_images)
        if len(slots) != num_images:
            raise InputError(slot_mismatch(len(slots), num_images, raw_prompt=False))
        return Turn(ids, slots, [], self.num_images, num_images)

    def _sequence(self, turn: Turn, embeds: list[np.ndarray]) -> tuple[np.ndarray, int, list[str]]:
        """The sequence the cache must hold for this turn, the first kept turn, and notes."""
        context, notes = self.pipe.decoder.max_context, []
        kept_from = self.kept_from
        if self.mode == "approximate":
            own = self.pipe.layout(turn.ids, turn.slots, embeds[turn.first_image:], turn.first_image)
            sequence = np.concatenate([self.approximate_sequence, own])
            if len(sequence) <= context:
                return sequence, kept_from, notes
        while True:
            sequence = self._dsvl_sequence(self.turns[kept_from:] + [turn], embeds)
            if len(sequence) <= context:
                return sequence, kept_from, notes
            if not self.truncate_history or kept_from >= len(self.turns):
                raise InputError(
                    f"the conversation needs {len(sequence)} positions but the context holds "
                    f"{context}: /clear starts over" + ("" if self.truncate_history else
                                                        ", --truncate-history drops the oldest turns"))
            dropped = self.turns[kept_from]
            notes.append(f"dropped the oldest turn ({len(dropped.ids) + len(dropped.answer)} tokens, "
                         f"{dropped.num_images} image(s)) to fit the context")
            kept_from += 1

    def _dsvl_sequence(self, turns: list[Turn], embeds: list[np.ndarray]) -> np.ndarray:
        """DSVL's re-encoding: all rounds' ids, all their images paired in reverse over the
        whole sequence, every text token from the prompt table."""
        ids, slots, uids = [], [], []
        for turn in turns:
            slots += [len(ids) + s for s in turn.slots]
            uids += range(turn.first_image, turn.first_image + turn.num_images)
            ids += turn.ids + turn.answer
        return src.layout(ids, slots, uids, [len(embeds[u]) for u in uids])

    def _commit(self, turn: Turn, embeds: list[np.ndarray], kept_from: int, sequence: np.ndarray) -> None:
        self.turns.append(turn)
        self.image_embeds = embeds
        self.kept_from = kept_from
        if self.mode == "approximate":
            answer = np.asarray([self.pipe.generated_code(t) for t in turn.answer], np.int64)
            self.approximate_sequence = np.concatenate([sequence, answer])
