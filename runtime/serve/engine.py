"""The serving engine: one thread that owns the model and decodes every request in batches.

Continuous batching: between decode steps, waiting requests are admitted (vision encoder
and prompt pass, one request at a time) and finished or cancelled ones leave; each step runs
every active sequence through the decoder at once (runtime/batching.py). Requests hand in a
``Job`` and get ``Event``s back through their ``emit`` callback, from this thread.

Each request is stateless: its messages are rebuilt as a DSVL conversation (a fresh
``Chat`` from runtime/conversation.py with the earlier rounds recorded), so a failed or
cancelled request leaves nothing behind but its freed batch row.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime import sources as src
from runtime.batching import Batch, DecoderSession, SharedBatch
from runtime.errors import UserError
from runtime.pipeline import InputError, Pipeline
from runtime.sampling import Sampler, SamplingOptions
from runtime.serve.textstream import TextStream, byte_token_ids


@dataclass
class Round:
    """One earlier user turn and the assistant's answer to it (text, re-tokenized)."""

    question: str
    images: list
    answer: str


@dataclass
class Event:
    kind: str  # "start" (admitted), "text", "end", "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on "end"
    status: int = 200  # on "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    history: list[Round]
    question: str
    images: list
    options: SamplingOptions
    max_tokens: int
    explicit_max_tokens: bool
    stop: list[str]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    checked: float = 0.0  # when the HTTP side last checked that the client is still there


@dataclass
class Stream:
    """A job being decoded: its batch, sampler, tokens so far and text state."""

    job: Job
    batch: Batch | SharedBatch
    sampler: Sampler
    text: TextStream
    prompt_tokens: int
    length: int  # positions this sequence has cached
    tokens: list[int] = field(default_factory=list)


class QueueFull(Exception):
    """The engine's waiting queue is full."""


class Engine:
    def __init__(self, pipe: Pipeline, max_batch: int = 8, max_queue: int = 32,
                 metrics=None, allow_special_tokens: bool = False):
        self.pipe, self.max_batch, self.max_queue = pipe, max_batch, max_queue
        self.allow_special_tokens = allow_special_tokens
        self.metrics = metrics
        self.decoder = DecoderSession(pipe.decoder.session, pipe.artifacts.decoder,
                                      pipe.decoder.max_context)
        self.table = pipe.artifacts.decoder_embeddings
        self.eos = pipe.tokenizer.eos_token_id
        self.byte_ids = byte_token_ids(pipe.tokenizer)
        self.shared = self.decoder.new_batch()
        self.batches: dict[int, list[Stream]] = {}  # id(batch) -> its streams, by row
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="dsvl-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ requests' side
    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self._gauge()
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join(timeout=10)

    @property
    def active(self) -> int:
        return sum(len(s) for s in list(self.batches.values()))  # read from other threads too

    # ------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.waiting and not self.active:
                    self.wake.wait()
                if not self.running:
                    break
                admit = []
                while self.waiting and self.active + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
                self._gauge(len(admit))
            for job in admit:
                self._guarded(self._admit, job)
            self._drop_cancelled()
            if self.active:
                self._guarded(self._step)
        for streams in list(self.batches.values()):
            for stream in streams:
                stream.job.emit(Event("error", "the server is shutting down", status=503))
        self.batches.clear()

    def _guarded(self, work: Callable, *args) -> None:
        """Never let one request, or a backend failure, stop the engine."""
        try:
            work(*args)
        except Exception as err:  # a backend failure: fail what it touched, keep serving
            message = _first_line(err)
            if args:
                args[0].emit(Event("error", f"internal error: {message}", status=500))
            else:
                self._fail_all(f"internal error during a decode step: {message}")

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            sequence, embeds = self._sequence(job)
        except UserError as err:  # runtime/errors.py: a request the model cannot serve
            self._count("rejected")
            job.emit(Event("error", str(err), status=400))
            return
        context = self.decoder.max_context
        if job.explicit_max_tokens and len(sequence) + job.max_tokens > context:
            self._count("rejected")
            job.emit(Event("error", f"this request needs {len(sequence) + job.max_tokens} positions "
                                    f"({len(sequence)} in the messages, images included, and "
                                    f"{job.max_tokens} in max_tokens) but the context holds "
                                    f"{context}: shorten the conversation or lower max_tokens",
                           status=400))
            return
        prefilled = self.decoder.prefill(self.pipe.embed(sequence, embeds), src.mask(sequence))
        batch = self.shared if self.decoder.pad_safe(prefilled.mask) else self.decoder.new_batch()
        stream = Stream(job, batch, Sampler(job.options), TextStream(self.pipe.tokenizer, job.stop, self.byte_ids),
                        len(sequence), len(sequence))
        job.emit(Event("start", prompt_tokens=len(sequence)))
        if self.metrics:
            self.metrics.first_token(time.perf_counter() - job.submitted)
        if not self._advance(stream, prefilled.logits):
            return
        batch.join(prefilled)
        self.batches.setdefault(id(batch), []).append(stream)

    def _sequence(self, job: Job) -> tuple[np.ndarray, list[np.ndarray]]:
        """DSVL's re-encoding of the whole conversation, as Chat's exact mode would run it."""
        pipe = self.pipe
        chat = pipe.chat("exact", self.allow_special_tokens)
        plain = pipe.tokenizer.plain_tokenizer()
        for round_ in job.history:
            answer = plain.encode(round_.answer, add_special_tokens=False).ids
            chat.record(round_.question, list(pipe.encode_images(round_.images)), answer)
        sequence, embeds = chat.sequence_for(job.question, list(pipe.encode_images(job.images)))
        if len(sequence) > self.decoder.max_context:
            raise InputError(f"the messages need {len(sequence)} positions (images included) but "
                             f"the context holds {self.decoder.max_context}")
        return sequence, embeds

    def _step(self) -> None:
        for key, streams in list(self.batches.items()):
            if not streams:
                del self.batches[key]
                continue
            batch = streams[0].batch
            logits = batch.step(self.table[[s.tokens[-1] for s in streams]])
            done = []
            for row, stream in enumerate(streams):
                stream.length += 1
                try:
                    going = self._advance(stream, logits[row])
                except Exception as err:  # one stream's sampling fails: only it ends
                    stream.job.emit(Event("error", f"internal error: {_first_line(err)}", status=500))
                    going = False
                if not going:
                    done.append(row)
            self._leave(key, done)

    def _advance(self, stream: Stream, logits: np.ndarray) -> bool:
        """Sample one token and send its text; False when the stream has finished."""
        job = stream.job
        token = stream.sampler(logits, stream.tokens)
        stream.tokens.append(token)
        if self.metrics:
            self.metrics.tokens(1)
        piece, stopped = stream.text.push(token)
        reason = None
        if stopped or token == self.eos:
            reason = "stop"
        elif len(stream.tokens) >= job.max_tokens or stream.length >= self.decoder.max_context:
            reason = "length"
        if reason and not stopped:
            piece += stream.text.finish()
        if piece:
            job.emit(Event("text", piece))
        if reason:
            self._count("ok")
            job.emit(Event("end", finish_reason=reason, prompt_tokens=stream.prompt_tokens,
                           completion_tokens=len(stream.tokens)))
            return False
        return True

    def _drop_cancelled(self) -> None:
        for key, streams in list(self.batches.items()):
            gone = [row for row, s in enumerate(streams) if s.job.cancelled.is_set()]
            if gone:
                self._count("cancelled")
            self._leave(key, gone)

    def _leave(self, key: int, rows: list[int]) -> None:
        if not rows:
            return
        streams = self.batches[key]
        streams[0].batch.leave(rows)
        self.batches[key] = [s for row, s in enumerate(streams) if row not in rows]
        if not self.batches[key]:
            del self.batches[key]

    def _fail_all(self, message: str) -> None:
        for streams in self.batches.values():
            for stream in streams:
                stream.job.emit(Event("error", message, status=500))
        self.batches.clear()
        self.shared = self.decoder.new_batch()

    # ------------------------------------------------------------ metrics
    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.finished(outcome)

    def _gauge(self, admitting: int = 0) -> None:
        if self.metrics:
            self.metrics.queue(len(self.waiting), self.active + admitting)


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
