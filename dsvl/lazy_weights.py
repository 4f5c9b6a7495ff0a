"""The LLaMA decoder's weights, one tensor at a time, with the values the eager load gives.

``open_decoder_weights`` reads only configs and file indexes; ``DecoderWeights.get(name)``
materialises one tensor: the DSVL checkpoint's ``lang_decoder.<name>`` if it has one, else the
LLaMA directory's tensor (``lm_head`` tied to ``embed_tokens`` when the config says so and the
directory has none), else a seeded random one; vocabulary-sized tensors are then resized to
DSVL's vocabulary (new rows = mean of the old). An exporter that asks for one tensor at a time
never holds the model, and ``materialize_decoder`` builds the eager ``LlamaDecoder`` from the
same calls, so a streamed export and a traced one have the same weights.

Random weights are drawn per tensor, from a generator seeded with (seed, tensor name), so no
tensor depends on which others were drawn before it and a 7B preset never exists whole.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from transformers import LlamaConfig

from dsvl.decoder import LlamaDecoder, rotary_parameters
from dsvl.errors import LoadError
from dsvl.lazy_files import TensorSource
from dsvl.lazy_sources import open_checkpoint, open_hf_weights
from dsvl.loading import WeightSource, lang_config

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_SIZED = (EMBED, LM_HEAD)
CHECKPOINT_PREFIX = "lang_decoder."
LANG_EMBED = "lang_embed.weight"


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed per (seed, tensor name). zlib.crc32 is stable across runs and platforms
    (Python's ``hash`` of a string is salted per process); 32 bits, because the CPU generator
    (mt19937) keeps only the low 32 bits of its seed."""
    return zlib.crc32(f"{seed}/{name}".encode())


def random_tensor(name: str, shape: Sequence[int], config: LlamaConfig, seed: int) -> torch.Tensor:
    """One seeded random tensor: norms 1, biases 0, embed_tokens N(0, 1), lm_head
    N(0, 4/sqrt(hidden)) so greedy decoding of random weights has clear top-1 margins, every other
    Linear N(0, initializer_range)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name == EMBED:
        std = 1.0
    elif name == LM_HEAD:
        std = 4.0 / config.hidden_size ** 0.5
    else:
        std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def resize_rows(table: torch.Tensor, vocab: int) -> torch.Tensor:
    """DSVL's ``resize_token_embeddings(len(tokenizer))`` on one fp32 table: new rows take the
    mean of the old ones (deterministic; a DSVL checkpoint overrides them anyway)."""
    if vocab <= table.shape[0]:
        return table[:vocab]
    return torch.cat([table, table.mean(0, keepdim=True).expand(vocab - table.shape[0], -1)])


def cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The eager model holds fp32 and casts from there: go through fp32 unless the file's dtype
    is already the one asked for (an exact identity either way)."""
    if value.dtype != dtype:
        value = value.float().to(dtype)
    return value.contiguous()


class DecoderWeights:
    """The decoder's tensors by ``LlamaForCausalLM`` name, each read or drawn when asked for."""

    def __init__(self, config: LlamaConfig, mmca: bool, seed: int, base_vocab: int,
                 lm: Mapping[str, TensorSource], checkpoint: Mapping[str, TensorSource],
                 notes: list[str], resize_note: str | None = None):
        self.config = config
        self.mmca = mmca
        self.seed = seed
        self.base_vocab = base_vocab
        self.notes = notes
        self.resize_note = resize_note  # load_model's note, when the vocabulary was resized
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in LlamaDecoder(config, mmca).state_dict().items()}
        self._shapes = shapes
        self._base_shapes = {k: ((base_vocab, s[1]) if k in VOCAB_SIZED else s) for k, s in shapes.items()}
        self._lm = {k: v for k, v in lm.items() if k in shapes}
        self._checkpoint = {k: v for k, v in checkpoint.items()
                            if k == LANG_EMBED or (k.startswith(CHECKPOINT_PREFIX)
                                                   and k[len(CHECKPOINT_PREFIX):] in shapes)}
        self._tied = LM_HEAD not in self._lm and bool(getattr(config, "tie_word_embeddings", False))

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def resized(self) -> bool:
        return self.base_vocab != self.config.vocab_size

    def names(self) -> list[str]:
        """``LlamaDecoder``'s state-dict names, in its order."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known(name)]

    def layer_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{index}."
        return [name for name in self._shapes if name.startswith(prefix)]

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` read (or drawn) now, as a CPU tensor of ``dtype``."""
        override = self._checkpoint.get(CHECKPOINT_PREFIX + self._known(name))
        return cast(override.load() if override is not None else self._base(name), dtype)

    def layer(self, index: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors by their name inside ``DecoderLayer`` (for assign=True)."""
        prefix = f"model.layers.{index}."
        return {name[len(prefix):]: self.get(name, dtype) for name in self.layer_names(index)}

    def prompt_embedding(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """DSVL's ``lang_embed.weight``: the checkpoint's, else a copy of embed_tokens as the
        LLaMA directory or preset gives it (resized), before any checkpoint override."""
        own = self._checkpoint.get(LANG_EMBED)
        return cast(own.load() if own is not None else self._base(EMBED), dtype)

    def embedding_rows(self, ids: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of embed_tokens [len(ids), hidden], reading only those rows from a file
        when no resizing or drawing is involved."""
        vocab = self.config.vocab_size
        if any(not 0 <= int(i) < vocab for i in ids):
            raise IndexError(f"token ids {list(ids)} outside the vocabulary of {vocab}")
        source = self._checkpoint.get(CHECKPOINT_PREFIX + EMBED)
        if source is None and not self.resized:
            source = self._lm.get(EMBED)
        if source is not None:
            return cast(source.rows([int(i) for i in ids]), dtype)
        return self.get(EMBED, dtype)[list(ids)]

    def _known(self, name: str) -> str:
        if name not in self._shapes:
            raise KeyError(f"{name} is not a tensor of this decoder")
        return name

    def _base(self, name: str) -> torch.Tensor:
        """The value before the checkpoint: the LLaMA directory's or a random one, resized."""
        value = self._unresized(name)
        if name in VOCAB_SIZED and self.resized:
            value = resize_rows(value.float(), self.config.vocab_size)
        return value

    def _unresized(self, name: str) -> torch.Tensor:
        if name == LM_HEAD and self._tied:
            name = EMBED  # the model's lm_head *is* embed_tokens
        source = self._lm.get(name)
        if source is not None:
            return source.load()
        return random_tensor(name, self._base_shapes[name], self.config, self.seed)

    def random_names(self) -> list[str]:
        """Names no file provides (drawn at random)."""
        covered = set(self._lm) | {k.removeprefix(CHECKPOINT_PREFIX) for k in self._checkpoint}
        if self._tied and EMBED in self._lm:
            covered.add(LM_HEAD)
        return [name for name in self._shapes if name not in covered]


def open_decoder_weights(src: WeightSource, vocab_size: int,
                         checkpoint: Mapping[str, TensorSource] | None = None) -> DecoderWeights:
    """The decoder of ``src`` with DSVL's vocabulary (``len(tokenizer)``), nothing read yet but
    configs and file indexes. Shapes are checked here, so errors come before any export work.
    ``checkpoint``: the DSVL checkpoint already opened with ``open_checkpoint`` (else it is
    opened from ``src.checkpoint``)."""
    config = lang_config(src, vocab_size)
    base_vocab = config.vocab_size
    config.vocab_size = vocab_size
    lm = open_hf_weights(src.lm_model) if src.lm_model is not None else {}
    if checkpoint is None:
        checkpoint = open_checkpoint(src.checkpoint) if src.checkpoint is not None else {}
    resize_note = None
    if src.lm_model is not None and base_vocab != vocab_size:
        resize_note = (f"vocabulary resized from {base_vocab} to {vocab_size} for DSVL's tokens "
                       "(### Image:, <image>, <PAD>), as DSVL's resize_token_embeddings does")
    weights = DecoderWeights(config, src.enable_mmca_attention, src.seed, base_vocab, lm,
                             checkpoint, [], resize_note)
    _check_shapes(lm, weights._base_shapes, "")
    _check_shapes({k: v for k, v in checkpoint.items() if k == LANG_EMBED}, {LANG_EMBED: weights.shape(EMBED)}, "")
    _check_shapes({k[len(CHECKPOINT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(CHECKPOINT_PREFIX)},
                  weights._shapes, CHECKPOINT_PREFIX)
    weights.notes.extend(_notes(weights, src, LANG_EMBED in checkpoint))
    return weights


def _check_shapes(sources: Mapping[str, TensorSource], shapes: Mapping[str, tuple[int, ...]],
                  prefix: str) -> None:
    for name, source in sources.items():
        if name in shapes and tuple(source.shape) != tuple(shapes[name]):
            raise LoadError(f"checkpoint key {prefix}{name} has shape {tuple(source.shape)} but the model "
                            f"expects {tuple(shapes[name])}: the checkpoint does not fit these configs")


def _notes(weights: DecoderWeights, src: WeightSource, has_lang_embed: bool) -> list[str]:
    notes = [weights.resize_note] if weights.resize_note else []
    drawn = weights.random_names()
    if len(drawn) == len(weights.names()):
        notes.append(f"decoder: every tensor is seeded RANDOM (seed {src.seed}, drawn per tensor)")
    elif drawn:
        notes.append(f"decoder: {len(drawn)} tensors are in no weight file and are seeded RANDOM "
                     f"(first: {drawn[0]})")
    if not has_lang_embed:
        notes.append("lang_embed (the prompt's embedding table) is a copy of embed_tokens "
                     "(no lang_embed.weight in a checkpoint)")
    return notes


def materialize_decoder(weights: DecoderWeights, dtype: torch.dtype = torch.float32) -> LlamaDecoder:
    """The eager ``LlamaDecoder``: built on the meta device, then filled one tensor at a time
    (``assign=True``), so building it costs the model once, not twice."""
    with torch.device("meta"):
        decoder = LlamaDecoder(weights.config, weights.mmca)
    for name in weights.names():
        decoder.load_state_dict({name: weights.get(name, dtype)}, strict=False, assign=True)
    decoder.inv_freq, _ = rotary_parameters(weights.config)
    left = [name for name, t in decoder.state_dict(keep_vars=True).items() if t.is_meta]
    if left:  # a bug, not a user error: every name was assigned above
        raise RuntimeError(f"materialize_decoder left {left[:3]} on the meta device")
    return decoder.eval()
