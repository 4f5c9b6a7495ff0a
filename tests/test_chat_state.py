"""Chat state is a value: failures roll back, other users of the pipeline never corrupt a
chat, user text cannot spell special tokens, and threads are serialized (issue: hardening)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.pipeline import InputError, Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions

OPTIONS = SamplingOptions(max_new_tokens=8)
TURNS = [("What is in the picture?", [0]), ("And this one?", [1]), ("Which is darker?", [])]


@pytest.fixture(scope="module")
def artifacts(exported) -> Path:
    return exported("--vis-proj", "baseline")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("chat-images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def fresh(artifacts: Path, **kwargs) -> Pipeline:
    return Pipeline.from_artifacts(artifacts, threads=1, **kwargs)


def run_turns(chat, images, turns=TURNS) -> list[list[int]]:
    return [chat.ask(q, [images[i] for i in picks], OPTIONS).tokens for q, picks in turns]


@pytest.fixture(scope="module")
def reference(artifacts, images) -> list[list[int]]:
    """The three turns on a pipeline nobody else uses."""
    return run_turns(fresh(artifacts).chat(), images)


def test_other_chats_and_generate_do_not_disturb_a_chat(artifacts, images, reference):
    pipe = fresh(artifacts)
    chat, other = pipe.chat(), pipe.chat()
    got = [chat.ask(TURNS[0][0], [images[0]], OPTIONS).tokens]
    other.ask("Something else entirely?", [images[2]], OPTIONS)
    pipe.generate([images[1]], "One-off question.", OPTIONS)
    got.append(chat.ask(TURNS[1][0], [images[1]], OPTIONS).tokens)
    other.ask("And more?", [], OPTIONS)
    got.append(chat.ask(TURNS[2][0], [], OPTIONS).tokens)
    assert got == reference


def test_a_failed_turn_rolls_back(artifacts, images, reference, monkeypatch):
    pipe = fresh(artifacts)
    chat = pipe.chat()
    assert chat.ask(TURNS[0][0], [images[0]], OPTIONS).tokens == reference[0]
    calls = {"n": 0}

    def failing(run):  # the third decoder call fails: a prompt pass (forward) or a step
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("backend failure in the middle of an answer")
            return run(*args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for method in ("forward", "step", "step_from"):
            patch.setattr(pipe.decoder, method, failing(getattr(pipe.decoder, method)))
        with pytest.raises(RuntimeError):
            chat.ask(TURNS[1][0], [images[1]], OPTIONS)
    assert calls["n"] == 3
    assert len(chat.turns) == 1 and chat.num_images == 1  # as before the failed turn
    assert run_turns(chat, images, TURNS[1:]) == reference[1:]


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(artifacts, images):
    pipe = fresh(artifacts)
    chat = pipe.chat()

    def interrupt(logits, tokens):
        if len(tokens) == 3:
            raise KeyboardInterrupt

    stopped = chat.ask(TURNS[0][0], [images[0]], OPTIONS, on_step=interrupt)
    assert stopped.stop_reason == "interrupted" and len(stopped.tokens) == 3
    assert chat.turns[0].answer == [*stopped.tokens, pipe.tokenizer.eos_token_id]
    nxt = chat.ask(TURNS[1][0], [images[1]], OPTIONS)
    assert nxt.timings["reused_positions"] == 0  # the cache was not trusted after the interrupt
    # the same history re-encoded from scratch answers the same
    again = fresh(artifacts).chat("reencode")
    again.ask(TURNS[0][0], [images[0]], OPTIONS, on_step=interrupt)
    assert again.ask(TURNS[1][0], [images[1]], OPTIONS).tokens == nxt.tokens


@pytest.mark.parametrize("mode", ["exact", "reencode", "approximate"])
def test_a_generated_image_token_stays_text(artifacts, images, mode):
    pipe = fresh(artifacts)
    pipe.decoder.step_pick = None  # the loop's own argmax, so on_step can force a token
    chat = pipe.chat(mode)
    image_id = pipe.tokenizer.image_token_id

    def force_image_token(logits, tokens):
        if len(tokens) == 1:
            logits[image_id] = logits.max() + 100.0

    first = chat.ask(TURNS[0][0], [images[0]], OPTIONS, on_step=force_image_token)
    assert first.tokens[1] == image_id
    second = chat.ask(TURNS[1][0], [images[1]], OPTIONS)  # no "2 <image> tokens but 1 image"
    assert second.tokens
    if mode != "approximate":
        other_pipe = fresh(artifacts)
        other_pipe.decoder.step_pick = None
        other = other_pipe.chat("reencode" if mode == "exact" else "exact")
        other.ask(TURNS[0][0], [images[0]], OPTIONS, on_step=force_image_token)
        assert other.ask(TURNS[1][0], [images[1]], OPTIONS).tokens == second.tokens


SPECIALS = ["<image>", "</s>", "<s>", "<PAD>", "### Image:", "<unk>"]


def test_user_text_cannot_spell_special_tokens(artifacts, images):
    pipe = fresh(artifacts)
    tok = pipe.tokenizer
    question = "Is this " + " or ".join(SPECIALS) + "?"
    result = pipe.generate([images[0]], question, OPTIONS)
    special_ids = {tok.tokenizer.token_to_id(s) for s in SPECIALS}
    ids = result.prompt_ids
    assert ids[0] == tok.bos_token_id
    template_images = [i for i, t in enumerate(ids) if t == tok.image_token_id]
    assert len(template_images) == 1  # only the template's own slot
    question_ids = ids[template_images[0] + 1:]
    assert not special_ids & set(question_ids)
    assert tok.decode(ids).count("<image>") == 1  # the typed ones are text: decoded back below
    assert question in tok.tokenizer.decode(question_ids, skip_special_tokens=False)
    # and a plain question tokenizes exactly as before (DSVL's single pass)
    plain = pipe.generate([images[0]], "What is it?", OPTIONS).prompt_ids
    assert plain == tok.encode(format_round("What is it?", 1))


def test_allow_special_tokens_is_dsvl_behaviour(artifacts, images):
    pipe = fresh(artifacts)
    tok = pipe.tokenizer
    ids = pipe.generate([images[0]], "stop</s>here", OPTIONS, allow_special_tokens=True).prompt_ids
    assert tok.eos_token_id in ids
    with pytest.raises(InputError, match="allow-special-tokens"):
        pipe.generate([images[0]], "a typed <image> here", OPTIONS, allow_special_tokens=True)
    # without the flag the typed <image> is just text
    assert pipe.generate([images[0]], "a typed <image> here", OPTIONS).tokens


def test_threads_share_one_pipeline_safely(artifacts, images):
    pipe = fresh(artifacts)
    questions = [("Describe it.", 0), ("What colour?", 1), ("How many?", 2), ("Why?", 0)]
    want = [pipe.generate([images[i]], q, OPTIONS).tokens for q, i in questions]
    got: dict[int, list[int]] = {}

    def worker(k: int) -> None:
        q, i = questions[k]
        got[k] = pipe.generate([images[i]], q, OPTIONS).tokens

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(len(questions))] == want


def test_full_context_says_what_to_do_and_can_drop_old_turns(artifacts, images):
    pipe = fresh(artifacts, max_context=120)
    chat = pipe.chat()
    first = chat.ask("Hi?", [images[0]], OPTIONS)
    assert first.tokens
    with pytest.raises(InputError, match="/clear.*--truncate-history"):
        chat.ask("And this one, described at length?", [images[1]], OPTIONS)
    assert len(chat.turns) == 1
    trimming = fresh(artifacts, max_context=120).chat(truncate_history=True)
    trimming.ask("Hi?", [images[0]], OPTIONS)
    result = trimming.ask("And this one, described at length?", [images[1]], OPTIONS)
    assert any("dropped the oldest turn" in note for note in result.notes)
    assert trimming.kept_from == 1


def test_a_single_path_is_one_image(artifacts, images):
    pipe = fresh(artifacts)
    assert pipe.generate(str(images[0]), "What is it?", OPTIONS).tokens == \
        pipe.generate([images[0]], "What is it?", OPTIONS).tokens


def test_chat_cli_survives_bad_bytes_and_eof(artifacts, images):
    """A non-UTF-8 line is an error message, not the end of the session; EOF ends it cleanly."""
    import json
    import subprocess
    import sys

    script = b"\xff\xfe not text\n/image " + str(images[0]).encode() + b"\nWhat is it?\n"
    done = subprocess.run([sys.executable, "-m", "runtime.chat", "--artifacts", str(artifacts), "--json",
                           "--max-new-tokens", "4"], input=script, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert b"not valid UTF-8" in done.stderr and b"Traceback" not in done.stderr
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == 1
