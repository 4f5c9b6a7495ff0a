"""Tokenizers: DSVL's additions to LLaMA's, and a LLaMA-like tokenizer for the presets.

No hub is reachable, so presets build their tokenizer here: a byte-fallback BPE with LLaMA's
layout (<unk>=0, <s>=1, </s>=2, 256 byte tokens, merges) trained on a small embedded text and
padded with filler entries to the preset's base vocabulary. DSVL's additions then go through
the same transformers calls as for a real LLaMA tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from runtime.prompt import DSVL_SPECIAL_TOKENS, PAD_TOKEN, SYSTEM_PROMPT

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


def build_preset_tokenizer(base_vocab_size: int) -> PreTrainedTokenizerFast:
    """A LLaMA-layout tokenizer with exactly ``base_vocab_size`` entries (before DSVL's)."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=min(base_vocab_size, 2000), special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    vocab = tok.get_vocab()
    if len(vocab) > base_vocab_size:
        raise ValueError(f"base vocabulary {base_vocab_size} is too small for the preset tokenizer")
    model = tok.model
    merges = _merges(tok)
    filled = dict(vocab)
    for i in range(len(vocab), base_vocab_size):
        filled[f"<extra_{i}>"] = i  # unreachable filler: keeps LLaMA's id layout and size
    tok.model = models.BPE(vocab=filled, merges=merges, unk_token="<unk>", byte_fallback=True,
                           fuse_unk=True)
    del model
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    data = json.loads(tok.to_str())
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]


def add_dsvl_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """DSVL's ``add_special_token`` then ``pad = eos``: ids V, V+1 for its tokens, V+2 for <PAD>."""
    tokenizer.add_tokens(list(DSVL_SPECIAL_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The LLaMA directory's tokenizer with DSVL's additions, as DSVL's chat loads it."""
    return add_dsvl_tokens(AutoTokenizer.from_pretrained(path))


def preset_tokenizer(base_vocab_size: int) -> PreTrainedTokenizerFast:
    return add_dsvl_tokens(build_preset_tokenizer(base_vocab_size))
