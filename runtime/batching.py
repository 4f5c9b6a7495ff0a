"""Batched decoding over the ONNX Runtime decoder session: many sequences, one step.

The exported ``decoder.onnx`` (``--kv-cache concat``) has dynamic batch and sequence axes and
reads 0 in ``attention_mask`` as padding, so sequences of different lengths share a decode
step once their caches are padded to a common length. A ``Batch`` keeps every row
left-padded: row i holds ``pad_i`` masked positions, then its own cached positions, and each
step appends one position to every row. Position ids are per row (a row's own count), so
padding changes neither rotary positions nor attention: a masked key gets weight exp(-32768
+ ...) = 0 exactly in fp32. Sequences join (their prefill cache padded in) and leave (rows
dropped, then columns that are padding in every row trimmed) between steps.

One exception, measured against the single-stream run: with MMCA over a concat cache, a
decode query in a sequence without image positions averages uniformly over every non-image key
in DSVL's image softmax (docs/design.md), padding included; such a sequence must never be
padded, so ``pad_safe`` says so and the scheduler gives it a batch of its own.

A decoder with the in-place cache (``kv_cache: shared-buffer``, GroupQueryAttention, MMCA or
not) batches without padding at all: ``SharedBatch`` gives each row its own [kv_heads,
max_context, head_dim] slot of one buffer per cache tensor, and the graph reads each row's
length from its mask (right-padded: the count of its non-zeros), so a step writes every row's
new position in place and copies no cache. GroupQueryAttention never reads a key past a row's
length, so a row's uniform MMCA average covers its own keys only. The mask keeps each row's
1/2 values: MMCA's softmaxes read them. A sequence joins by copying its prompt cache into a
free slot once.

runtime/backends/ort.py's batch-1 runner stays the path for ``runtime.generate``/``chat``;
this module shares its session (no second copy of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime import contract as c
from runtime import graphs as g
from runtime.backends.base import PingPongCache
from runtime.half import convert
from runtime.manifest import DecoderSection


@dataclass
class Prefilled:
    """One sequence after its prompt pass: its cache and the last position's logits."""

    keys: list[np.ndarray]  # per layer [1, kv_heads, length, head_dim]
    values: list[np.ndarray]
    mask: np.ndarray  # [length] int64, 1 text / 2 image
    logits: np.ndarray  # [vocab] float32

    @property
    def length(self) -> int:
        return len(self.mask)


class DecoderSession:
    """The decoder graph run with whole batches: prompt passes (batch 1) and decode steps."""

    def __init__(self, session, spec: DecoderSection, max_context: int):
        self.in_place = spec.kv_cache == c.KV_SHARED
        self.keeps_logits = g.keeps_logits(spec.graph)  # as the batch-1 runner reads it
        self.keep_last = np.array(1, np.int64)  # bound by address: must outlive every step
        self.session, self.max_context = session, max_context
        self.num_layers = spec.num_layers
        self.heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.vocab = spec.vocab_size
        self.dtype = c.numpy_dtype(spec.io_dtype)
        self.cache_dtype = c.numpy_dtype(spec.cache_dtype)  # int8 where the cache is quantized
        self.mmca = spec.enable_mmca_attention
        # Where the graph allows it, a step binds the batch's mask rows as they are (full
        # width) instead of a copy cut to the longest row.
        self.full_width_mask = g.takes_full_width_mask(spec.kv_cache, spec.graph, self.mmca)
        self.outputs = c.decoder_output_names(self.num_layers)

    def new_batch(self) -> Batch | SharedBatch:
        return SharedBatch(self) if self.in_place else Batch(self)

    def run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            keys: list[np.ndarray], values: list[np.ndarray]) -> list[np.ndarray]:
        feed = {c.INPUTS_EMBEDS: np.ascontiguousarray(convert(embeds, self.dtype)),
                c.ATTENTION_MASK: np.ascontiguousarray(mask, np.int64),
                c.POSITION_IDS: np.ascontiguousarray(positions, np.int64)}
        if self.keeps_logits:
            feed[c.LOGITS_TO_KEEP] = self.keep_last
        for layer in range(self.num_layers):
            feed[c.past_key_name(layer)] = keys[layer]
            feed[c.past_value_name(layer)] = values[layer]
        return self.session.run(self.outputs, feed)

    def empty_cache(self, batch: int = 1, length: int = 0) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, length, self.head_dim), self.cache_dtype)
                for _ in range(self.num_layers)]

    def prefill(self, embeds: np.ndarray, mask: np.ndarray) -> Prefilled:
        """A prompt pass from position 0: embeds [1, L, hidden], mask [L] (1/2)."""
        if len(mask) > self.max_context:
            raise ValueError(f"{len(mask)} positions exceed the context of {self.max_context}")
        positions = (np.cumsum(mask > 0) - 1)[None]
        # An in-place graph writes into its past buffer: one of exactly the prompt's length
        # (SharedBatch.join copies it into a row's slot); a concat graph starts from empty.
        length = len(mask) if self.in_place else 0
        out = self.run(embeds, mask[None], positions, self.empty_cache(length=length),
                       self.empty_cache(length=length))
        return Prefilled(out[1::2], out[2::2], mask.astype(np.int64),
                         convert(out[0][0, -1], np.float32))

    def pad_safe(self, mask: np.ndarray) -> bool:
        """Whether a sequence with this mask decodes the same with padding in its cache (an
        in-place cache has no padding: each row's length comes from its mask)."""
        return self.in_place or not self.mmca or bool((mask == c.MASK_IMAGE).any())


class Batch:
    """Rows decoding together. Rows are addressed by index; ``join`` appends one, ``leave``
    drops some (indices shift down, as in a list)."""

    def __init__(self, decoder: DecoderSession):
        self.decoder = decoder
        self.keys = decoder.empty_cache(0)
        self.values = decoder.empty_cache(0)
        self.mask = np.zeros((0, 0), np.int64)  # [rows, width]; 0 = padding
        self.buffers = StepBuffers(decoder)
        self.positions = np.zeros(0, np.int64)  # each row's next position id

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def lengths(self) -> np.ndarray:
        """Each row's own cached positions (its width without padding)."""
        return (self.mask > 0).sum(axis=1) if len(self) else np.zeros(0, np.int64)

    def join(self, seq: Prefilled) -> None:
        width = max(self.width, seq.length)
        self._pad_to(width)
        extra = width - seq.length
        pad = ((0, 0), (0, 0), (extra, 0), (0, 0))
        self.keys = [np.concatenate([k, np.pad(n, pad)]) for k, n in zip(self.keys, seq.keys, strict=True)]
        self.values = [np.concatenate([v, np.pad(n, pad)]) for v, n in zip(self.values, seq.values, strict=True)]
        self.mask = np.concatenate([self.mask, np.pad(seq.mask, (extra, 0))[None]])
        self.positions = np.append(self.positions, int((seq.mask > 0).sum()))

    def leave(self, rows: list[int]) -> None:
        keep = np.setdiff1d(np.arange(len(self)), rows)
        self.mask, self.positions = self.mask[keep], self.positions[keep]
        trim = self.width - int(self.lengths().max()) if len(keep) else self.width
        self.keys = [np.ascontiguousarray(k[keep, :, trim:]) for k in self.keys]
        self.values = [np.ascontiguousarray(v[keep, :, trim:]) for v in self.values]
        self.mask = np.ascontiguousarray(self.mask[:, trim:])

    def step(self, embeds: np.ndarray) -> np.ndarray:
        """Feed one token embedding per row ([rows, hidden]); returns logits [rows, vocab]."""
        if self.width + 1 > self.decoder.max_context:
            raise ValueError(f"a decode step would need {self.width + 1} cached positions, "
                             f"the context holds {self.decoder.max_context}")
        mask = np.concatenate([self.mask, np.full((len(self), 1), c.MASK_TEXT, np.int64)], axis=1)
        tensors = [t for pair in zip(self.keys, self.values, strict=True) for t in pair]
        logits, present = self.buffers.step(embeds[:, None], mask, self.positions[:, None], tensors)
        self.keys, self.values, self.mask = present[0::2], present[1::2], mask
        self.positions = self.positions + 1
        return convert(logits[:, -1], np.float32)

    def _pad_to(self, width: int) -> None:
        extra = width - self.width
        if extra <= 0:
            return
        pad = ((0, 0), (0, 0), (extra, 0), (0, 0))
        self.keys = [np.pad(k, pad) for k in self.keys]
        self.values = [np.pad(v, pad) for v in self.values]
        self.mask = np.pad(self.mask, ((0, 0), (extra, 0)))

    def longest(self) -> int:
        """The longest row's own length: what the context must hold after trimming."""
        return int(self.lengths().max()) if len(self) else 0


class StepBuffers:
    """Two flat buffers per cache tensor, reused by every decode step: a ``PingPongCache``
    (runtime/backends/base.py), as the batch-1 runner keeps (runtime/backends/ort.py). ONNX
    Runtime reads the past from one side and writes the present into the other, then the sides
    swap. Letting ONNX Runtime allocate the present cache each step instead costs a fresh,
    page-faulted allocation of the whole cache: at 4 rows it made the graph's Concat the second
    largest cost of a step. Buffers are flat (any rows x width fits) and grow by doubling."""

    def __init__(self, decoder: DecoderSession):
        from runtime.backends.ort import FastBinding, runs_on_device

        self.decoder, self.binding = decoder, FastBinding(decoder.session, runs_on_device(decoder.session))
        self.names = c.cache_name_pairs(decoder.num_layers)
        self.capacity = 0  # elements per buffer
        self.cache = self._cache(0)

    def _cache(self, capacity: int) -> PingPongCache[np.ndarray]:
        d = self.decoder
        pairs = [(np.empty(capacity, d.cache_dtype), np.empty(capacity, d.cache_dtype)) for _ in self.names]
        return PingPongCache(pairs, d.max_context, self._compact)

    @staticmethod
    def _compact(*_: object) -> None:
        raise NotImplementedError("a batch drops positions by leave(), which reloads the buffers")

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run one step; ``past`` (key, value per layer, [rows, heads, width, dim]) may be views
        of the current side (the last step's present) or arrays from a join or leave."""
        d = self.decoder
        rows, _, width, _ = past[0].shape
        shape_in, shape_out = [rows, d.heads, width, d.head_dim], [rows, d.heads, width + 1, d.head_dim]
        need = rows * d.heads * (width + 1) * d.head_dim
        if not all(self._on_side(t) for t in past) or need > self.capacity:
            kept = [np.array(t) for t in past]  # before buffers are replaced or overwritten
            if need > self.capacity:
                self.capacity = 2 * need
                self.cache = self._cache(self.capacity)
            for index, tensor in enumerate(kept):
                self.cache.past(index)[:tensor.size] = tensor.reshape(-1)
        bind = self.binding
        inputs = (np.ascontiguousarray(convert(embeds, d.dtype)), np.ascontiguousarray(mask, np.int64),
                  np.ascontiguousarray(positions, np.int64))
        for name, array in zip((c.INPUTS_EMBEDS, c.ATTENTION_MASK, c.POSITION_IDS), inputs, strict=True):
            bind.input(name, array.dtype, list(array.shape), array.ctypes.data)
        if d.keeps_logits:
            bind.input(c.LOGITS_TO_KEEP, np.int64, [], d.keep_last.ctypes.data)
        cache = self.cache
        for index, (past_name, present_name) in enumerate(self.names):
            bind.input(past_name, d.cache_dtype, shape_in, cache.past(index).ctypes.data)
            bind.output(present_name, d.cache_dtype, shape_out, cache.present(index).ctypes.data)
        logits = np.empty((rows, 1, d.vocab), d.dtype)
        bind.output(c.LOGITS, d.dtype, list(logits.shape), logits.ctypes.data)
        d.session.run_with_iobinding(bind.binding)
        cache.advance(width + 1)
        present = [cache.past(index)[:need].reshape(shape_out) for index in range(len(self.names))]
        return logits, present

    def _on_side(self, tensor: np.ndarray) -> bool:
        """Whether ``tensor`` is a view of the current side's buffers (no reload needed)."""
        base = tensor.base
        return base is not None and any(base is flat or base.base is flat for flat in
                                        (self.cache.past(i) for i in range(len(self.names))))


class SharedBatch:
    """Rows decoding together over an in-place (GroupQueryAttention) cache: the ``Batch``
    interface without padding. Every cache tensor is one buffer of ``capacity`` row slots of
    [kv_heads, max_context, head_dim]; the first ``len(self)`` slots are the rows, in order.
    A step binds the same buffer as past and present, so ONNX Runtime writes each row's new
    position in place; each row's length reaches the graph as the non-zeros of its mask row,
    which holds the row's own 1/2 values (MMCA reads them), then zeros."""

    def __init__(self, decoder: DecoderSession):
        from runtime.backends.ort import FastBinding, runs_on_device

        self.decoder, self.binding = decoder, FastBinding(decoder.session, runs_on_device(decoder.session))
        self.capacity = 0
        self.buffers: list[np.ndarray] = []  # per cache tensor (k0, v0, k1, ...): [cap, H, M, D]
        self.masks = np.zeros((0, decoder.max_context), np.int64)  # [cap, M]: 1/2 cached, 0 after
        self.lengths_ = np.zeros(0, np.int64)  # each row's cached positions

    def __len__(self) -> int:
        return len(self.lengths_)

    @property
    def width(self) -> int:
        return int(self.lengths_.max()) if len(self) else 0

    def lengths(self) -> np.ndarray:
        return self.lengths_.copy()

    def longest(self) -> int:
        return self.width

    def _grow(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        d = self.decoder
        capacity = max(rows, 2 * self.capacity, 1)
        shape = (capacity, d.heads, d.max_context, d.head_dim)
        grown = [np.zeros(shape, d.cache_dtype) for _ in range(2 * d.num_layers)]
        for new, old in zip(grown, self.buffers, strict=False):
            new[:len(self)] = old[:len(self)]
        masks = np.zeros((capacity, d.max_context), np.int64)
        masks[:len(self)] = self.masks[:len(self)]
        self.buffers, self.masks, self.capacity = grown, masks, capacity

    def join(self, seq: Prefilled) -> None:
        if seq.length > self.decoder.max_context:
            raise ValueError(f"{seq.length} positions exceed the context of {self.decoder.max_context}")
        row = len(self)
        self._grow(row + 1)
        tensors = [t for pair in zip(seq.keys, seq.values, strict=True) for t in pair]
        for buffer, tensor in zip(self.buffers, tensors, strict=True):
            buffer[row, :, :seq.length] = tensor[0]
        self.masks[row] = 0
        self.masks[row, :seq.length] = seq.mask
        self.lengths_ = np.append(self.lengths_, seq.length)

    def leave(self, rows: list[int]) -> None:
        keep = np.setdiff1d(np.arange(len(self)), rows)
        for target, source in enumerate(keep):  # shift later rows down, as a list does
            if target != source:
                length = self.lengths_[source]
                for buffer in self.buffers:
                    buffer[target, :, :length] = buffer[source, :, :length]
                self.masks[target] = self.masks[source]
        self.lengths_ = self.lengths_[keep]

    def step(self, embeds: np.ndarray) -> np.ndarray:
        """Feed one token embedding per row ([rows, hidden]); returns logits [rows, vocab]."""
        d, rows = self.decoder, len(self)
        if self.width + 1 > d.max_context:
            raise ValueError(f"a decode step would need {self.width + 1} cached positions, "
                             f"the context holds {d.max_context}")
        total = self.lengths_ + 1
        self.masks[np.arange(rows), self.lengths_] = c.MASK_TEXT  # each row's new position
        if d.full_width_mask:
            mask = self.masks[:rows]  # C-contiguous: the first rows of [capacity, max_context]
        else:
            mask = np.ascontiguousarray(self.masks[:rows, :int(total.max())])
        positions = self.lengths_[:, None].astype(np.int64)
        bind = self.binding
        inputs = (np.ascontiguousarray(convert(embeds[:, None], d.dtype)), mask, positions)
        for name, array in zip((c.INPUTS_EMBEDS, c.ATTENTION_MASK, c.POSITION_IDS), inputs, strict=True):
            bind.input(name, array.dtype, list(array.shape), array.ctypes.data)
        if d.keeps_logits:
            bind.input(c.LOGITS_TO_KEEP, np.int64, [], d.keep_last.ctypes.data)
        shape = [rows, d.heads, d.max_context, d.head_dim]
        names = [name for i in range(d.num_layers) for name in (
            (c.past_key_name(i), c.present_key_name(i)), (c.past_value_name(i), c.present_value_name(i)))]
        for (past, present), buffer in zip(names, self.buffers, strict=True):
            bind.input(past, d.cache_dtype, shape, buffer.ctypes.data)
            bind.output(present, d.cache_dtype, shape, buffer.ctypes.data)
        logits = np.empty((rows, 1, d.vocab), d.dtype)
        bind.output(c.LOGITS, d.dtype, list(logits.shape), logits.ctypes.data)
        d.session.run_with_iobinding(bind.binding)
        self.lengths_ = total
        return convert(logits[:, -1], np.float32)
