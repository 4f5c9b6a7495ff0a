"""The same app on Ray Serve with 2 replicas, on loopback: both replicas serve, and answers
equal the runtime's. Skipped (with the reason) where Ray Serve is not installed: `.[ray]`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from runtime.pipeline import Pipeline  # noqa: E402
from runtime.sampling import SamplingOptions  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ray_replicas_answer_like_the_runtime(exported):
    artifacts: Path = exported("--vis-proj", "baseline")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--artifacts", str(artifacts),
                               "--ray", "--replicas", "2", "--threads", "1", "--port", str(port),
                               "--max-tokens", "8"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert server.poll() is None, server.stderr.read()[-2000:]
        pids: set[int] = set()  # a replica serves once loaded: poll, bounded, until both have
        while time.monotonic() < deadline and len(pids) < 2:
            with ThreadPoolExecutor(4) as pool:
                pids |= set(pool.map(lambda _: httpx.get(url + "/health", timeout=30).json().get("pid"),
                                     range(8)))
        assert len(pids) == 2, f"expected 2 replicas, saw {pids}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        questions = [f"Question {k}?" for k in range(4)]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda q: client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": q}]).choices[0].message.content,
                questions))
        pipe = Pipeline.from_artifacts(artifacts, threads=1)
        assert got == [pipe.generate([], q, SamplingOptions(max_new_tokens=8)).text for q in questions]
    finally:
        server.send_signal(signal.SIGINT)  # serve.shutdown(), then Ray's own shutdown at exit
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
