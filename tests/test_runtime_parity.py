"""The ONNX Runtime pipeline (runtime/, no torch) against the PyTorch reference (dsvl/).

fp32 parity is token-exact free generation (docs: DESIGN "How to compare"): greedy ids from
``runtime.pipeline.Pipeline`` on ort-cpu equal ``dsvl.generate.generate`` on the same weights
(the export's seeded preset, reloaded) and the same pixels (the runtime's own preprocessor).
Each artefact directory is exported once per session, in-process, and shared by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsvl.generate import generate, position_ids_for
from dsvl.loading import WeightSource, load_model
from runtime.conversation import history_tokens
from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions

NEW_TOKENS = 32
PROMPT_LOGITS_REL_TOL = 1e-4

# name -> (vis_proj, mmca, own lang_embed, decoder graph flags): every projector, MMCA on and off.
# "own lang_embed" is a DSVL checkpoint whose prompt table differs from the decoder's embed_tokens
# (as after DSVL's training), so the test sees which table embeds the prompt and which the
# generated tokens. No graph flags: the default fused graph with the in-place cache (MMCA too).
STANDARD = ("--decoder-graph", "standard")  # plain ONNX ops, concat cache: the TensorRT graph
EXPORTS = {
    "perceiver": ("perceiver", False, False, ()),
    "perceiver-mmca": ("perceiver", True, False, ()),
    "baseline-mmca": ("baseline", True, False, ()),
    "vit": ("vit", False, False, ()),
    "baseline-checkpoint": ("baseline", False, True, ()),
    # the other decoder graphs: fused with a concat cache, standard ops, the PyTorch tracer
    "perceiver-fused-concat": ("perceiver", False, False, ("--kv-cache", "concat")),
    "perceiver-mmca-fused-concat": ("perceiver", True, False, ("--kv-cache", "concat")),
    "perceiver-standard": ("perceiver", False, False, STANDARD),
    "perceiver-mmca-standard": ("perceiver", True, False, STANDARD),
    "perceiver-traced": ("perceiver", False, False, ("--decoder-graph", "traced")),
    # the rest of the own-lang_embed grid, for DSVL's multi-turn chat
    "baseline-mmca-checkpoint": ("baseline", True, True, ()),
    "vit-checkpoint": ("vit", False, True, ()),
    "vit-mmca-checkpoint": ("vit", True, True, ()),
    "perceiver-checkpoint": ("perceiver", False, True, ()),
    "perceiver-mmca-checkpoint": ("perceiver", True, True, ()),
}
CHECKPOINT_EXPORTS = [name for name, spec in EXPORTS.items() if spec[2]]
QUESTION = "Describe the image in detail."


class Exports:
    """Artefact dirs (exported on first use), reference models and pipelines, one per name."""

    def __init__(self, exported, tmp_path_factory):
        self.exported, self.tmp_path_factory = exported, tmp_path_factory
        self.models: dict[str, tuple] = {}
        self.pipes: dict[str, Pipeline] = {}

    def checkpoint(self, vis_proj: str) -> Path:
        """A DSVL ``pytorch_model.bin`` (the whole state dict) with a trained-looking lang_embed."""
        path = self.tmp_path_factory.getbasetemp() / f"dsvl-checkpoint-{vis_proj}" / "pytorch_model.bin"
        if not path.exists():
            model, _, _ = load_model(WeightSource(vis_proj=vis_proj, seed=5))
            state = model.state_dict()
            noise = torch.randn(state["lang_embed.weight"].shape, generator=torch.Generator().manual_seed(6))
            state["lang_embed.weight"] = state["lang_embed.weight"] + 0.5 * noise
            path.parent.mkdir()
            torch.save(state, path)
        return path

    def source(self, name: str) -> tuple[WeightSource, tuple[str, ...]]:
        """The WeightSource and the equivalent export.all flags."""
        vis_proj, mmca, own_table, graph_flags = EXPORTS[name]
        checkpoint = self.checkpoint(vis_proj) if own_table else None
        flags = ("--vis-proj", vis_proj) + (("--enable-mmca-attention",) if mmca else ())
        flags += graph_flags
        flags += ("--checkpoint-path", str(checkpoint)) if checkpoint else ()
        return WeightSource(vis_proj=vis_proj, enable_mmca_attention=mmca, checkpoint=checkpoint), flags

    def dir(self, name: str) -> Path:
        return self.exported(*self.source(name)[1])

    def reference(self, name: str):
        """(model, tokenizer) loaded from the same WeightSource the export used."""
        if name not in self.models:
            model, tokenizer, _ = load_model(self.source(name)[0])
            self.models[name] = (model, tokenizer)
        return self.models[name]

    def pipe(self, name: str) -> Pipeline:
        if name not in self.pipes:
            self.pipes[name] = Pipeline.from_artifacts(self.dir(name), threads=2)
        return self.pipes[name]


@pytest.fixture(scope="session")
def exports(exported, tmp_path_factory) -> Exports:
    return Exports(exported, tmp_path_factory)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Three different PNGs of different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("parity-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (90, 50), (56, 56)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= 3 + i  # some structure, different per image
        path = root / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def reference_generate(exports: Exports, name: str, images: list[Path], prompt_ids: list[int],
                       cfg: SamplingOptions, eos_token_id: int):
    model, _ = exports.reference(name)
    pixels = torch.from_numpy(exports.pipe(name).artifacts.preprocessor(images)) if images else None
    return generate(model, torch.tensor(prompt_ids), pixels, cfg, eos_token_id=eos_token_id)


CASES = [(name, n) for name in EXPORTS for n in (1, 2)
         if name == "baseline-checkpoint" and n == 2 or name not in CHECKPOINT_EXPORTS]


@pytest.mark.parametrize(("name", "num_images"), CASES, ids=[f"{n}-{k}img" for n, k in CASES])
def test_greedy_tokens_and_prompt_logits_match_pytorch(exports, images, name, num_images, record_property):
    pipe = exports.pipe(name)
    model, tokenizer = exports.reference(name)
    eos = tokenizer.eos_token_id
    used = [images[1]] if num_images == 1 else images[:2]
    result = pipe.generate(used, QUESTION, SamplingOptions(max_new_tokens=NEW_TOKENS))
    ids = tokenizer(format_round(QUESTION, num_images)).input_ids
    assert result.prompt_ids == ids
    ref = reference_generate(exports, name, used, ids, SamplingOptions(max_new_tokens=NEW_TOKENS), eos)
    assert result.tokens == ref.tokens, f"ORT {result.tokens}\nPyTorch {ref.tokens}"
    # The inputs are chosen so that no case stops at EOS early: all 32 tokens are compared.
    assert len(ref.tokens) == NEW_TOKENS and result.stop_reason == "max_new_tokens", ref.tokens

    # The prompt pass: all positions' logits, ORT vs PyTorch.
    embeds, mask = pipe.splice(ids, pipe.encode_images(used))
    pipe.reset()
    logits = pipe.decoder.forward(embeds, mask, position_ids_for(torch.from_numpy(mask)).numpy(),
                                  all_logits=True)
    want = ref.prompt_logits.numpy()
    assert logits.shape == want.shape
    rel = float(np.abs(logits - want).max() / np.abs(want).max())
    record_property("prompt_logits_rel_err", rel)
    record_property("tokens_compared", len(ref.tokens))
    print(f"\n{name} {num_images} image(s): {len(ref.tokens)} tokens equal, prompt logits "
          f"({want.shape[0]} positions) max rel err {rel:.2e}")
    assert rel <= PROMPT_LOGITS_REL_TOL


@pytest.mark.parametrize("mode", ["exact", "approximate"])
@pytest.mark.parametrize("name", ["perceiver", "perceiver-mmca", "perceiver-standard"])
def test_chat_kv_reuse_equals_reencode(exports, images, name, mode):
    """Images only in the first turn and lang_embed == embed_tokens: every mode gives DSVL's
    tokens, and the reusing modes run only each turn's new positions."""
    pipe = exports.pipe(name)
    turns = [("What is in the picture?", images[:1]), ("Describe it in more detail.", []),
             ("What colour is the car?", [])]
    options = SamplingOptions(max_new_tokens=12)
    tokens_per_image = pipe.artifacts.vision.image_tokens
    reuse, reencode = pipe.chat(mode), None
    reuse_out = []
    for i, (question, imgs) in enumerate(turns):
        cached_before = pipe.decoder.past_length
        result = reuse.ask(question, imgs, options)
        reuse_out.append(result.tokens)
        # the cache holds DSVL's whole sequence, images spliced in, up to the last fed token
        spliced = len(reuse.history) + len(reuse.image_embeds) * (tokens_per_image - 1)
        assert pipe.decoder.past_length == spliced - 1 - (result.stop_reason != "eos")
        if i:  # everything cached was reused: only the unfed answer tail and the new round ran
            assert result.timings["reused_positions"] == cached_before
    reencode = pipe.chat("reencode")
    reencode_out = [reencode.ask(question, imgs, options).tokens for question, imgs in turns]
    assert reuse_out == reencode_out
    assert reuse.history == reencode.history
    tok = pipe.tokenizer
    # DSVL's history: each round's prompt ids then the answer without BOS/EOS, plus one EOS
    expected = []
    for i, (question, imgs) in enumerate(turns):
        expected += tok.encode(format_round(question, len(imgs), 0 if i == 0 else 1, first_round=i == 0))
        expected += history_tokens(reuse_out[i], tok.bos_token_id, tok.eos_token_id)
    assert reuse.history == expected
    assert expected.count(tok.bos_token_id) >= 3  # a BOS mid-sequence each round, as in DSVL


CHAT_TURNS = [("What is in the picture?", [0]), ("And this one? Compare them.", [1]),
              ("Which one is brighter?", []), ("Now the third.", [2])]


def ask_with_first_logits(chat, question: str, images: list, options: SamplingOptions):
    """A chat turn and its first answer token's logits (teacher-forced comparisons)."""
    seen: list[np.ndarray] = []
    result = chat.ask(question, images, options,
                      on_step=lambda logits, tokens: None if tokens else seen.append(logits.copy()))
    return result, seen[0]


@pytest.mark.parametrize("name", CHECKPOINT_EXPORTS)
def test_default_chat_answers_like_dsvl_turn_after_turn(exports, images, name, capsys):
    """DSVL's chat.py on a trained-like checkpoint (lang_embed != embed_tokens), with images
    added in later turns: each turn's tokens equal the PyTorch reference run on DSVL's whole
    re-encoded conversation (history ids + new round, every image, paired in reverse)."""
    pipe = exports.pipe(name)
    tok = pipe.tokenizer
    chat = pipe.chat()  # the default: exact
    approximate = Pipeline.from_artifacts(exports.dir(name), threads=2).chat("approximate")
    options = SamplingOptions(max_new_tokens=10)
    history, used, mmca = [], [], pipe.artifacts.mmca
    for turn, (question, picks) in enumerate(CHAT_TURNS):
        new = [images[i] for i in picks]
        _, approx_first = ask_with_first_logits(approximate, question, new, options)
        cached_before = pipe.decoder.past_length if turn else 0
        result, exact_first = ask_with_first_logits(chat, question, new, options)
        ids = history + tok.encode(format_round(question, len(new), len(used), first_round=turn == 0))
        used += new
        assert result.prompt_ids == ids  # the full re-encoded ids, as chat.py builds them
        ref = reference_generate(exports, name, used, ids, SamplingOptions(max_new_tokens=10), tok.eos_token_id)
        assert result.tokens == ref.tokens, f"turn {turn + 1}: ORT {result.tokens}\nPyTorch {ref.tokens}"
        # teacher-forced view of the same: the first answer token's logits
        want = ref.prompt_logits[-1].numpy()
        scale = np.abs(want).max()
        assert np.abs(exact_first - want).max() <= PROMPT_LOGITS_REL_TOL * scale
        if turn:  # the approximate mode fails this same check from turn 2 on
            assert np.abs(approx_first - want).max() > PROMPT_LOGITS_REL_TOL * scale
        history = ids + history_tokens(result.tokens, tok.bos_token_id, tok.eos_token_id)
        assert chat.history == history
        reused = result.timings["reused_positions"]
        if turn == 0:
            assert reused == 0
        elif new and mmca:  # new images change MMCA's rows before the first image
            assert reused == 0
        elif new:  # DSVL re-pairs the images: recompute from the first image slot
            first_slot = ids.index(tok.image_token_id)
            assert 0 < reused <= first_slot
        else:  # the previous answer re-runs through lang_embed; the prompt before it is kept
            previous_answer = len(ids) - len(tok.encode(format_round(question, 0, 1, first_round=False)))
            assert 0 < reused < cached_before
            assert reused <= previous_answer + (len(used) * (pipe.artifacts.vision.image_tokens - 1))


def test_chat_json_prints_one_object_per_turn(exports, images):
    """`runtime.chat --json` driven from stdin: one object per turn with generate's fields."""
    import subprocess
    import sys

    name = "baseline-mmca-checkpoint"
    script = f"/image {images[0]}\nWhat is in the picture?\n/image {images[1]}\nCompare them.\n"
    done = subprocess.run([sys.executable, "-m", "runtime.chat", "--artifacts", str(exports.dir(name)),
                           "--json", "--max-new-tokens", "6"], input=script, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    turns = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(turns) == 2
    for turn in turns:
        assert set(turn) >= {"prompt_ids", "generated_ids", "text", "stop_reason", "backend", "timings"}
    pipe = exports.pipe(name)
    chat = pipe.chat()
    first = chat.ask("What is in the picture?", [images[0]], SamplingOptions(max_new_tokens=6))
    second = chat.ask("Compare them.", [images[1]], SamplingOptions(max_new_tokens=6))
    assert [t["generated_ids"] for t in turns] == [first.tokens, second.tokens]
    assert turns[1]["prompt_ids"] == second.prompt_ids


def test_chat_reencode_equals_reference_prompt(exports, images):
    """Re-encode mode's third turn is the reference run on the whole history."""
    name = "perceiver-mmca"
    pipe = exports.pipe(name)
    chat = pipe.chat("reencode")
    options = SamplingOptions(max_new_tokens=8)
    chat.ask("What is in the picture?", images[:1], options)
    chat.ask("And the colours?", [], options)
    ids = chat.history + pipe.tokenizer.encode(format_round("Why?", 0, 1, first_round=False))
    last = chat.ask("Why?", [], options)
    ref = reference_generate(exports, name, images[:1], ids,
                             SamplingOptions(max_new_tokens=8), pipe.tokenizer.eos_token_id)
    assert last.tokens == ref.tokens


PROMPTS = [
    format_round("What is in the picture?", 1),
    format_round("Compare them.", 2),
    format_round("Eight of them?", 8),
    format_round("No image here.", 0),
    format_round("And now?", 1, images_before=1, first_round=False),
    "café, naïve, 東京, emoji 😀 and tabs\tand  double  spaces",
    "### Image 1:\n<image>\nraw<image>text ### Image:### Answer:\n",
    "",
]


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_runtime_tokenizer_matches_reference(exports, index):
    pipe = exports.pipe("perceiver")
    _, reference = exports.reference("perceiver")
    text = PROMPTS[index]
    ids = pipe.tokenizer.encode(text)
    assert ids == reference(text).input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_runtime_splice_equals_dsvl_splice(exports, images):
    pipe = exports.pipe("perceiver")
    model, tokenizer = exports.reference("perceiver")
    ids = tokenizer(format_round("Compare them.", 2)).input_ids
    image_embeds = pipe.encode_images(images[:2])
    assert not np.array_equal(image_embeds[0], image_embeds[1])
    embeds, mask = pipe.splice(ids, image_embeds)
    want_embeds, want_mask = model.splice(torch.tensor(ids), torch.from_numpy(image_embeds))
    assert embeds.shape == tuple(want_embeds.shape) == (1, len(ids) - 2 + 2 * 256, 128)
    assert np.array_equal(embeds, want_embeds.numpy())
    assert np.array_equal(mask, want_mask.numpy())
    # DSVL pairs the first image with the last <image>
    first = ids.index(pipe.tokenizer.image_token_id)
    assert np.array_equal(embeds[0, first:first + 256], image_embeds[1])
    # the image embeddings themselves match PyTorch's vision tower on the same pixels
    pixels = torch.from_numpy(pipe.artifacts.preprocessor(images[:2]))
    want_images = model.encode_images(pixels).numpy()
    assert np.abs(image_embeds - want_images).max() <= 1e-4 * np.abs(want_images).max()


# ------------------------------------------------------------------ sampling
def sample(pipe: Pipeline, image, **options) -> list[int]:
    options.setdefault("max_new_tokens", 16)
    return pipe.generate([image], QUESTION, SamplingOptions(**options)).tokens


def test_sampling_with_a_seed_is_reproducible(exports, images):
    pipe = exports.pipe("perceiver-mmca")
    first = sample(pipe, images[0], do_sample=True, seed=11, temperature=1.5)
    assert sample(pipe, images[0], do_sample=True, seed=11, temperature=1.5) == first
    others = [sample(pipe, images[0], do_sample=True, seed=s, temperature=1.5) for s in (12, 13, 14)]
    assert any(o != first for o in others), "different seeds gave the same tokens every time"


def test_top_k_one_sampling_equals_greedy(exports, images):
    pipe = exports.pipe("perceiver-mmca")
    greedy = sample(pipe, images[0])
    assert sample(pipe, images[0], do_sample=True, top_k=1, seed=3, temperature=0.7) == greedy
    assert sample(pipe, images[0], do_sample=True, top_p=1e-6, seed=4) == greedy


def test_repetition_penalty_changes_repetitive_output_like_reference(exports):
    name = "perceiver-mmca"
    pipe = exports.pipe(name)
    # On this random model and image, greedy decoding falls into a loop (a cycle of 14 tokens).
    noise = np.random.default_rng(7).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    greedy = sample(pipe, noise, max_new_tokens=NEW_TOKENS)
    assert len(set(greedy)) < len(greedy) * 3 / 4, f"expected a repetitive greedy output: {greedy}"
    penalised = sample(pipe, noise, max_new_tokens=NEW_TOKENS, repetition_penalty=1.3)
    assert penalised != greedy
    assert len(set(penalised)) > len(set(greedy))
    # and the penalty is the reference's: greedy with penalty is token-exact against PyTorch
    ids = pipe.tokenizer.encode(format_round(QUESTION, 1))
    model, _ = exports.reference(name)
    pixels = torch.from_numpy(pipe.artifacts.preprocessor([noise]))
    for penalty, want in ((1.0, greedy), (1.3, penalised)):
        ref = generate(model, torch.tensor(ids), pixels, SamplingOptions(
            max_new_tokens=NEW_TOKENS, repetition_penalty=penalty),
            eos_token_id=pipe.tokenizer.eos_token_id)
        assert ref.tokens == want, penalty


def test_checkpoint_export_keeps_both_embedding_tables(exports):
    """With a DSVL checkpoint, lang_embed (prompt) and embed_tokens (generated) differ and the
    artefacts carry each one unchanged."""
    pipe = exports.pipe("baseline-checkpoint")
    model, _ = exports.reference("baseline-checkpoint")
    prompt_table = np.asarray(pipe.artifacts.prompt_embeddings)
    decoder_table = np.asarray(pipe.artifacts.decoder_embeddings)
    assert not np.allclose(prompt_table, decoder_table)
    assert np.array_equal(prompt_table, model.lang_embed.weight.detach().numpy())
    assert np.array_equal(decoder_table, model.lang_decoder.model.embed_tokens.weight.detach().numpy())
    assert pipe.artifacts.decoder.random_weights is False
