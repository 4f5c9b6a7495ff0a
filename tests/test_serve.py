"""The OpenAI-compatible server, driven by the official ``openai`` client on 127.0.0.1 as a real
client would: answers equal the runtime's, every limit and error has its status and error
object, concurrent clients are batched and answered correctly, a client that leaves cancels
its generation, and the server still answers after all the bad input. One server per module,
tiny preset, few tokens; no timing assertions (waits are bounded polls)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette", "openai", "httpx", "prometheus_client"):
    pytest.importorskip(_module, reason=f"the server tests need {_module}: pip install -e '.[serve]'")

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from runtime.pipeline import Pipeline  # noqa: E402
from runtime.sampling import SamplingOptions  # noqa: E402
from runtime.serve.app import ServerConfig, create_app  # noqa: E402
from runtime.serve.messages import ImageLimits  # noqa: E402

NEW = 10  # completion tokens per test request


@pytest.fixture(scope="module")
def artifacts(exported) -> Path:
    return exported("--vis-proj", "baseline")  # shared with tests/test_chat_state.py


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local-images")
    Image.fromarray(picture(7)).save(root / "allowed.png")
    return root


@pytest.fixture(scope="module")
def server(artifacts, local_dir):
    limits = ImageLimits(max_bytes=100_000, max_pixels=1_000_000, max_aspect=20.0, local_root=local_dir)
    config = ServerConfig(artifacts, threads=2, model_name="dsvl-tiny", max_batch=8, max_queue=16,
                          max_body_bytes=1 << 20, max_tokens=NEW, images=limits)
    app = create_app(config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (uv.started and app.state.dsvl.server) and time.monotonic() < deadline:
        assert thread.is_alive() and not app.state.dsvl.load_error, app.state.dsvl.load_error
        time.sleep(0.1)
    assert app.state.dsvl.server is not None, "the server did not load in 120 s"
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", state=app.state.dsvl,
                          engine=app.state.dsvl.server.engine)
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(artifacts) -> Pipeline:
    return Pipeline.from_artifacts(artifacts, threads=1)


def picture(seed: int, size=(48, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def decoded(seed: int) -> Image.Image:
    """The image as the server decodes it (PNG round trip, RGB)."""
    return Image.open(io.BytesIO(png(picture(seed)))).convert("RGB")


def greedy(pipe: Pipeline, question: str, seeds: list[int], new: int = NEW):
    return pipe.generate([decoded(s) for s in seeds], question, SamplingOptions(max_new_tokens=new))


def ask(client, question: str, seeds: list[int], **kwargs):
    urls = [data_url(png(picture(s))) for s in seeds]
    return client.chat.completions.create(model="dsvl-tiny", messages=[user(question, *urls)], **kwargs)


# ---------------------------------------------------------------- answers
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["dsvl-tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsvl_requests_total", "dsvl_queue_depth", "dsvl_tokens_per_second",
                 "dsvl_time_to_first_token_seconds"):
        assert name in text


def test_answer_equals_generate(client, pipe):
    want = greedy(pipe, "What is in the picture?", [1])
    got = ask(client, "What is in the picture?", [1])
    choice = got.choices[0]
    assert choice.message.content == want.text
    assert choice.finish_reason == ("stop" if want.stop_reason == "eos" else "length")
    sequence, _ = pipe.chat().sequence_for("What is in the picture?", list(pipe.encode_images([decoded(1)])))
    assert got.usage.prompt_tokens == len(sequence)
    assert got.usage.completion_tokens == len(want.tokens)


def test_stream_equals_generate(client, pipe):
    want = greedy(pipe, "Describe it.", [2, 3])
    chunks = list(ask(client, "Describe it.", [2, 3], stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_multi_turn_with_images_in_two_turns_equals_chat(client, pipe):
    first_answer = "A square of coloured noise."  # what the client holds as the first answer
    chat = pipe.chat()
    chat.record("What is this?", list(pipe.encode_images([decoded(4)])),
                pipe.tokenizer.plain_tokenizer().encode(first_answer, add_special_tokens=False).ids)
    want = chat.ask("And this one, compared?", [decoded(5)], SamplingOptions(max_new_tokens=NEW))
    got = client.chat.completions.create(model="dsvl-tiny", max_tokens=NEW, messages=[
        {"role": "system", "content": "ignored: DSVL's template has its own instruction"},
        user("What is this?", data_url(png(picture(4)))),
        {"role": "assistant", "content": first_answer},
        user("And this one, compared?", data_url(png(picture(5))))])
    assert got.choices[0].message.content == want.text


def test_recorded_history_equals_asked_history(pipe):
    """Chat.record (the server's seam) with the answer's own ids equals asking that turn."""
    options = SamplingOptions(max_new_tokens=NEW)
    asked = pipe.chat()
    first = asked.ask("What is this?", [decoded(4)], options)
    second = asked.ask("And this one?", [decoded(5)], options)
    recorded = pipe.chat()
    recorded.record("What is this?", list(pipe.encode_images([decoded(4)])), first.tokens)
    assert recorded.ask("And this one?", [decoded(5)], options).tokens == second.tokens


def test_stop_seed_and_local_images(client, pipe, local_dir):
    full = greedy(pipe, "What colour?", [6], new=NEW).text
    stop = full[4:7]
    got = ask(client, "What colour?", [6], stop=[stop, "\x00never"])
    assert got.choices[0].message.content == full[:full.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    sampled = SamplingOptions(max_new_tokens=NEW, do_sample=True, temperature=0.9, top_p=0.8, seed=3)
    want = pipe.generate([decoded(6)], "What colour?", sampled).text
    for _ in range(2):
        assert ask(client, "What colour?", [6], temperature=0.9, top_p=0.8, seed=3) \
            .choices[0].message.content == want
    local = client.chat.completions.create(model="dsvl-tiny", messages=[
        user("What is in the picture?", str(local_dir / "allowed.png"))])
    assert local.choices[0].message.content == pipe.generate(
        [Image.open(local_dir / "allowed.png").convert("RGB")], "What is in the picture?",
        SamplingOptions(max_new_tokens=NEW)).text


def test_eight_concurrent_clients_are_batched_and_answered_correctly(server, client, pipe):
    questions = [(f"Question number {k}: what is shown{'?' * (k % 3 + 1)}", [10 + k] * (k % 3))
                 for k in range(8)]
    lengths = [NEW + 2 * k for k in range(8)]  # streams leave the batch at different steps
    want = [greedy(pipe, q, seeds, n).text for (q, seeds), n in zip(questions, lengths, strict=True)]
    widest = {"rows": 0}
    step = server.engine._step

    def watching_step():
        widest["rows"] = max(widest["rows"], server.engine.active)
        step()

    server.engine._step = watching_step
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, client, q, seeds, max_tokens=n, stream=k % 2 == 1)
                       for k, ((q, seeds), n) in enumerate(zip(questions, lengths, strict=True))]
            results = [f.result(timeout=300) for f in futures]
    finally:
        server.engine._step = step
    texts = [r.choices[0].message.content if not isinstance(r, openai.Stream) else None
             for r in results]
    for k, result in enumerate(results):
        if texts[k] is None:
            texts[k] = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
    assert texts == want
    assert widest["rows"] >= 2, "concurrent requests should share decode steps"


# ---------------------------------------------------------------- cancellation
def cancelled(server) -> float:
    return server.state.metrics.outcomes.labels("cancelled")._value.get()


def wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_cancels_its_generation(server):
    body = {"model": "dsvl-tiny", "max_tokens": 3000, "stream": True,
            "messages": [user("Talk for a long time.", data_url(png(picture(20))))]}
    before = cancelled(server)
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/chat/completions",
                                                      json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk arrived; now leave
    assert wait_until(lambda: cancelled(server) == before + 1), "the stream was not cancelled"
    assert wait_until(lambda: server.engine.active == 0)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as http:
        http.post(server.url + "/v1/chat/completions", json=body)
    assert wait_until(lambda: cancelled(server) == before + 2), "the request was not cancelled"
    assert wait_until(lambda: server.engine.active == 0 and not server.engine.waiting)


# ---------------------------------------------------------------- limits and errors
def post(server, content: bytes | str, **headers) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **headers}, timeout=60)


def check_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert words in error["message"] and "\n" not in error["message"]


def test_malformed_json_and_bad_fields_are_400(server, client):
    check_error(post(server, b"{not json"), 400, "not valid JSON")
    check_error(post(server, b"[1, 2]"), 400, "JSON object")
    check_error(post(server, b'{"messages": [], "temperature": NaN}'), 400, "NaN")
    check_error(post(server, "\udcff".encode("utf-8", "surrogatepass")), 400, "not valid JSON")
    bad = [({"messages": []}, "non-empty"), ({"messages": "hi"}, "non-empty"),
           ({"messages": [{"role": "assistant", "content": "x"}]}, "must answer a user"),
           ({"messages": [{"role": "tool", "content": "x"}]}, "unsupported role"),
           ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unsupported content"),
           ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
           ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
           ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
           ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
           ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop")]
    for payload, words in bad:
        check_error(httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=60), 400, words)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        ask(client, "x", [], n=2)


def test_bad_images_are_400(server, client, local_dir, tmp_path):
    cases = [(data_url(b"not an image at all"), "cannot read the image"),
             (data_url(png(picture(1))[:60]), "cannot"),  # truncated PNG
             ("data:image/png;base64,@@@@", "not valid base64"),
             ("data:image/png,rawbytes", "must be base64"),
             ("https://example.com/cat.png", "does not fetch"),
             (data_url(png(np.zeros((500, 1, 3), np.uint8))), "aspect ratio"),
             (str(tmp_path / "outside.png"), "no image file"),
             (str(local_dir / ".." / "escape.png"), "no image file")]
    for url, words in cases:
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model="dsvl-tiny", messages=[user("What?", url)])
    too_many = [data_url(png(picture(s))) for s in range(9)]
    with pytest.raises(openai.BadRequestError, match="at most 8 images"):
        client.chat.completions.create(model="dsvl-tiny", messages=[user("What?", *too_many)])


def test_too_large_is_413(server, client):
    big_image = data_url(png(picture(1, (200, 200))))  # ~120 kB of noise, over 100 kB
    with pytest.raises(openai.APIStatusError, match="max-image-bytes") as info:
        client.chat.completions.create(model="dsvl-tiny", messages=[user("What?", big_image)])
    assert info.value.status_code == 413
    many_pixels = data_url(png(np.zeros((1100, 1000, 3), np.uint8)))  # small file, 1.1 Mpx
    with pytest.raises(openai.APIStatusError, match="max-image-pixels") as info:
        client.chat.completions.create(model="dsvl-tiny", messages=[user("What?", many_pixels)])
    assert info.value.status_code == 413
    check_error(post(server, b'{"messages": "' + b"x" * (2 << 20) + b'"}'), 413, "max-body-bytes")


def test_context_overflow_is_400_with_the_numbers(server, client):
    with pytest.raises(openai.BadRequestError, match=r"needs \d+ positions .* context holds 4096"):
        ask(client, "What?", [1], max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match=r"need \d+ positions .* context holds 4096"):
        ask(client, "word " * 5000, [])


def test_a_full_queue_is_429_with_retry_after(server):
    engine = server.engine
    limit, engine.max_queue = engine.max_queue, 0  # every request now finds the queue full
    try:
        response = post(server, b'{"messages": [{"role": "user", "content": "hi"}]}')
    finally:
        engine.max_queue = limit
    check_error(response, 429, "busy")
    assert response.headers["retry-after"]


def test_a_backend_failure_is_500_and_leaves_nothing_behind(server, client, monkeypatch):
    def failing_prefill(*args, **kwargs):
        raise RuntimeError("backend failure in the prompt pass\nsecond line")

    with monkeypatch.context() as patch:
        patch.setattr(server.engine.decoder, "prefill", failing_prefill)
        with pytest.raises(openai.InternalServerError, match="backend failure in the prompt pass$"):
            ask(client, "What?", [1])
    batch_class = type(server.engine.decoder.new_batch())  # Batch or SharedBatch, by the export
    step, calls = batch_class.step, {"n": 0}

    def failing_step(self, embeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("backend failure in a decode step")
        return step(self, embeds)

    with monkeypatch.context() as patch:
        patch.setattr(batch_class, "step", failing_step)
        with pytest.raises(openai.InternalServerError, match="decode step"):
            ask(client, "What?", [1])
    assert wait_until(lambda: server.engine.active == 0)


def test_still_answers_after_the_bad_input(server, client, pipe):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert ask(client, "What is in the picture?", [1]).choices[0].message.content == \
        greedy(pipe, "What is in the picture?", [1]).text
    assert server.engine.active == 0 and not server.engine.waiting
