"""Our decoder against ONNX Runtime GenAI and llama.cpp on identical weights: one interleaved run.

    python scripts/bench_peers.py --preset small --json /tmp/peers.json [--profile]
    python scripts/bench.py --preset small --peers --json /tmp/bench_peers.json   # with bench.py's figures

The preset's decoder (the same seeded weights ``export.all`` exports) is written as a Hugging
Face ``LlamaForCausalLM`` directory (config.json with DSVL's rope_theta 10000, safetensors,
tokenizer). From it, or from our own exports of the same preset:

- ``ours-fp32``: ``python -m export.all --preset P --out D`` + ``--ours-export-args``;
  ``ours-int4``: ``python -m export.quantize --artifacts D --bits 4`` of it;
  ``ours-fp32-mmca``: ``export.all`` with ``--enable-mmca-attention`` + ``--ours-mmca-export-args``
  (by default the in-place cache, as for ``ours-fp32``; its reference is the MMCA PyTorch
  decoder: with text-only masks MMCA is another function);
- ``genai-fp32`` / ``genai-int4``: ``python -m onnxruntime_genai.models.builder -i HF -o OUT
  -p fp32|int4 -e cpu``;
- ``llamacpp-f32`` / ``llamacpp-q4_0``: llama.cpp's ``convert_hf_to_gguf.py --outtype f32``
  (from llama-cpp-python's sdist, ``--llama-cpp-convert``), then ``llama_model_quantize``;
- ``ours-int4-kv8`` (only when named in ``--engines``): ``ours-int4`` with ``--kv-cache int8``
  (the KV cache in 8 bits, export/kv_quant.py), and its peer ``llamacpp-q4_0-kv8``: the Q4_0
  build with llama.cpp's KV cache in Q8_0 (``type_k``/``type_v``, flash attention on);
- with ``--ours-baseline-args ARGS``, also ``ours-baseline-fp32`` / ``ours-baseline-int4``: our
  export with ARGS instead (e.g. an older graph mode), for a before/after in the same run.

With ``--work DIR`` the builds are kept and reused while their command and the weights' sha256
are unchanged, and for ours the exporter's code too (``--build-only`` prepares them).

Each engine runs in its own worker process (this script with ``--worker``; the peers' from
``--peers-python``, which may be another virtual environment), so peak RSS is per engine and no
engine's import or allocator touches another's. All engines are loaded together and every timed
repeat runs each engine once, so background load hits all alike. The order is a seeded
shuffle per repeat and every run starts after a ``--settle`` pause: an engine's first steps
otherwise depend on which engine ran just before it (a fixed rotation put each engine after the
same one every time, and moving ours from before GenAI to after it swung the context-64 ratio
from 0.88-0.91x to 1.00-1.03x, docs/benchmarks.md). Per engine:

- decode tok/s at context 64 and 1024: a prompt pass of that many random token ids, then
  ``--steps`` greedy steps (no EOS stop), ``--repeats`` runs pooled; tok/s = 1 / median step;
- TTFT: the prompt pass to the first token (median over the same runs);
- teacher-forced top-1 agreement with the fp32 PyTorch reference (``dsvl/``): the reference's
  greedy tokens fed step by step, ``--agreement-tokens`` per context;
- peak RSS (VmHWM) of the worker after everything.

Each engine steps its own way: ours through ``Pipeline.prefill`` / ``Pipeline.decode`` on token
embeddings from the decoder table (greedy, EOS disabled); GenAI through ``og.Generator``
(``append_tokens``, ``generate_next_token``; EOS held off with ``min_length``); llama.cpp through
``Llama.eval`` plus an argmax. Threads: ``--threads`` for every engine. ``--profile`` adds ONNX
Runtime's per-op profile of one decode step at context 1024 for our graphs and GenAI's
``model.onnx``, interleaved across the graphs. Engines whose package or converter is missing are skipped with the reason.
Progress goes to stderr; the markdown table to stdout; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# Module level stays light (numpy only): the workers import this file, some from a peers venv
# without torch. The parent's heavy imports (torch, dsvl, onnx) live in its functions.

ENGINES = ("ours-fp32", "ours-int4", "ours-fp32-mmca", "genai-fp32", "genai-int4",
           "llamacpp-f32", "llamacpp-q4_0")
# Optional: our export with other arguments (--ours-baseline-args), e.g. an older graph mode.
BASELINE = ("ours-baseline-fp32", "ours-baseline-int4")
# Optional: ours-int4 with its KV cache in int8 (export.quantize --kv-cache int8, export/kv_quant.py),
# and llama.cpp's Q4_0 with its cache in Q8_0 (and the flash attention that needs).
KV8 = "ours-int4-kv8"
LLAMA_KV8 = "llamacpp-q4_0-kv8"
# Optional: an engine's build run with the other page size under its weights. Our runtime puts
# the decoder's weights on 2 MiB pages (runtime/hugepages.py); "-4k" turns that off
# (--no-huge-pages). GenAI leaves them on 4 KiB pages; "-hugepages" gives its model the same
# treatment as ours (runtime/hugepages.on_huge_pages around og.Model): what the graph would
# gain with it. (glibc's GLIBC_TUNABLES=glibc.malloc.hugetlb=1 is no substitute: it put 33-41
# of GenAI's 118 MiB on huge pages, and no speed.)
PAGE_VARIANTS = {"ours-fp32-4k": "ours-fp32", "ours-int4-4k": "ours-int4",
                 "genai-fp32-hugepages": "genai-fp32", "genai-int4-hugepages": "genai-int4"}
CONTEXTS = (64, 1024)
# export.all's own defaults: the fused decoder graph with the in-place KV cache (--kv-cache auto:
# shared, MMCA included). Older modes stay reachable, e.g. "--decoder-graph traced --kv-cache
# shared", or MMCA's concat cache with --ours-mmca-export-args "--kv-cache concat".
DEFAULT_OURS_ARGS = ""
DEFAULT_MMCA_ARGS = ""
CONVERT_ENV = "LLAMA_CPP_CONVERT"  # path of llama.cpp's convert_hf_to_gguf.py


@dataclass
class Options:
    preset: str = "small"
    threads: int = 2
    engines: tuple[str, ...] = ENGINES
    steps: int = 64  # greedy steps per decode run
    repeats: int = 11  # timed decode runs per engine and context, pooled
    warmup: int = 1  # untimed decode runs per engine and context
    settle: float = 0.25  # seconds of idle before each decode run (the previous engine's threads)
    agreement_tokens: int = 32
    max_context: int = 2048  # every engine's KV cache / context size
    ours_export_args: str = DEFAULT_OURS_ARGS
    ours_mmca_export_args: str = DEFAULT_MMCA_ARGS
    ours_baseline_args: str | None = None  # builds BASELINE engines when they are asked for
    ours_quantize_args: str = ""  # extra export.quantize arguments for ours-int4
    ours_baseline_quantize_args: str = ""  # ... and for ours-baseline-int4
    peers_python: str = sys.executable
    llama_cpp_convert: str | None = None
    work: str | None = None  # keep builds here (reused when their command is unchanged)
    profile: bool = False
    profile_runs: int = 20
    build_only: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ====================================================================== worker side (no torch)
def peak_rss_mb() -> dict:
    status = Path("/proc/self/status").read_text()

    def field_mb(name: str) -> float:
        return int(status.split(name + ":")[1].split()[0]) / 1024

    return {"peak_rss_mb": field_mb("VmHWM"), "rss_mb": field_mb("VmRSS")}


def huge_page_info(report) -> dict:
    """An engine's ``runtime.hugepages.HugePageReport`` as its record shows it."""
    return {"collapsed_mib": report.collapsed_bytes / 2**20, "seconds": report.seconds,
            "skipped": report.skipped}


class OursEngine:
    """runtime.pipeline.Pipeline on an artefact directory, fed token embeddings from the decoder
    table (embed_tokens) for the prompt and for generated tokens alike, as LlamaForCausalLM does."""

    def __init__(self, path: str, threads: int, max_context: int, pages: str = "huge"):
        from runtime.pipeline import Pipeline

        self.pipe = Pipeline.from_artifacts(path, threads=threads, max_context=max_context,
                                            huge_pages=pages == "huge")
        self.pipe.tokenizer.eos_token_id = -1  # no EOS stop: every run decodes all its steps
        self.table = self.pipe.artifacts.decoder_embeddings
        self.first: np.ndarray | None = None
        decoder = self.pipe.artifacts.decoder  # runtime.manifest.DecoderSection
        self.info = {"kv_cache": decoder.kv_cache, "graph": decoder.graph,
                     "mmca": self.pipe.artifacts.mmca, "io_dtype": decoder.io_dtype,
                     "kv_cache_dtype": decoder.cache_dtype,
                     "huge_pages": huge_page_info(self.pipe.decoder.huge_pages)}

    def prefill(self, ids: list[int]) -> int:
        self.pipe.reset()
        embeds = np.asarray(self.table[ids], np.float32)[None]
        self.first = self.pipe.prefill(embeds, np.ones((1, len(ids)), np.int64))
        return int(np.argmax(self.first))

    def decode(self, steps: int) -> tuple[list[float], list[int]]:
        """Pipeline.decode itself; a step is the time between two picks (forward + pick)."""
        from runtime.sampling import SamplingOptions

        clock: list[float] = []
        tokens, _ = self.pipe.decode(self.first, SamplingOptions(max_new_tokens=steps + 1),
                                     on_step=lambda logits, so_far: clock.append(time.perf_counter()))
        return [b - a for a, b in zip(clock, clock[1:], strict=False)], tokens[1:]

    def forced(self, ids: list[int], tokens: list[int]) -> list[int]:
        """The reference's tokens fed one by one through the decoder runner; argmax per step."""
        pipe, runner = self.pipe, self.pipe.decoder
        picks = [self.prefill(ids)]
        position = np.empty((1, 1), np.int64)
        for token in tokens[:-1]:
            length = runner.past_length
            pipe.mask[0, length] = 1
            position[0, 0] = pipe.positive
            pipe.positive += 1
            step = np.asarray(self.table[token], np.float32)[None, None]
            picks.append(int(np.argmax(runner.forward(step, pipe.mask[:, :length + 1], position)[0])))
        return picks


class GenaiEngine:
    """onnxruntime_genai: og.Generator, greedy; min_length = max_length holds EOS off."""

    def __init__(self, path: str, threads: int, max_context: int, pages: str = "4k"):
        import onnxruntime_genai as og

        from runtime.hugepages import on_huge_pages  # stdlib only: fine in a peers venv

        self.og = og
        config = og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads}}}}))
        with on_huge_pages(pages == "huge") as report:
            self.model = og.Model(config)
        self.max_context = max_context
        self.generator = None
        self.info = {"onnxruntime_genai": og.__version__,
                     "huge_pages": huge_page_info(report)}

    def _new(self):
        # Outside the timed region: a generator allocates its KV buffers (max_length) here.
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_context, min_length=self.max_context,
                                  do_sample=False)
        return self.og.Generator(self.model, params)

    def new_request(self) -> None:
        self.generator = None
        self.generator = self._new()

    def prefill(self, ids: list[int]) -> int:
        self.generator.append_tokens(np.asarray(ids, np.int32))
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def decode(self, steps: int) -> tuple[list[float], list[int]]:
        gen, times, tokens = self.generator, [], []
        for _ in range(steps):
            start = time.perf_counter()
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter() - start)
        return times, tokens

    def forced(self, ids: list[int], tokens: list[int]) -> list[int]:
        gen = self._new()
        gen.append_tokens(np.asarray(ids, np.int32))
        picks = [int(np.argmax(gen.get_logits()[0, -1]))]
        for token in tokens[:-1]:
            gen.append_tokens(np.asarray([token], np.int32))
            picks.append(int(np.argmax(gen.get_logits()[0, -1])))
        return picks


class LlamaCppEngine:
    """llama-cpp-python: Llama(...).eval on token ids (llama_decode), argmax of the last logits
    read straight from the context (llama_get_logits_ith), greedy."""

    cache_args: dict = {}  # llama.cpp's defaults: F16 cache, flash attention as it decides

    def __init__(self, path: str, threads: int, max_context: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=max_context, n_batch=max_context,
                                   n_threads=threads, n_threads_batch=threads, verbose=False,
                                   **self.cache_args)
        self.n_vocab = self.llm.n_vocab()
        params = self.llm.context_params
        flash = {-1: "auto", 0: "disabled", 1: "enabled"}
        cache = {0: "f32", 1: "f16", 8: "q8_0"}
        self.info = {"llama_cpp_python": llama_cpp.__version__, "n_ctx": max_context,
                     "n_batch": max_context, "n_ubatch": params.n_ubatch,
                     "kv_cache_type": [cache.get(int(params.type_k), int(params.type_k)),
                                       cache.get(int(params.type_v), int(params.type_v))],
                     "flash_attn": flash.get(int(getattr(params, "flash_attn_type", -2)), "?")}

    def _argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def new_request(self) -> None:
        self.llm.reset()  # n_tokens = 0: the next eval overwrites the cache from position 0

    def prefill(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        self.token = self._argmax()
        return self.token

    def decode(self, steps: int) -> tuple[list[float], list[int]]:
        times, tokens, token = [], [], self.token
        for _ in range(steps):
            start = time.perf_counter()
            self.llm.eval([token])
            token = self._argmax()
            tokens.append(token)
            times.append(time.perf_counter() - start)
        return times, tokens

    def forced(self, ids: list[int], tokens: list[int]) -> list[int]:
        self.new_request()
        picks = [self.prefill(ids)]
        for token in tokens[:-1]:
            self.llm.eval([token])
            picks.append(self._argmax())
        return picks


class LlamaCppKv8Engine(LlamaCppEngine):
    """llama.cpp with its KV cache in Q8_0 (``type_k``/``type_v`` 8), which needs its flash
    attention: the peer of ``ours-int4-kv8``."""

    cache_args = {"type_k": 8, "type_v": 8, "flash_attn": True}  # GGML_TYPE_Q8_0


WORKER_KINDS = {"ours": OursEngine, "genai": GenaiEngine, "llamacpp": LlamaCppEngine,
                "llamacpp-kv8": LlamaCppKv8Engine}


def worker_main(kind: str, model: str, threads: int, max_context: int, pages: str | None = None) -> int:
    """Serve JSON-line commands on the original stdout; everything the libraries print goes to
    stderr (fd 1 is pointed there)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    start = time.perf_counter()
    try:
        engine = WORKER_KINDS[kind](model, threads, max_context, *((pages,) if pages else ()))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which skips the engine
        reply({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
        return 1
    reply({"ready": True, "load_s": time.perf_counter() - start, "info": engine.info} | peak_rss_mb())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "decode":
            if hasattr(engine, "new_request"):
                engine.new_request()
            start = time.perf_counter()
            first = engine.prefill(cmd["ids"])
            ttft = time.perf_counter() - start
            step_s, tokens = engine.decode(cmd["steps"])
            reply({"ttft_s": ttft, "step_s": step_s, "tokens": [first, *tokens]})
        elif cmd["cmd"] == "forced":
            reply({"picks": engine.forced(cmd["ids"], cmd["tokens"])})
        elif cmd["cmd"] == "rss":
            reply(peak_rss_mb())
    return 0


# ====================================================================== parent side
class Worker:
    """One engine in its own process, driven over JSON lines."""

    def __init__(self, engine: str, kind: str, model: Path, python: str, options: Options, logs: Path):
        self.engine = engine
        self.log_path = logs / f"worker-{engine}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(options.threads))
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model),
             "--threads", str(options.threads), "--max-context", str(options.max_context),
             *(["--pages", "4k"] if engine.endswith("-4k") else []),
             *(["--pages", "huge"] if engine.endswith("-hugepages") else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
            cwd=ROOT, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"worker {self.engine} exited ({self.proc.returncode}): {' | '.join(tail)}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.engine}: {reply['error']}")
        return reply

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# ---------------------------------------------------------------------- builds
class BuildError(RuntimeError):
    pass


def run_logged(cmd: list[str], log_path: Path, what: str, timeout: int = 3600) -> float:
    """Run a build command (cwd = repository root), output to ``log_path``; seconds taken."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    with open(log_path, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BuildError(f"{what}: {err}") from None
    if proc.returncode != 0:
        tail = [line for line in log_path.read_text().strip().splitlines() if line.strip()][-2:]
        raise BuildError(f"{what} failed ({proc.returncode}): {' | '.join(tail)[-400:]} (log: {log_path})")
    return time.perf_counter() - start


def run_module(module: str, argv: list[str], log_path: Path, what: str) -> float:
    """``python -m module *argv`` in this process (its main(argv)), output to ``log_path``:
    the parent has torch imported already, which saves each export ~10 s of imports."""
    import contextlib
    import importlib
    import traceback

    start = time.perf_counter()
    with open(log_path, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        print("$ python -m " + shlex.join([module, *argv]), flush=True)
        try:
            rc = importlib.import_module(module).main(argv)
        except Exception as err:  # noqa: BLE001 - any export failure skips the engine, with the reason
            traceback.print_exc()
            raise BuildError(f"{what} failed: {type(err).__name__}: {str(err)[:300]} (log: {log_path})") from None
    if rc:
        tail = [line for line in log_path.read_text().strip().splitlines() if line.strip()][-2:]
        raise BuildError(f"{what} failed ({rc}): {' | '.join(tail)[-400:]} (log: {log_path})")
    return time.perf_counter() - start


def cached(target: Path, key: dict, build, log_dir: Path, what: str) -> dict:
    """Build ``target`` unless it holds a build of the same ``key`` (a finished one: the stamp
    is written last). Returns {"seconds": ..., "reused": bool}."""
    stamp = target.parent / f".{target.name}.stamp"
    if target.exists() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"   {what}: reusing {target}")
        return {"seconds": None, "reused": True}
    stamp.unlink(missing_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    log(f"   {what} ...")
    seconds = build()
    stamp.write_text(json.dumps(key))
    log(f"   {what}: {seconds:.1f} s")
    return {"seconds": seconds, "reused": False}


def write_hf_dir(model, tokenizer, out: Path) -> float:
    """The decoder as a Hugging Face LlamaForCausalLM directory: config.json (DSVL's rope_theta
    10000 spelled out for tools that read the classic key), model.safetensors, tokenizer files."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    decoder = model.lang_decoder
    out.mkdir(parents=True)
    config = decoder.config.to_dict()
    theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=theta,
                  torch_dtype="float32", dtype="float32", _name_or_path=str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "do_sample": False}, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out)
    return time.perf_counter() - start


def code_digest() -> str:
    """sha256 over the sources our exports come from (dsvl/, export/, runtime/)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for part in ("dsvl", "export", "runtime") for p in (ROOT / part).rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def weights_digest(decoder) -> str:
    """sha256 over the decoder's state dict (names and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(decoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_hf_dir(hf_dir: Path, decoder, ids: list[int]) -> float:
    """transformers' LlamaForCausalLM on the written directory against the dsvl/ decoder: max
    |logits difference| over a prompt (shows the directory holds the same function)."""
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        want, _ = decoder(decoder.model.embed_tokens(ids_t), torch.ones_like(ids_t),
                          torch.arange(len(ids))[None], decoder.empty_cache())
        got = hf(input_ids=ids_t).logits
    return float((got - want).abs().max())


def python_has(python: str, module: str) -> str | None:
    """None if ``python`` imports ``module``, else the reason it does not."""
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot run --peers-python {python}: {err}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import {module} ({last})"
    return None


def find_convert(options: Options) -> Path | None:
    for candidate in (options.llama_cpp_convert, os.environ.get(CONVERT_ENV)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


QUANTIZE_GGUF = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def build_engines(options: Options, work: Path, model, tokenizer) -> tuple[dict, dict, dict]:
    """Build every requested engine; returns (engine -> (kind, model path, python)), build
    records, and engine -> reason for the skipped ones."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    want = set(options.engines) | {PAGE_VARIANTS[e] for e in options.engines if e in PAGE_VARIANTS}
    ready: dict[str, tuple[str, Path, str]] = {}
    builds: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    py = sys.executable
    preset = options.preset

    def attempt(engines: list[str], fn) -> None:
        engines = [e for e in engines if e in want and e not in skipped]
        if not engines:
            return
        try:
            fn(engines)
        except BuildError as err:
            for engine in engines:
                if engine not in ready:
                    skipped[engine] = str(err)
                    log(f"   skip {engine}: {err}")

    # ---- ours
    code = code_digest()  # our exports change with the exporter's code, not only with its command

    def build_ours(engines, fp32="ours-fp32", int4="ours-int4", args=options.ours_export_args,
                   quantize_args=options.ours_quantize_args):
        out = work / fp32
        cmd = ["--preset", preset, "--seed", str(options.seed), "--out", str(out), *shlex.split(args)]
        builds[fp32] = cached(out, {"export.all": cmd, "code": code}, lambda: run_module(
            "export.all", cmd, logs / f"{fp32}.log", "export.all"), logs, f"{fp32}: export.all " + shlex.join(cmd))
        if fp32 in engines:
            ready[fp32] = ("ours", out, py)
        if int4 in engines:
            q4 = work / int4
            qcmd = ["--artifacts", str(out), "--bits", "4", "--out", str(q4), *shlex.split(quantize_args)]
            builds[int4] = cached(q4, {"export.quantize": qcmd, "source": cmd, "code": code}, lambda: run_module(
                "export.quantize", qcmd, logs / f"{int4}.log", "export.quantize"), logs,
                f"{int4}: export.quantize " + shlex.join(qcmd))
            ready[int4] = ("ours", q4, py)
        if int4 == "ours-int4" and KV8 in engines:
            kv8 = work / KV8
            kcmd = ["--artifacts", str(out), "--bits", "4", "--out", str(kv8), *shlex.split(quantize_args),
                    "--kv-cache", "int8"]
            builds[KV8] = cached(kv8, {"export.quantize": kcmd, "source": cmd, "code": code}, lambda: run_module(
                "export.quantize", kcmd, logs / f"{KV8}.log", "export.quantize"), logs,
                f"{KV8}: export.quantize " + shlex.join(kcmd))
            ready[KV8] = ("ours", kv8, py)

    attempt(["ours-fp32", "ours-int4", KV8], build_ours)
    if options.ours_baseline_args is not None:
        attempt(list(BASELINE), lambda engines: build_ours(engines, *BASELINE, options.ours_baseline_args,
                                                           options.ours_baseline_quantize_args))

    def build_mmca(engines):
        mmca = work / "ours-fp32-mmca"
        cmd = ["--preset", preset, "--seed", str(options.seed), "--out", str(mmca),
               "--enable-mmca-attention", *shlex.split(options.ours_mmca_export_args)]
        builds["ours-fp32-mmca"] = cached(mmca, {"export.all": cmd, "code": code}, lambda: run_module(
            "export.all", cmd, logs / "ours-fp32-mmca.log", "export.all (MMCA)"), logs,
            "ours-fp32-mmca: export.all " + shlex.join(cmd))
        ready["ours-fp32-mmca"] = ("ours", mmca, py)

    attempt(["ours-fp32-mmca"], build_mmca)

    # ---- the Hugging Face directory the peers build from
    peers = [e for e in options.engines if not e.startswith("ours-")]
    hf = work / "hf"
    # Keyed on the weights themselves: the preset's seeded weights may change with the code.
    hf_key = {"preset": preset, "seed": options.seed, "weights_sha256": weights_digest(model.lang_decoder)}
    if peers:
        reasons = {}
        if any(e.startswith("genai-") for e in peers):
            reasons["genai"] = python_has(options.peers_python, "onnxruntime_genai")
        if any(e.startswith("llamacpp-") for e in peers):
            reasons["llamacpp"] = python_has(options.peers_python, "llama_cpp")
            if reasons["llamacpp"] is None and find_convert(options) is None:
                reasons["llamacpp"] = (f"llama.cpp's convert_hf_to_gguf.py not found: pass "
                                       f"--llama-cpp-convert PATH or set {CONVERT_ENV} (it ships in "
                                       f"llama-cpp-python's sdist, vendor/llama.cpp/)")
        for engine in peers:
            reason = reasons.get(engine.split("-")[0])
            if reason:
                skipped[engine] = reason
                log(f"   skip {engine}: {reason}")
        if any(e not in skipped for e in peers):
            builds["hf"] = cached(hf, hf_key, lambda: write_hf_dir(
                model, tokenizer, hf), logs, "Hugging Face LlamaForCausalLM directory")

    # ---- ONNX Runtime GenAI
    for precision in ("fp32", "int4"):
        engine = f"genai-{precision}"

        def build_genai(engines, precision=precision, engine=engine):
            out = work / engine
            cmd = [options.peers_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                   "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
            builds[engine] = cached(out, {"cmd": cmd[1:], "hf": hf_key},
                                    lambda: run_logged(cmd, logs / f"{engine}.log", f"GenAI builder {precision}"),
                                    logs, f"{engine}: " + shlex.join(cmd[1:]))
            ready[engine] = ("genai", out, options.peers_python)

        attempt([engine], build_genai)

    # ---- llama.cpp
    f32 = work / "llamacpp-f32.gguf"

    def build_f32(engines):
        convert = find_convert(options)
        cmd = [py, str(convert), str(hf), "--outtype", "f32", "--outfile", str(f32)]
        builds["llamacpp-f32"] = cached(f32, {"cmd": cmd[1:], "hf": hf_key}, lambda: run_logged(
            cmd, logs / "llamacpp-f32.log", "convert_hf_to_gguf.py"), logs, "llamacpp-f32: " + shlex.join(cmd[1:]))
        if "llamacpp-f32" in engines:
            ready["llamacpp-f32"] = ("llamacpp", f32, options.peers_python)
        if "llamacpp-q4_0" in engines or LLAMA_KV8 in engines:
            q4 = work / "llamacpp-q4_0.gguf"
            qcmd = [options.peers_python, "-c", QUANTIZE_GGUF, str(f32), str(q4), str(options.threads)]
            builds["llamacpp-q4_0"] = cached(q4, {"source": cmd[1:], "hf": hf_key, "ftype": "Q4_0"}, lambda: run_logged(
                qcmd, logs / "llamacpp-q4_0.log", "llama_model_quantize Q4_0"), logs,
                "llamacpp-q4_0: llama_model_quantize(LLAMA_FTYPE_MOSTLY_Q4_0)")
            if "llamacpp-q4_0" in engines:
                ready["llamacpp-q4_0"] = ("llamacpp", q4, options.peers_python)
            if LLAMA_KV8 in engines:
                ready[LLAMA_KV8] = ("llamacpp-kv8", q4, options.peers_python)

    attempt(["llamacpp-f32", "llamacpp-q4_0", LLAMA_KV8], build_f32)
    for variant, base in PAGE_VARIANTS.items():  # the same build, run with the other page size
        if variant in want:
            if base in ready:
                ready[variant] = ready[base]
            elif base in skipped:
                skipped[variant] = skipped[base]
    ready = {e: ready[e] for e in options.engines if e in ready}
    return ready, builds, skipped


def model_mb(path: Path) -> float:
    """Bytes on disk of what the engine loads (our decoder.onnx + data; GenAI's model.onnx +
    data; the .gguf)."""
    if path.is_file():
        return path.stat().st_size / 1e6
    names = ("decoder.onnx*",) if (path / "manifest.json").is_file() else ("model.onnx*",)
    return sum(f.stat().st_size for n in names for f in path.glob(n)) / 1e6


# ---------------------------------------------------------------------- reference
def reference_tokens(decoder, ids: list[int], count: int) -> list[int]:
    """Greedy tokens of the dsvl/ PyTorch decoder (fp32) after the prompt ``ids``."""
    import torch

    from dsvl.generate import position_ids_for

    with torch.no_grad():
        ids_t = torch.tensor([ids])
        mask = torch.ones_like(ids_t)
        logits, past = decoder(decoder.model.embed_tokens(ids_t), mask, position_ids_for(mask),
                               decoder.empty_cache())
        tokens = [int(logits[0, -1].argmax())]
        while len(tokens) < count:
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            step = decoder.model.embed_tokens(torch.tensor([[tokens[-1]]]))
            logits, past = decoder(step, mask, position_ids_for(mask)[:, -1:], past)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


# ---------------------------------------------------------------------- measuring
def run_order(names: list[str], seed: int, repeat: int) -> list[str]:
    """A seeded shuffle per repeat: over the repeats every engine runs after every other about
    equally often, where a rotation would always put it after the same one."""
    rng = np.random.default_rng([seed, repeat])
    return [names[i] for i in rng.permutation(len(names))]


def measure(options: Options, ready: dict, work: Path, prompts: dict[int, list[int]],
            references: dict[str, dict[int, list[int]]]) -> dict:
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    results: dict[str, dict] = {}
    try:
        for engine, (kind, path, python) in ready.items():
            log(f"   loading {engine} ({path.name})")
            try:
                workers[engine] = Worker(engine, kind, path, python, options, work / "logs")
            except RuntimeError as err:
                failed[engine] = str(err)
                log(f"   skip {engine}: {err}")
        names = list(workers)
        runs: dict[str, dict[int, list[dict]]] = {e: {ctx: [] for ctx in CONTEXTS} for e in names}
        loads = []
        log(f"== decode: {options.warmup} warm-up + {options.repeats} timed runs x {options.steps} "
            f"steps per engine and context, interleaved")
        for repeat in range(options.warmup + options.repeats):
            loads.append(os.getloadavg()[0])
            order = run_order(names, options.seed, repeat)
            for ctx in CONTEXTS:
                for engine in order:
                    time.sleep(options.settle)
                    reply = workers[engine].ask(cmd="decode", ids=prompts[ctx], steps=options.steps)
                    if repeat >= options.warmup:
                        runs[engine][ctx].append(reply)
            if repeat >= options.warmup:
                log(f"   run {repeat - options.warmup + 1}/{options.repeats}: load {loads[-1]:.2f}; "
                    + ", ".join(f"{e} {1 / np.median(runs[e][64][-1]['step_s']):.0f}" for e in names)
                    + " tok/s at ctx 64")
        log("== teacher-forced agreement")
        for engine in names:
            ref_key = "mmca" if engine.endswith("-mmca") else "plain"
            figures: dict = {"engine": engine}
            agree = {}
            for ctx in CONTEXTS:
                want = references[ref_key][ctx]
                picks = workers[engine].ask(cmd="forced", ids=prompts[ctx], tokens=want)["picks"]
                agree[ctx] = int(sum(p == w for p, w in zip(picks, want, strict=True)))
            for ctx in CONTEXTS:
                steps = np.concatenate([r["step_s"] for r in runs[engine][ctx]]) * 1e3
                ttft = np.asarray([r["ttft_s"] for r in runs[engine][ctx]]) * 1e3
                figures[f"tok_s_ctx{ctx}"] = float(1e3 / np.median(steps))
                figures[f"ttft_ms_{ctx}"] = float(np.median(ttft))
                figures[f"step_ms_ctx{ctx}"] = {"median": float(np.median(steps)),
                                              "p10": float(np.percentile(steps, 10)),
                                              "p90": float(np.percentile(steps, 90)), "n": int(steps.size)}
                figures[f"ttft_ms_{ctx}_p10_p90"] = [float(np.percentile(ttft, 10)), float(np.percentile(ttft, 90))]
                # each round's median, for ratios paired by round (rounds share the host's load)
                figures[f"tok_s_ctx{ctx}_rounds"] = [float(1 / np.median(r["step_s"])) for r in runs[engine][ctx]]
            total = len(CONTEXTS) * options.agreement_tokens
            figures["top1_agreement"] = sum(agree.values()) / total
            for ctx in CONTEXTS:
                figures[f"top1_agreement_ctx{ctx}"] = agree[ctx] / options.agreement_tokens
                free = runs[engine][ctx][0]["tokens"]
                want = references[ref_key][ctx]
                match = next((i for i, (a, b) in enumerate(zip(free, want, strict=False)) if a != b),
                             min(len(free), len(want)))
                figures[f"greedy_prefix_match_ctx{ctx}"] = match
            figures["agreement_tokens"] = options.agreement_tokens
            figures["reference"] = "PyTorch dsvl/ fp32" + (" with MMCA" if ref_key == "mmca" else "")
            figures |= workers[engine].ask(cmd="rss")
            figures["load_s"] = workers[engine].hello["load_s"]
            figures["info"] = workers[engine].hello["info"]
            kind, path, python = ready[engine]
            figures["model_mb"] = model_mb(path)
            figures["model_path"] = str(path)
            figures["python"] = python
            results[engine] = figures
            log(f"   {engine}: top-1 {agree[64]}/{options.agreement_tokens} (ctx 64), "
                f"{agree[1024]}/{options.agreement_tokens} (ctx 1024); peak RSS {figures['peak_rss_mb']:.0f} MB")
    finally:
        for w in workers.values():
            w.close()
    return {"results": results, "failed": failed, "loads_1min_per_round": loads}


# ---------------------------------------------------------------------- profile
class ProfiledStep:
    """ONNX Runtime's profiler on one decode step at ``context`` of one graph, with plain
    onnxruntime and IO binding: an in-place (GroupQueryAttention) cache is one
    [1, H, max_context, D] buffer bound as both past and present, as both runtimes do; otherwise
    past holds ``context`` positions and present ``context + 1``."""

    WARMUP = 3
    # Steps run back to back per turn; a turn's first step is not counted: the previous graph's
    # ONNX Runtime threads may still be spinning then (two thread pools on two cores).
    BLOCK = 4

    def __init__(self, path: Path, threads: int, context: int, max_context: int, kv_heads: int,
                 head_dim: int, vocab: int, tmp: Path):
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(path), load_external_data=False)
        self.op_counts: dict[str, int] = {}
        for node in graph.graph.node:
            self.op_counts[node.op_type] = self.op_counts.get(node.op_type, 0) + 1
        self.shared = shared = "GroupQueryAttention" in self.op_counts
        nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                  if a.name in ("block_size", "accuracy_level", "bits")}
                 for n in graph.graph.node if n.op_type == "MatMulNBits"]
        self.nbits = nbits[0] if nbits else None
        del graph
        self.path, self.context = path, context
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp / path.parent.name)
        self.session = session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.binding = session.io_binding()
        self.keep: list[np.ndarray] = []
        rng = np.random.default_rng(0)
        caches = {}
        for arg in session.get_inputs():
            name = arg.name
            if name.startswith("past_key_values"):
                shape = (1, kv_heads, max_context if shared else context, head_dim)
                if arg.type == "tensor(int8)":  # an int8 cache (export.quantize --kv-cache int8)
                    cache = rng.integers(-127, 128, shape).astype(np.int8)
                else:
                    cache = rng.standard_normal(shape).astype(np.float32)
                caches[name] = cache
                self._bind(name, cache)
            elif name == "input_ids":
                self._bind(name, np.array([[5]], np.int64))
            elif name == "inputs_embeds":
                self._bind(name, rng.standard_normal((1, 1, arg.shape[2])).astype(np.float32))
            elif name == "attention_mask":
                self._bind(name, np.ones((1, context + 1), np.int64))
            elif name == "position_ids":
                self._bind(name, np.array([[context]], np.int64))
            elif name == "logits_to_keep":  # our fused graph: the last position's logits
                self._bind(name, np.array(1, np.int64))
            else:
                raise ValueError(f"{path}: unexpected input {name}")
        for arg in session.get_outputs():
            name = arg.name
            if name.startswith("present"):
                past = caches[name.replace("present", "past_key_values", 1)]
                present = past if shared else np.empty(past.shape[:2] + (context + 1, past.shape[3]), past.dtype)
                self._bind(name, present, output=True)
            elif name == "logits":
                self._bind(name, np.empty((1, 1, vocab), np.float32), output=True)
        for _ in range(self.WARMUP):
            self.run()

    def _bind(self, name: str, array: np.ndarray, output: bool = False) -> None:
        self.keep.append(array)
        fn = self.binding.bind_output if output else self.binding.bind_input
        fn(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def finish(self) -> dict:
        """Per run (kernels grouped by the model_run span they fall in), then the median over
        the timed runs: a preempted run on a shared machine does not skew the breakdown."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("cat") == "Session" and e["name"] == "model_run")[self.WARMUP:]
        spans = [span for i, span in enumerate(spans) if i % self.BLOCK]
        per_run: list[dict[str, float]] = [{} for _ in spans]
        starts = [a for a, _ in spans]
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] <= spans[i][1]:
                op = e["args"]["op_name"]
                per_run[i][op] = per_run[i].get(op, 0.0) + e["dur"] / 1e3
                per_run[i]["#kernels"] = per_run[i].get("#kernels", 0.0) + 1
        ops = {op for run in per_run for op in run if op != "#kernels"}
        op_ms = {op: float(np.median([run.get(op, 0.0) for run in per_run])) for op in ops}
        kernel_ms = float(np.median([sum(v for k, v in run.items() if k != "#kernels") for run in per_run]))
        total = sum(op_ms.values())
        return {"path": str(self.path), "context": self.context, "runs": len(spans),
                "in_place_cache": self.shared, "graph_nodes": sum(self.op_counts.values()),
                "graph_op_counts": self.op_counts,
                "kernels_per_run": int(np.median([run.get("#kernels", 0) for run in per_run])),
                "model_run_ms": float(np.median([b - a for a, b in spans])) / 1e3, "kernel_ms": kernel_ms,
                "ops": {op: {"ms": ms, "share": ms / total}
                        for op, ms in sorted(op_ms.items(), key=lambda kv: -kv[1])},
                "matmulnbits": self.nbits}


def profiles(options: Options, ready: dict) -> dict:
    """Every graph profiled in one interleaved loop (a few steps of each per round), so background
    load hits them alike; ms per op type are medians over the counted steps."""
    out: dict[str, dict] = {}
    steps: dict[str, ProfiledStep] = {}
    context = CONTEXTS[-1]
    with tempfile.TemporaryDirectory(prefix="peers-prof-") as tmp:
        for engine in ("ours-baseline-fp32", "ours-fp32", "genai-fp32", "ours-baseline-int4", "ours-int4",
                       KV8, "genai-int4"):
            if engine not in ready:
                continue
            path = ready[engine][1]
            try:
                if engine.startswith("ours"):
                    from runtime.manifest import read_manifest

                    ours = read_manifest(path).decoder
                    dims = (path / ours.file.path, ours.num_kv_heads, ours.head_dim, ours.vocab_size)
                else:
                    genai_model = json.loads((path / "genai_config.json").read_text())["model"]
                    genai_decoder = genai_model["decoder"]  # GenAI's config, not our manifest
                    dims = (path / genai_decoder["filename"], genai_decoder["num_key_value_heads"],
                            genai_decoder["head_size"], genai_model["vocab_size"])
                steps[engine] = ProfiledStep(dims[0], options.threads, context, options.max_context,
                                             *dims[1:], Path(tmp))
            except Exception as err:  # noqa: BLE001 - e.g. a GenAI op this onnxruntime lacks
                out[engine] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                log(f"   {engine}: cannot profile ({out[engine]['error']})")
        log(f"   profiling {', '.join(steps)}: one decode step at context {context}, "
            f"{options.profile_runs} interleaved rounds of {ProfiledStep.BLOCK} steps per graph")
        for _ in range(options.profile_runs):
            for step in steps.values():
                for _ in range(ProfiledStep.BLOCK):
                    step.run()
        for engine, step in steps.items():
            out[engine] = step.finish()
    return {e: out[e] for e in ("ours-baseline-fp32", "ours-fp32", "genai-fp32", "ours-baseline-int4",
                                "ours-int4", KV8, "genai-int4") if e in out}


# ---------------------------------------------------------------------- report
LABELS = {"ours-fp32": "ours fp32", "ours-int4": "ours int4", "ours-fp32-mmca": "ours fp32 MMCA",
          "genai-fp32": "ONNX Runtime GenAI fp32", "genai-int4": "ONNX Runtime GenAI int4",
          "llamacpp-f32": "llama.cpp F32", "llamacpp-q4_0": "llama.cpp Q4_0",
          "ours-baseline-fp32": "ours fp32, baseline export", "ours-baseline-int4": "ours int4, baseline export",
          KV8: "ours int4, int8 KV cache", LLAMA_KV8: "llama.cpp Q4_0, Q8_0 KV cache",
          "ours-fp32-4k": "ours fp32, 4 KiB pages", "ours-int4-4k": "ours int4, 4 KiB pages",
          "genai-fp32-hugepages": "ONNX Runtime GenAI fp32, huge pages",
          "genai-int4-hugepages": "ONNX Runtime GenAI int4, huge pages"}
RATIOS = (("ours-fp32", "genai-fp32"), ("ours-fp32", "llamacpp-f32"), ("ours-int4", "genai-int4"),
          ("ours-int4", "llamacpp-q4_0"), ("ours-fp32-mmca", "ours-fp32"),
          ("ours-fp32", "ours-baseline-fp32"), ("ours-int4", "ours-baseline-int4"),
          ("ours-baseline-fp32", "genai-fp32"), ("ours-baseline-int4", "genai-int4"),
          ("ours-fp32", "ours-fp32-4k"), ("ours-int4", "ours-int4-4k"),
          ("genai-fp32-hugepages", "genai-fp32"), ("genai-int4-hugepages", "genai-int4"),
          ("ours-fp32", "genai-fp32-hugepages"), ("ours-int4", "genai-int4-hugepages"),
          (KV8, "genai-int4"), (KV8, "llamacpp-q4_0"), (KV8, "ours-int4"), (KV8, LLAMA_KV8),
          (LLAMA_KV8, "llamacpp-q4_0"))


def ratio_rows(peers: list[dict]) -> list[dict]:
    by = {p["engine"]: p for p in peers}
    rows = []
    for a, b in RATIOS:
        if a in by and b in by:
            row = {"ours": a, "other": b,
                   "tok_s_ctx64": by[a]["tok_s_ctx64"] / by[b]["tok_s_ctx64"],
                   "tok_s_ctx1024": by[a]["tok_s_ctx1024"] / by[b]["tok_s_ctx1024"],
                   "ttft_64": by[a]["ttft_ms_64"] / by[b]["ttft_ms_64"],
                   "ttft_1024": by[a]["ttft_ms_1024"] / by[b]["ttft_ms_1024"]}
            for ctx in CONTEXTS:
                paired = paired_ratio(by[a].get(f"tok_s_ctx{ctx}_rounds"), by[b].get(f"tok_s_ctx{ctx}_rounds"))
                if paired:
                    row[f"paired_tok_s_ctx{ctx}"] = paired
            rows.append(row)
    return rows


def paired_ratio(first: list[float] | None, second: list[float] | None) -> dict | None:
    """The two engines' tok/s ratio round by round: median and p10/p90 over the rounds. Each
    round runs every engine within seconds of the others, so a slow spell of the shared host
    moves both sides of a round's ratio, where it moves only one side's pooled median."""
    if not first or not second or len(first) != len(second):
        return None
    ratios = np.asarray(first) / np.asarray(second)
    return {"median": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)), "rounds": int(ratios.size)}


def markdown(report: dict) -> str:
    o = report["options"]
    loads = report["load_average"]
    lines = [f"Preset `{o['preset']}` decoder, identical weights; {o['threads']} threads per engine; "
             f"decode: {o['repeats']} runs x {o['steps']} greedy steps pooled per engine and context "
             f"(after {o['warmup']} warm-up), interleaved; top-1: {o['agreement_tokens']} teacher-forced "
             f"tokens per context against the PyTorch fp32 reference. Our export: `export.all "
             f"{o['ours_export_args'] or '(defaults)'}` (MMCA: `export.all --enable-mmca-attention "
             f"{o['ours_mmca_export_args'] or '(defaults)'}`)"
             + (f"; baseline: `export.all {o['ours_baseline_args']}`." if o.get("ours_baseline_args") is not None
                else "."),
             f"Load average (1, 5, 15 min) at start {loads['start']}, at end {loads['end']}; 1-min load "
             f"per timed round: median {loads['rounds_median']:.2f}, max {loads['rounds_max']:.2f}.", "",
             "| engine | tok/s ctx 64 | tok/s ctx 1024 | TTFT 64 / 1024 tokens (ms) | "
             "top-1 /" + str(o["agreement_tokens"]) + " (ctx 64, 1024) | peak RSS (MB) | model (MB) |",
             "|---|---|---|---|---|---|---|"]
    n = o["agreement_tokens"]
    for p in report["peers"]:
        lines.append(f"| {LABELS.get(p['engine'], p['engine'])} (`{p['engine']}`) | {p['tok_s_ctx64']:.0f} | "
                     f"{p['tok_s_ctx1024']:.0f} | {p['ttft_ms_64']:.0f} / {p['ttft_ms_1024']:.0f} | "
                     f"{round(p['top1_agreement_ctx64'] * n)}, {round(p['top1_agreement_ctx1024'] * n)} | "
                     f"{p['peak_rss_mb']:.0f} | {p['model_mb']:.0f} |")
    for engine, reason in report["skipped"].items():
        lines.append(f"| {LABELS.get(engine, engine)} (`{engine}`) | skipped: {reason} | | | | | |")
    if report["ratios"]:
        lines += ["", "| ratio (first / second) | tok/s ctx 64 | tok/s ctx 1024 | TTFT 64 | TTFT 1024 | "
                  "tok/s ctx 64 / 1024, paired by round: median (p10-p90) |",
                  "|---|---|---|---|---|---|"]
        for r in report["ratios"]:
            paired = " / ".join(f"{q['median']:.2f}x ({q['p10']:.2f}-{q['p90']:.2f})"
                                for q in (r.get(f"paired_tok_s_ctx{ctx}") for ctx in CONTEXTS) if q)
            lines.append(f"| `{r['ours']}` / `{r['other']}` | {r['tok_s_ctx64']:.2f}x | {r['tok_s_ctx1024']:.2f}x | "
                         f"{r['ttft_64']:.2f}x | {r['ttft_1024']:.2f}x | {paired or '—'} |")
    if report.get("profiles"):
        lines += ["", profile_markdown(report["profiles"])]
    return "\n".join(lines)


def profile_markdown(profiles: dict) -> str:
    ok = {e: p for e, p in profiles.items() if "error" not in p}
    lines = []
    if ok:
        ctx = next(iter(ok.values()))["context"]
        head = " | ".join(f"`{e}`" for e in ok)
        lines += [f"One decode step at context {ctx}, ONNX Runtime profiler (plain onnxruntime, "
                  "IO binding; ms per run, share of kernel time):", "",
                  f"| | {head} |", "|---" * (len(ok) + 1) + "|"]
        lines.append("| graph nodes (file) | " + " | ".join(str(p["graph_nodes"]) for p in ok.values()) + " |")
        lines.append("| kernels per run (after ORT's fusions) | "
                     + " | ".join(str(p["kernels_per_run"]) for p in ok.values()) + " |")
        lines.append("| model_run (ms) | " + " | ".join(f"{p['model_run_ms']:.2f}" for p in ok.values()) + " |")
        lines.append("| kernels (ms) | " + " | ".join(f"{p['kernel_ms']:.2f}" for p in ok.values()) + " |")
        ops: dict[str, float] = {}
        for p in ok.values():
            for op, v in p["ops"].items():
                ops[op] = max(ops.get(op, 0.0), v["ms"])
        for op in sorted(ops, key=lambda k: -ops[k]):
            cells = [f"{p['ops'][op]['ms']:.3f} ({p['ops'][op]['share']:.0%})" if op in p["ops"] else "—"
                     for p in ok.values()]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    for engine, p in profiles.items():
        if "error" in p:
            lines.append(f"\n`{engine}`: not profiled ({p['error']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def run(options: Options) -> dict:
    import torch

    from dsvl.loading import WeightSource, load_model

    torch.set_num_threads(options.threads)
    start_load = load_average()
    report: dict = {"options": asdict(options)}
    if start_load[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {start_load[0]:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU; timings will be noisy (interleaving spreads it over all engines)")
    keep = options.work is not None
    work = Path(options.work) if keep else Path(tempfile.mkdtemp(prefix="dsvl-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log("== reference (PyTorch, dsvl/) and builds")
        model, tokenizer, _ = load_model(WeightSource(preset=options.preset, seed=options.seed))
        decoder = model.lang_decoder.eval()
        rng = np.random.default_rng(options.seed)
        # Random ids among the base vocabulary's ordinary tokens (no BOS/EOS/DSVL specials).
        prompts = {ctx: [int(i) for i in rng.integers(3, decoder.config.vocab_size - 3, ctx)]
                   for ctx in CONTEXTS}
        references = {"plain": {ctx: reference_tokens(decoder, prompts[ctx], options.agreement_tokens)
                                for ctx in CONTEXTS}}
        if "ours-fp32-mmca" in options.engines:
            mmca_model, _, _ = load_model(WeightSource(preset=options.preset, seed=options.seed,
                                                       enable_mmca_attention=True))
            references["mmca"] = {ctx: reference_tokens(mmca_model.lang_decoder.eval(), prompts[ctx],
                                                        options.agreement_tokens) for ctx in CONTEXTS}
            del mmca_model
        ready, builds, skipped = build_engines(options, work, model, tokenizer)
        if (work / "hf").is_dir() and any(not e.startswith("ours-") for e in ready):
            report["hf_dir_max_abs_logits_diff"] = diff = check_hf_dir(work / "hf", decoder, prompts[64])
            log(f"   transformers LlamaForCausalLM on the HF directory vs dsvl/: max |logits diff| {diff:.2e}")
            if not diff < 1e-3:
                raise SystemExit(f"the Hugging Face directory {work / 'hf'} does not hold the dsvl/ decoder "
                                 f"(max |logits diff| {diff:.3g}): the peers would not run our weights")
        del model, decoder
        report["builds"] = builds
        if options.build_only:
            report |= {"ready": {e: str(v[1]) for e, v in ready.items()}, "skipped": skipped}
            return report
        log("== measuring")
        measured = measure(options, ready, work, prompts, references)
        skipped |= measured["failed"]
        report["peers"] = [measured["results"][e] for e in options.engines if e in measured["results"]]
        report["skipped"] = {e: skipped[e] for e in options.engines if e in skipped}
        report["ratios"] = ratio_rows(report["peers"])
        rounds = measured["loads_1min_per_round"]
        if options.profile:
            log("== per-op profiles")
            report["profiles"] = profiles(options, ready)
        report["load_average"] = {"start": start_load, "end": load_average(),
                                  "rounds_1min": [round(x, 2) for x in rounds],
                                  "rounds_median": float(np.median(rounds)) if rounds else float("nan"),
                                  "rounds_max": float(max(rounds)) if rounds else float("nan")}
        report["machine"] = machine(options)
        report["reference_tokens"] = references
        report["work_dir"] = str(work) if keep else None
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


def machine(options: Options) -> dict:
    import platform

    import onnxruntime

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "peers_python": options.peers_python}
    for module in ("onnxruntime_genai", "llama_cpp"):
        try:
            proc = subprocess.run([options.peers_python, "-c", f"import {module}; print({module}.__version__)"],
                                  capture_output=True, text=True, timeout=300)
            info[module] = proc.stdout.strip() if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            info[module] = None
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench_peers.py",
        description="Decode tok/s, time to first token, teacher-forced top-1 agreement and peak RSS "
                    "of our ONNX Runtime decoder against ONNX Runtime GenAI and llama.cpp, on the "
                    "preset's decoder weights, in one interleaved run. Markdown on stdout.")
    parser.add_argument("--preset", default="small", help="model shapes (default: small)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {', '.join(ENGINES)} (default: all); also "
                             f"{', '.join(PAGE_VARIANTS)}: the same builds with the other page size "
                             "under the weights (ours on 4 KiB pages; GenAI's moved onto huge pages "
                             "as ours are); ours-int4-kv8: ours-int4 with an int8 KV cache; "
                             "llamacpp-q4_0-kv8: llama.cpp's Q4_0 with a Q8_0 KV cache")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--steps", type=int, default=64, help="greedy steps per decode run (default 64)")
    parser.add_argument("--repeats", type=int, default=11, help="timed decode runs per engine and context (default 11)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed decode runs first (default 1)")
    parser.add_argument("--settle", type=float, default=0.25, metavar="S",
                        help="idle seconds before each decode run, so the previous engine's threads "
                             "have stopped (default 0.25)")
    parser.add_argument("--agreement-tokens", type=int, default=32,
                        help="teacher-forced tokens per context for top-1 agreement (default 32)")
    parser.add_argument("--max-context", type=int, default=2048,
                        help="every engine's context / KV cache size (default 2048)")
    parser.add_argument("--ours-export-args", default=DEFAULT_OURS_ARGS,
                        help="extra arguments of our `export.all` for ours-fp32 and ours-int4, one "
                             "string (default: none, export.all's defaults: the fused graph with the "
                             "in-place cache; e.g. \"--decoder-graph traced --kv-cache shared\")")
    parser.add_argument("--ours-mmca-export-args", default=DEFAULT_MMCA_ARGS,
                        help="extra arguments of `export.all --enable-mmca-attention` for ours-fp32-mmca "
                             "(default: none, the fused graph with the in-place cache; e.g. "
                             "\"--kv-cache concat\": MMCA's standard attention over a concat cache)")
    parser.add_argument("--ours-baseline-args", metavar="ARGS",
                        help=f"also measure our export with these arguments instead, as {' and '.join(BASELINE)} "
                             "(e.g. \"--decoder-graph traced --kv-cache shared\": the graph before the fused "
                             "builder); with the default --engines they join the run")
    parser.add_argument("--ours-quantize-args", default="", metavar="ARGS",
                        help="extra arguments of our `export.quantize` for ours-int4, one string "
                             "(e.g. \"--lm-head-bits 4\")")
    parser.add_argument("--ours-baseline-quantize-args", default="", metavar="ARGS",
                        help="the same for ours-baseline-int4 (with --ours-baseline-args \"\" the two "
                             "int4 engines differ only in these)")
    parser.add_argument("--peers-python", default=sys.executable,
                        help="Python that has onnxruntime_genai / llama_cpp (another venv is fine: the "
                             "peers run in subprocesses; default: this one)")
    parser.add_argument("--llama-cpp-convert", metavar="PATH",
                        help=f"llama.cpp's convert_hf_to_gguf.py (default: ${CONVERT_ENV})")
    parser.add_argument("--work", metavar="DIR",
                        help="keep builds and logs here; a build whose command is unchanged is reused "
                             "(default: a temporary directory, removed)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one decode step at context 1024 per op (ONNX Runtime profiler) "
                             "for our graphs and GenAI's model.onnx")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    parser.add_argument("--build-only", action="store_true",
                        help="build the engines (into --work) and stop: a later run with the same --work "
                             "reuses them")
    # Internal: one engine's worker process.
    parser.add_argument("--worker", choices=sorted(WORKER_KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--pages", choices=("4k", "huge"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    known = ENGINES + tuple(PAGE_VARIANTS) + (KV8, LLAMA_KV8) + (BASELINE if args.ours_baseline_args is not None else ())
    unknown = [e for e in engines if e not in known]
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(unknown)} (choose from {', '.join(known)}; "
                         f"{', '.join(BASELINE)} need --ours-baseline-args)")
    if args.ours_baseline_args is not None and args.engines == ",".join(ENGINES):
        engines = engines + BASELINE
    if args.settle < 0:
        raise SystemExit(f"--settle {args.settle}: seconds of pause, 0 or more")
    return Options(preset=args.preset, threads=args.threads, engines=engines, steps=args.steps,
                   repeats=args.repeats, warmup=args.warmup, settle=args.settle,
                   agreement_tokens=args.agreement_tokens,
                   max_context=args.max_context, ours_export_args=args.ours_export_args,
                   ours_mmca_export_args=args.ours_mmca_export_args,
                   ours_baseline_args=args.ours_baseline_args, peers_python=args.peers_python,
                   ours_quantize_args=args.ours_quantize_args,
                   ours_baseline_quantize_args=args.ours_baseline_quantize_args,
                   llama_cpp_convert=args.llama_cpp_convert, work=args.work, profile=args.profile,
                   seed=args.seed, build_only=args.build_only)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.model, args.threads, args.max_context, args.pages)
    options = options_from(args)
    start = time.perf_counter()
    report = run(options)
    report["bench_s"] = time.perf_counter() - start
    if options.build_only:
        print(json.dumps({k: report[k] for k in ("ready", "skipped", "builds")}, indent=2))
        return 0
    table = markdown(report)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report | {"markdown": table}, indent=2))
        log(f"wrote {args.json}")
    log(f"bench_peers took {report['bench_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
