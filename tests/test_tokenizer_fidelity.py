"""The exported tokenizer tokenizes exactly as DSVL does (transformers 4.33 + tokenizers 0.13).

Expectations come from outside this package:
- ``tests/data/tokenizers/expected.json``: ids computed by transformers 4.33.3 itself
  (``scripts/make_tokenizer_fixtures.py``) for a LLaMA-2-layout ``tokenizer.json`` and for a
  ``tokenizer.model``-only directory, after DSVL's ``add_special_token``;
- the source ``tokenizer.json`` applied by the `tokenizers` library directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from dsvl.errors import LoadError
from dsvl.tokenizer import load_tokenizer, preset_tokenizer
from runtime.prompt import format_round

DATA = Path(__file__).parent / "data" / "tokenizers"
EXPECTED = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))
DSVL_TOKENS = ["### Image:", "<image>", "<PAD>"]


def direct(tokenizer_json: Path) -> Tokenizer:
    """The source file applied unchanged, plus DSVL's three tokens, with `tokenizers` alone."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in DSVL_TOKENS])
    return tok


def metaspace_layout(tmp_path: Path) -> Path:
    """The same vocabulary in the layout transformers 5 writes (Metaspace, no normalizer)."""
    data = json.loads((DATA / "llama2" / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                             "split": False}
    out = tmp_path / "metaspace"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(DATA / "llama2" / "tokenizer_config.json", out)
    return out


@pytest.mark.parametrize("layout", ["llama2", "spm"])
def test_dsvl_ids_equal_transformers_433(layout):
    expected = EXPECTED[layout]
    tok = load_tokenizer(DATA / layout)
    assert tok.source == ("tokenizer.json" if layout == "llama2" else "tokenizer.model")
    assert len(tok) == expected["vocab_size"] == 603
    assert {t: tok.convert_tokens_to_ids(t) for t in expected["ids"]} == expected["ids"]
    assert tok.pad_token_id == expected["pad_token_id"] == tok.eos_token_id
    for prompt, ids in zip(EXPECTED["prompts"], expected["input_ids"], strict=True):
        assert tok.encode(prompt) == ids, prompt


def test_fixture_prompts_are_our_template():
    """The fixture's prompts (written out independently) are what runtime/prompt.py builds."""
    prompts = EXPECTED["prompts"]
    assert prompts[0] == format_round("What is in the picture?", 1)
    assert prompts[1] == format_round("Compare them.", 2)
    assert prompts[2] == format_round("Eight of them?", 8)
    assert prompts[3] == format_round("And now?", 1, images_before=1, first_round=False)
    assert prompts[4] == format_round("Why?", 0, images_before=2, first_round=False)


def test_llama2_layout_keeps_the_space_after_image_tokens():
    tokens = EXPECTED["llama2"]["tokens"][0]
    at = tokens.index("<image>")
    assert tokens[at + 1:at + 4] == ["▁", "<0x0A>", "<0x0A>"]
    ids = load_tokenizer(DATA / "llama2").encode(EXPECTED["prompts"][0])
    assert ids == EXPECTED["llama2"]["input_ids"][0]


@pytest.mark.parametrize("layout", ["llama2", "metaspace"])
def test_tokenizer_json_is_applied_unchanged(tmp_path, layout):
    source = DATA / "llama2" if layout == "llama2" else metaspace_layout(tmp_path)
    want = direct(source / "tokenizer.json")
    ours = load_tokenizer(source)
    out = tmp_path / "saved"
    ours.save(out)
    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    for prompt in EXPECTED["prompts"]:
        assert ours.encode(prompt) == want.encode(prompt).ids == saved.encode(prompt).ids
    tokens = want.encode(EXPECTED["prompts"][0]).tokens
    after = tokens[tokens.index("<image>") + 1]
    assert after == ("▁" if layout == "llama2" else "<0x0A>")  # each layout keeps its own rule


def test_missing_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(LoadError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoadError, match="tokenizer.json is not a tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 3)
    with pytest.raises(LoadError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_preset_tokenizer_has_llama2_layout():
    tok = preset_tokenizer(1000)
    data = json.loads(tok.backend.to_str())
    assert data["pre_tokenizer"] is None
    assert [n["type"] for n in data["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert tok.source.startswith("preset")
    assert len(tok) == 1003
    assert tok.convert_tokens_to_ids(DSVL_TOKENS) == [1000, 1001, 1002]
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>"]) == [0, 1, 2, 3, 13]
    pieces = tok.backend.encode(format_round("Hi?", 1)).tokens
    at = pieces.index("<image>")
    assert pieces[at + 1:at + 3] == ["▁", "<0x0A>"]
    # byte tokens are plain vocabulary (as in LLaMA), so decoding keeps them
    assert tok.decode(tok.encode("héllo 東京")) == "héllo 東京"


# ------------------------------------------------------------- end to end, through the CLIs
@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> dict[str, Path]:
    """LLaMA directories (weights + each tokenizer layout), as a user downloads them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama-dirs")
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=600))
    with torch.no_grad():  # logits with clear top-1 margins, so greedy parity is meaningful
        model.lm_head.weight.normal_(std=4.0 / 128**0.5)
        model.model.embed_tokens.weight.normal_(std=1.0)
    dirs = {}
    for layout in ("llama2", "spm"):
        dirs[layout] = root / layout
        model.save_pretrained(dirs[layout])
        for file in (DATA / layout).iterdir():
            shutil.copy(file, dirs[layout])
    return dirs


@pytest.mark.parametrize("layout", ["llama2", "spm"])
def test_export_and_generate_give_dsvl_prompt_ids_and_tokens(llama_dirs, tmp_path, capsys, layout):
    from PIL import Image

    from dsvl.generate import generate
    from dsvl.loading import WeightSource, load_model
    from export import all as export_all
    from runtime import generate as runtime_generate
    from runtime.artifacts import open_artifacts
    from runtime.sampling import SamplingOptions

    out = tmp_path / "artifacts"
    assert export_all.main(["--lm-model-name-or-path", str(llama_dirs[layout]), "--vis-proj", "baseline",
                            "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["source"] == ("tokenizer.json" if layout == "llama2" else "tokenizer.model")
    # save_pretrained wrote a generation_config.json without do_sample: DSVL decodes greedily
    assert manifest["decoder"]["generation_defaults"]["source"] == "generation_config.json"
    assert manifest["decoder"]["generation_defaults"]["do_sample"] is False
    images = []
    for i in range(2):
        path = tmp_path / f"image{i}.png"
        Image.new("RGB", (64 + 8 * i, 48), (40 * i, 120, 200 - 50 * i)).save(path)
        images.append(path)
    model, _, _ = load_model(WeightSource(lm_model=llama_dirs[layout], vis_proj="baseline"))
    preprocessor = open_artifacts(out).preprocessor
    for count, question, index in ((1, "What is in the picture?", 0), (2, "Compare them.", 1)):
        capsys.readouterr()
        argv = ["--artifacts", str(out), "--prompt", question, "--max-new-tokens", "12", "--json"]
        for path in images[:count]:
            argv += ["--image", str(path)]
        with pytest.raises(SystemExit) as done:
            runtime_generate.run_cli(lambda argv=argv: runtime_generate.main(argv))
        assert done.value.code == 0
        result = json.loads(capsys.readouterr().out)
        want_ids = EXPECTED[layout]["input_ids"][index]
        assert result["prompt_ids"] == want_ids  # DSVL's ids, the "▁" after <image> included
        pixels = torch.from_numpy(preprocessor(images[:count]))
        ref = generate(model, torch.tensor(want_ids), pixels, SamplingOptions(max_new_tokens=12), eos_token_id=2)
        assert result["generated_ids"] == ref.tokens


def test_saved_tokenizer_loads_unchanged_in_transformers(tmp_path):
    """Users who open the artefact's tokenizer/ with transformers get DSVL's ids too."""
    from transformers import AutoTokenizer

    load_tokenizer(DATA / "llama2").save(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for prompt, ids in zip(EXPECTED["prompts"], EXPECTED["llama2"]["input_ids"], strict=True):
        assert loaded(prompt).input_ids == ids
