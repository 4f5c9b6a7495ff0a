"""DSVL's tokenizer, built exactly as DSVL's transformers 4.33 builds it, with `tokenizers` alone.

Why not transformers: transformers 5 re-serializes a LLaMA-2 ``tokenizer.json`` (Prepend + Replace
normalizer, no pre-tokenizer) as a Metaspace pre-tokenizer that drops the ``▁`` DSVL gets after
every added token (``<image>``, ``▁``, ``<0x0A>``...), so every image prompt came out one token
short. Here the LLaMA directory's tokenizer is taken as 4.33's ``LlamaTokenizerFast`` takes it:

- ``tokenizer.json`` present: loaded unchanged (normalizer, pre-tokenizer, model, decoder, added
  tokens); the post-processor is the one 4.33's ``update_post_processor`` writes from
  ``tokenizer_config.json`` (``add_bos_token``, default on; ``add_eos_token``, default off);
- only ``tokenizer.model``: converted as 4.33's ``LlamaConverter`` does (LLaMA's legacy
  Prepend + Replace normalizer, BPE merges ordered by piece score, byte fallback);
- presets: a small byte-fallback BPE in LLaMA-2's layout, padded to the preset's vocabulary.

Then DSVL's ``add_special_token``: ``### Image:`` (id V) and ``<image>`` (V+1) as special tokens,
``<PAD>`` (V+2) when the tokenizer has no pad token, and ``pad = eos``.
``tests/data/tokenizers`` holds ids computed with transformers 4.33 itself to check all this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from dsvl.errors import LoadError
from runtime.prompt import DSVL_SPECIAL_TOKENS, PAD_TOKEN, SYSTEM_PROMPT

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


@dataclass
class DsvlTokenizer:
    """A ``tokenizers.Tokenizer`` with DSVL's additions, and the few transformers-style calls the
    reference and the exporters use (``tokenizer(text).input_ids``, ``convert_tokens_to_ids``)."""

    backend: Tokenizer
    bos_token: str
    eos_token: str
    pad_token: str
    source: str  # where the base tokenizer came from (recorded in the manifest)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int:
        return self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    def save(self, directory: Path) -> None:
        """``tokenizer.json`` exactly as the runtime must apply it (nothing re-serializes it),
        and a config under which transformers' generic fast tokenizer also applies it as is
        (its LLaMA class would rewrite it, the bug this module exists for)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_JSON))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "clean_up_tokenization_spaces": False, "source": self.source}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- LLaMA directories
def load_tokenizer(path: Path | str) -> DsvlTokenizer:
    """The LLaMA directory's tokenizer with DSVL's additions, as DSVL's chat.py gets it."""
    path = Path(path)
    config = _read_config(path)
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    bos, eos = _token_name(config.get("bos_token"), "<s>"), _token_name(config.get("eos_token"), "</s>")
    if (path / TOKENIZER_JSON).is_file():
        try:
            backend = Tokenizer.from_file(str(path / TOKENIZER_JSON))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise LoadError(f"{path / TOKENIZER_JSON} is not a tokenizer the `tokenizers` library can "
                            f"read ({str(err).splitlines()[0][:160]}); replace it with the model's "
                            f"original file") from None
        source = TOKENIZER_JSON
    elif (path / SPM_MODEL).is_file():
        backend, source = convert_sentencepiece(path / SPM_MODEL), SPM_MODEL
    else:
        raise LoadError(f"--lm-model-name-or-path {path}: no {TOKENIZER_JSON} or {SPM_MODEL}; copy the "
                        f"LLaMA release's tokenizer files into it")
    for name in (bos, eos):
        if backend.token_to_id(name) is None:
            raise LoadError(f"{path}: the tokenizer has no {name!r} token, which tokenizer_config.json "
                            f"names as BOS/EOS; the directory's tokenizer files do not belong together")
    backend.post_processor = _llama_post_processor(backend, bos, eos, add_bos, add_eos)
    return add_dsvl_tokens(backend, bos, eos, _token_name(config.get("pad_token"), None), source)


def _read_config(path: Path) -> dict:
    """tokenizer_config.json, with special_tokens_map.json's entries where the config has none."""
    config: dict = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise LoadError(f"{file} is not valid JSON ({err}); restore the original file") from None
            if isinstance(data, dict):
                config.update({k: v for k, v in data.items() if v is not None or k not in config})
    return config


def _token_name(value, default: str | None) -> str | None:
    if isinstance(value, dict):
        return value.get("content", default)
    return value if isinstance(value, str) else default


def _llama_post_processor(backend: Tokenizer, bos: str, eos: str, add_bos: bool,
                          add_eos: bool) -> processors.TemplateProcessing:
    """4.33's ``LlamaTokenizerFast.update_post_processor``."""
    single = f"{(bos + ':0 ') * add_bos}$A:0{(' ' + eos + ':0') * add_eos}"
    pair = f"{single}{(' ' + bos + ':1') * add_bos} $B:1{(' ' + eos + ':1') * add_eos}"
    specials = [(bos, backend.token_to_id(bos))] * add_bos + [(eos, backend.token_to_id(eos))] * add_eos
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def add_dsvl_tokens(backend: Tokenizer, bos: str, eos: str, pad: str | None,
                    source: str) -> DsvlTokenizer:
    """DSVL's ``add_special_token`` (``add_tokens(..., special_tokens=True)``: special, not
    normalized, no stripping), then ``<PAD>`` if there is no pad token, then ``pad = eos``."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DSVL_SPECIAL_TOKENS])
    if pad is None:
        backend.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    return DsvlTokenizer(backend, bos, eos, eos, source)


def convert_sentencepiece(file: Path) -> Tokenizer:
    """A LLaMA ``tokenizer.model`` as 4.33's ``LlamaConverter`` turns it into a fast tokenizer."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise LoadError(f"{file} is not a SentencePiece model ({err}); restore the original file") from None
    if proto.trainer_spec.model_type != 2 or len(proto.pieces) < 3:
        raise LoadError(f"{file} is not a LLaMA (BPE) SentencePiece model; pass the LLaMA release's "
                        f"tokenizer files")
    vocab_scores = [(name, 0.0) for name in LLAMA_SPECIALS]
    vocab_scores += [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer = Tokenizer(models.BPE({w: i for i, (w, _) in enumerate(vocab_scores)},
                                     _spm_merges(vocab, vocab_scores),
                                     unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                     byte_fallback=True))
    # 0.13's AddedToken(...) defaulted to normalized=True; keep what 4.33 produced.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in LLAMA_SPECIALS])
    tokenizer.normalizer = _llama_normalizer()
    tokenizer.decoder = _llama_decoder()
    return tokenizer


def _spm_merges(vocab: dict[str, int], vocab_scores: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """4.33's ``SentencePieceExtractor.extract(vocab_scores)``: every split of every piece into
    two known pieces, ordered by the piece's score (stable, descending)."""
    merges = []
    for piece, score in dict(vocab_scores).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]


def _llama_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _llama_decoder() -> decoders.Decoder:
    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                              decoders.Strip(" ", 1, 0)])


# ---------------------------------------------------------------- presets
_CORPUS = [
    SYSTEM_PROMPT,
    "### Image 1:\n<image>\n### Question:\nWhat is in the picture?\n\n### Answer:\n",
    "The cat sits on the red mat near the window, and the dog sleeps under the table.",
    "A man is riding a bicycle down a busy street in the city at night.",
    "Describe the image in detail. How many people are there? What colour is the car?",
    "There are two images. Compare them and explain the difference between the first and the second.",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.",
    "Yes, no, maybe. The answer is a large green tree with yellow flowers in a sunny park.",
]
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_preset_tokenizer(base_vocab_size: int) -> Tokenizer:
    """A LLaMA-2-layout tokenizer with exactly ``base_vocab_size`` entries (before DSVL's): <unk>,
    <s>, </s> at 0-2 (added, special), the 256 byte tokens at 3-258 (plain vocabulary, as in
    LLaMA, so decoding keeps them), BPE pieces learned from a small embedded text, then
    unreachable ``<extra_N>`` fillers up to the preset's size."""
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = _llama_normalizer()
    # Words start at "▁"; like SentencePiece with LLaMA's settings, punctuation, digits and
    # newlines stay out of learned pieces (a newline is the byte token <0x0A>, as in LLaMA).
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Punctuation(behavior="isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split("\n", behavior="isolated")])
    head = len(LLAMA_SPECIALS) + len(_BYTE_TOKENS)
    learned_size = min(base_vocab_size - head, 1200)
    if learned_size < 100:
        raise ValueError(f"base vocabulary {base_vocab_size} is too small for the preset tokenizer")
    learner.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=learned_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate([*LLAMA_SPECIALS, *_BYTE_TOKENS])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if "\n" not in token:
            vocab.setdefault(token, len(vocab))
    if len(vocab) > base_vocab_size:
        raise ValueError(f"base vocabulary {base_vocab_size} is too small for the preset tokenizer")
    for i in range(len(vocab), base_vocab_size):
        vocab[f"<extra_{i}>"] = i  # unreachable filler: keeps LLaMA's id layout and size
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    tokenizer.normalizer = _llama_normalizer()
    tokenizer.decoder = _llama_decoder()
    tokenizer.post_processor = _llama_post_processor(tokenizer, "<s>", "</s>", True, False)
    return tokenizer


def write_llama_tokenizer_dir(tokenizer: Tokenizer, directory: Path) -> None:
    """A LLaMA-2-style tokenizer directory (tokenizer.json + tokenizer_config.json), for tests
    and tools that need real files."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_JSON))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "legacy": False}
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def preset_tokenizer(base_vocab_size: int) -> DsvlTokenizer:
    return add_dsvl_tokens(build_preset_tokenizer(base_vocab_size), "<s>", "</s>", None,
                           "preset (LLaMA-2 layout)")
