"""Serving benchmark on loopback: aggregate decode tokens/s and time to first token (p50/p95)
at concurrency 1, 2, 4 and 8, one server process against Ray Serve with 2 replicas.

    python -m export.all --preset small --out /tmp/small
    python scripts/bench_serve.py --artifacts /tmp/small [--ray] [--rounds 2] [--tokens 32]

Each round starts ``c`` streaming requests at once (one image, a short question, greedy,
``--tokens`` completion tokens). The engine admits them together, so after the last first
token every stream is decoding: aggregate decode tok/s = sum(tokens - 1) / (last end - last
first token). Bounded: a fixed number of requests, each with a timeout.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(artifacts: Path, ray: bool, port: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "runtime.serve", "--artifacts", str(artifacts), "--port",
               str(port), "--max-batch", "8"]
    command += ["--ray", "--replicas", "2", "--threads", "1"] if ray else ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline, seen = f"http://127.0.0.1:{port}", time.monotonic() + 300, set()
    while time.monotonic() < deadline and server.poll() is None:
        try:
            reply = httpx.get(url + "/health", timeout=5)
            if reply.status_code == 200:
                seen.add(reply.json().get("pid"))
                if len(seen) >= (2 if ray else 1):
                    return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("error: the server did not become ready in 300 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGES = 1  # per request (--images)


def one_request(url: str, seed: int, tokens: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url(seed * 8 + i)}} for i in range(IMAGES)]
    body = {"model": "bench", "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": parts + [
                {"type": "text", "text": f"Describe picture {seed} in detail."}]}]}
    start, first, completion = time.perf_counter(), None, 0
    with httpx.Client(timeout=300) as http, http.stream("POST", url + "/v1/chat/completions",
                                                        json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"error: HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            choice = (chunk.get("choices") or [{}])[0]
            delta = choice.get("delta", {})
            if first is None and (delta.get("content") or choice.get("finish_reason")):
                first = time.perf_counter()
    return {"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(),
            "tokens": completion}


def run_round(url: str, concurrency: int, seed: int, tokens: int) -> tuple[float, list[float]]:
    """One round of ``concurrency`` simultaneous requests: (aggregate decode tok/s, TTFTs)."""
    with ThreadPoolExecutor(concurrency) as pool:
        seeds = [seed + k for k in range(concurrency)]
        results = list(pool.map(lambda s: one_request(url, s, tokens), seeds))
    decode_start = max(x["first"] for x in results)
    window = max(x["end"] for x in results) - decode_start
    rate = sum(x["tokens"] - 1 for x in results) / window if window > 0 else float("nan")
    return rate, [x["first"] - x["start"] for x in results]


def run_levels(url: str, levels: list[int], rounds: int, tokens: int, mode: str) -> list[dict]:
    """Levels interleaved round by round (1, 2, 4, 8, 1, 2, ...), so a change in the machine's
    background load hits every level alike; per level the median rate over its rounds."""
    rates = {c: [] for c in levels}
    ttfts = {c: [] for c in levels}
    load = {c: [] for c in levels}
    for r in range(rounds):
        for c in levels:
            rate, times = run_round(url, c, 1000 * r + 100 * c, tokens)
            rates[c].append(rate)
            ttfts[c] += times
            load[c].append(os.getloadavg()[0])
            print(json.dumps({"mode": mode, "round": r, "concurrency": c, "decode_tok_s": rate}), flush=True)
    return [{"concurrency": c, "decode_tok_s": float(np.median(rates[c])),
             "ttft_p50_s": float(np.percentile(ttfts[c], 50)),
             "ttft_p95_s": float(np.percentile(ttfts[c], 95)),
             "requests": len(ttfts[c]), "load_avg_1m": float(np.mean(load[c]))} for c in levels]


def bench(artifacts: Path, ray: bool, levels: list[int], rounds: int, tokens: int, threads: int) -> list[dict]:
    server = start_server(artifacts, ray, port := free_port(), threads)
    url = f"http://127.0.0.1:{port}"
    try:
        one_request(url, 999, 4)  # warm-up
        return run_levels(url, levels, rounds, tokens, "ray-2" if ray else "single")
    finally:
        stop_server(server)


def table(name: str, rows: list[dict]) -> str:
    """A markdown table; ratios against the first level."""
    base = rows[0]["decode_tok_s"]
    lines = [f"### {name}", "", "| concurrency | aggregate decode tok/s | vs 1 stream | TTFT p50 | "
             "TTFT p95 | requests | load avg (1 min) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['concurrency']} | {row['decode_tok_s']:.1f} | "
                     f"{row['decode_tok_s'] / base:.2f}x | {row['ttft_p50_s'] * 1e3:.0f} ms | "
                     f"{row['ttft_p95_s'] * 1e3:.0f} ms | {row['requests']} | {row['load_avg_1m']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True,
                        help="an export (python -m export.all --preset small --out DIR)")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--threads", type=int, default=0, help="single-process CPU threads (0: all)")
    parser.add_argument("--ray", action="store_true", help="also run Ray Serve with 2 replicas")
    parser.add_argument("--images", type=int, default=1,
                        help="images per request (default 1: 324 prompt positions; 0: 54)")
    args = parser.parse_args()
    global IMAGES
    IMAGES = args.images
    levels = [int(c) for c in args.levels.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    reports = [table("one server process (batched decoding)",
                     bench(args.artifacts, False, levels, args.rounds, args.tokens, args.threads))]
    if args.ray:
        reports.append(table("Ray Serve, 2 replicas (1 thread each)",
                             bench(args.artifacts, True, levels, args.rounds, args.tokens, 1)))
    print("\n\n".join(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
