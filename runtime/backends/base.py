"""What every backend provides, on Polygraphy's ``BaseRunner`` model: one vision runner and one
decoder runner that owns its KV cache.

The bases do what is the same for every backend: they check each call's inputs against the
graph's contract (runtime/graphs.py) before the backend sees them, refuse calls after
``close()`` (and close as context managers), and time the backend's own call
(``last_inference_time()``, on an injectable clock). ``PingPongCache`` is the cache
bookkeeping both decoder runners share. The generation loop (runtime/pipeline.py) talks only
to these interfaces, so ONNX Runtime (CPU/CUDA/TensorRT EP) and native TensorRT engines are
interchangeable. Arrays crossing this boundary are numpy on the host; batch size is 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

import numpy as np

from runtime import contract as c
from runtime import graphs as g
from runtime.errors import BackendError, UserError

Clock = Callable[[], float]
Buffer = TypeVar("Buffer")


class ContextOverflow(UserError):
    """More positions than the KV cache (the model's context) holds."""


class InputShapeError(UserError):
    """A runner was called with arrays that do not fit its graph."""


class Runner:
    """Closable (also as a context manager) and timed: the backend wraps its own inference call
    in ``self.timed()``, so ``last_inference_time()`` leaves Python-side work out."""

    kind = "runner"

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or time.perf_counter
        self._last_time: float | None = None
        self._closed = False

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free what the backend holds; later calls raise. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """The backend's own cleanup (device buffers, streams, sessions)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def last_inference_time(self) -> float | None:
        """Seconds of the last backend call itself (session or engine run), None before any."""
        return self._last_time

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self._last_time = self.clock() - start

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the {self.kind} runner was closed; open the pipeline again")


def check_shapes(graph: g.GraphSpec, arrays: dict[str, np.ndarray], sizes: dict[str, int],
                 context: str = "") -> None:
    """Each array has its tensor's rank and, on every axis whose size ``sizes`` knows, that
    size; floats where the graph takes floats, integers where it takes int64."""
    for name, array in arrays.items():
        spec = graph.tensor(name)
        want = [sizes.get(axis) for axis in spec.axes]
        wrong_kind = (array.dtype.kind != "f") if spec.dtype == g.IO_FLOAT else (array.dtype.kind not in "iu")
        if (array.ndim != len(want) or wrong_kind
                or any(w is not None and w != d for w, d in zip(want, array.shape, strict=True))):
            shape = ", ".join(str(w) if w is not None else axis for w, axis in zip(want, spec.axes, strict=True))
            kind = "a float" if spec.dtype == g.IO_FLOAT else "an integer"
            raise InputShapeError(f"{context}{name} must be {kind} array [{shape}]; got "
                                  f"{array.dtype} {tuple(array.shape)}")


def is_step(inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            hidden: int, past: int) -> bool:
    """The one shape every decode step has, checked in a few comparisons: ``check_shapes``
    (the general check, with its message) costs a measurable share of a short step."""
    return (inputs_embeds.shape == (1, 1, hidden) and inputs_embeds.dtype.kind == "f"
            and attention_mask.shape == (1, past + 1) and attention_mask.dtype.kind in "iu"
            and position_ids.shape == (1, 1) and position_ids.dtype.kind in "iu")


class VisionRunner(Runner):
    """``encode``: pixel_values [images, 3, H, W] float -> image_embeds [images, tokens, lang_dim]
    float32. Backends implement ``_encode``."""

    kind = "vision"
    graph = g.vision_graph(dynamic_resolution=True)  # a backend that knows more narrows these
    sizes = {g.CHANNELS: 3}

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        self._check_open()
        check_shapes(self.graph, {c.VISION_INPUT: pixel_values}, self.sizes)
        if not len(pixel_values):
            raise InputShapeError(f"{c.VISION_INPUT} holds no image")
        return self._encode(pixel_values)

    def _encode(self, pixel_values: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DecoderRunner(Runner):
    """``forward`` runs S new positions after the cached past and appends their keys and values
    to the cache. Backends set ``num_layers``, ``hidden_size``, ``max_context`` and ``cache``
    and implement ``_forward``."""

    kind = "decoder"
    num_layers: int
    hidden_size: int
    max_context: int  # most positions the cache holds (prompt + generated)
    cache: PingPongCache
    # The graph's own greedy pick for the logits the last ``step`` returned (contract
    # ``next_token``): an int64 [1] buffer that each step overwrites, or None where the graph
    # has none (the generation loop then takes the logits' argmax itself).
    step_pick: np.ndarray | None = None

    @functools.cached_property
    def graph(self) -> g.GraphSpec:
        return g.decoder_graph(self.num_layers)

    @property
    def past_length(self) -> int:
        """Positions already in the KV cache."""
        return self.cache.length

    def forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """inputs_embeds [1, S, hidden] float; attention_mask [1, past + S] int (0/1/2);
        position_ids [1, S] int. Returns float32 logits [S, vocab] when ``all_logits``, else
        [1, vocab] for the last position only."""
        self._check_open()
        past = self.cache.length
        seq = inputs_embeds.shape[1] if inputs_embeds.ndim == 3 else -1
        if not (seq == 1 and is_step(inputs_embeds, attention_mask, position_ids, self.hidden_size, past)):
            check_shapes(self.graph, {c.INPUTS_EMBEDS: inputs_embeds, c.ATTENTION_MASK: attention_mask,
                                      c.POSITION_IDS: position_ids},
                         {g.BATCH: 1, g.SEQUENCE: seq, g.TOTAL: past + seq, g.HIDDEN: self.hidden_size},
                         f"with {past} cached positions and {seq} new, ")
        if past + seq > self.max_context:
            raise ContextOverflow(f"context full: {past} cached + {seq} new positions exceed the "
                                  f"context of {self.max_context}")
        return self._forward(inputs_embeds, attention_mask, position_ids, all_logits)

    def step(self, embedding: np.ndarray, mask: np.ndarray, position: int) -> np.ndarray:
        """One decode step from the generation loop's own buffers: ``embedding`` [hidden]
        float32 is the new position's input, ``mask`` [1, >= past + 1] int64 a C-contiguous
        buffer whose first past + 1 values are the whole mask, ``position`` its position id.
        Returns float32 logits [vocab], valid until the next call. ``forward`` with the
        buffers sliced, here; a backend may override it to bind ``mask`` in place and skip
        the shape checks, since on a small model a step's Python is a measurable share of it
        (docs/design.md, "The generation loop calls `step`, not `forward`")."""
        past = self.cache.length
        position_ids = np.array([[position]], np.int64)
        return self.forward(embedding[None, None], mask[:, :past + 1], position_ids)[0]

    def step_from(self, table: np.ndarray, token: int, mask: np.ndarray, position: int) -> np.ndarray:
        """``step`` with ``table[token]`` as the embedding (the generation loop feeding back a
        token); a backend may copy the row straight from the table into its input buffer."""
        return self.step(table[token], mask, position)

    def _check_step_mask(self, mask: np.ndarray) -> None:
        """What ``step`` asks of its mask buffer, checked once per buffer by backends that
        bind it in place."""
        if not (mask.dtype == np.int64 and mask.ndim == 2 and mask.shape[0] == 1
                and mask.shape[1] >= self.max_context and mask.flags.c_contiguous):
            raise InputShapeError(f"a step's mask buffer must be C-contiguous int64 [1, >= "
                                  f"{self.max_context}]; got {mask.dtype} {tuple(mask.shape)}")

    def _forward(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray, all_logits: bool) -> np.ndarray:
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (0 empties the cache)."""
        self._check_open()
        self.cache.truncate(length)


Compact = Callable[[Buffer, Buffer, int, int], None]


class PingPongCache(Generic[Buffer]):
    """Two buffers per cache tensor, each large enough for the whole context.

    A call binds ``past`` to the current side at the cached length and ``present`` to the
    other side at past + new positions; the graph writes the grown cache straight into place,
    then the sides swap: no host copy, no reallocation. Layout [kv_heads, length, head_dim] is
    packed for any length, so truncating is a strided compaction of each tensor into the idle
    side (``compact(src, dst, old_length, new_length)``, supplied by the backend), which then
    becomes current. ``in_place`` caches (one shared buffer, written in place by the graph)
    just forget positions past the new length.
    """

    def __init__(self, pairs: Sequence[tuple[Buffer, Buffer]], max_context: int,
                 compact: Compact | None = None, in_place: bool = False):
        if compact is None and not in_place:
            raise TypeError("a ping-pong cache needs a compact function to truncate")
        self.pairs, self.max_context = list(pairs), max_context
        self.compact, self.in_place = compact, in_place
        self.side, self.length = 0, 0

    def past(self, index: int) -> Buffer:
        return self.pairs[index][self.side]

    def present(self, index: int) -> Buffer:
        return self.pairs[index][1 - self.side]

    def advance(self, length: int) -> None:
        """The graph wrote ``length`` positions into the idle side: make it current."""
        self.side, self.length = 1 - self.side, length

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise UserError(f"cannot truncate a {self.length}-position cache to {length}")
        if length == self.length:
            return
        if length == 0 or self.in_place:
            self.length = length
            return
        for current, idle in ((pair[self.side], pair[1 - self.side]) for pair in self.pairs):
            self.compact(current, idle, self.length, length)  # type: ignore[misc]
        self.advance(length)
