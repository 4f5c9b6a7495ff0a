"""Write the tokenizer fixtures the tests compare against: DSVL's own tokenization, computed
with the library versions DSVL pins (transformers 4.33, tokenizers 0.13), not with ours.

Run it in a separate environment, never in CI:

    python3 -m venv /tmp/hf433
    /tmp/hf433/bin/pip install "transformers==4.33.3" "tokenizers==0.13.3" sentencepiece protobuf
    /tmp/hf433/bin/python scripts/make_tokenizer_fixtures.py tests/data/tokenizers

It writes two LLaMA directories and the expected ids:
- ``spm/``: only ``tokenizer.model`` (a small byte-fallback BPE SentencePiece model trained here
  with LLaMA's trainer settings) and a LLaMA-2 ``tokenizer_config.json``;
- ``llama2/``: the same model converted by 4.33's ``LlamaTokenizerFast`` and saved, which is
  how the LLaMA-2 releases' ``tokenizer.json`` was made (Prepend + Replace normalizer, no
  pre-tokenizer);
- ``expected.json``: for each directory, DSVL's vocabulary size, special ids and
  ``tokenizer(prompt).input_ids`` for each prompt, after DSVL's ``add_special_token``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

CORPUS = [
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.",
    "### Image 1:\n<image>\n### Question:\nWhat is in the picture?\n\n### Answer:\n",
    "The cat sits on the red mat near the window, and the dog sleeps under the table.",
    "A man is riding a bicycle down a busy street in the city at night.",
    "Describe the image in detail. How many people are there? What colour is the car?",
    "There are two images. Compare them and explain the difference between the first and the second.",
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.",
    "Yes, no, maybe. The answer is a large green tree with yellow flowers in a sunny park.",
]

SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
          "content that the user provides, and assist the user with a variety of tasks using natural "
          "language.\n\n")


def dsvl_round(question: str, images: int, before: int = 0, first: bool = True) -> str:
    """DST.Prompter + chat.py's image numbering, written out independently of runtime/prompt.py."""
    text = ""
    if images:
        text = "### Image:\n<image>\n" * images + "\n"
    text += f"### Question:\n{question}\n\n### Answer:\n"
    if first:
        text = SYSTEM + text
    for n in range(before + 1, before + images + 1):
        text = text.replace("### Image:", f"### Image {n}:", 1)
    return text


PROMPTS = [
    dsvl_round("What is in the picture?", 1),
    dsvl_round("Compare them.", 2),
    dsvl_round("Eight of them?", 8),
    dsvl_round("And now?", 1, before=1, first=False),
    dsvl_round("Why?", 0, before=2, first=False),
    dsvl_round("No image here.", 0),
    "café, naïve, 東京, emoji 😀 and tabs\tand  double  spaces",
    "### Image 1:\n<image>\nraw<image>text ### Image:### Answer:\n",
    " leading space, trailing space ",
    "",
]

LLAMA2_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    "legacy": False, "model_max_length": 1000000000000000019884624838656, "pad_token": None,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    **{name: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
              "rstrip": False, "single_word": False}
       for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))},
}


def train_spm(out: Path) -> None:
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=600,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()


def dsvl_tokenizer(path: Path):
    """chat.py's AutoTokenizer call, then DSVL's add_special_token and pad = eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), fast_tokenizer=True)
    tokenizer.padding_side = "right"
    tokenizer.add_tokens(["### Image:", "<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(out: Path) -> None:
    import transformers

    assert transformers.__version__.startswith("4.33"), "run with DSVL's transformers 4.33"
    spm_dir, llama2_dir = out / "spm", out / "llama2"
    for d in (spm_dir, llama2_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    train_spm(spm_dir)
    (spm_dir / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG, indent=2) + "\n")
    from transformers import LlamaTokenizerFast

    fast = LlamaTokenizerFast.from_pretrained(str(spm_dir), from_slow=True)
    fast._tokenizer.save(str(llama2_dir / "tokenizer.json"))
    (llama2_dir / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG, indent=2) + "\n")
    expected = {"generator": f"transformers {transformers.__version__}", "prompts": PROMPTS}
    for name, path in (("spm", spm_dir), ("llama2", llama2_dir)):
        tok = dsvl_tokenizer(path)
        expected[name] = {
            "fast": type(tok).__name__, "vocab_size": len(tok),
            "ids": {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "### Image:", "<image>", "<PAD>")},
            "pad_token_id": tok.pad_token_id,
            "input_ids": [tok(p).input_ids for p in PROMPTS],
            "tokens": [tok.convert_ids_to_tokens(tok(p).input_ids) for p in PROMPTS[:2]],
        }
    (out / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}: vocab {expected['llama2']['vocab_size']}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/tokenizers"))
