"""PyTorch eager fp32 vs the ONNX Runtime CPU runtime (fp32, int4, int8): one run, same weights
and inputs.

    python scripts/bench.py --preset small --json /tmp/bench_small.json
    python scripts/bench.py --quick            # tiny preset, few repeats: a smoke run
    python scripts/bench.py --preset small --peers --json PATH   # + ONNX Runtime GenAI and llama.cpp

PyTorch is the dsvl/ reference (``model.encode_images``; the decoder with its own KV cache,
stepped as dsvl/generate.py does). ONNX Runtime is ``runtime.pipeline.Pipeline`` on an
``export.all`` export written to a temporary directory (export time measured), and on the
``export.quantize`` copies of it. Both sides use the same thread count (all cores): the bench sets
``torch.set_num_threads`` and ORT's ``intra_op_num_threads`` to it. Timed repeats of the two
sides are interleaved, so a change in background load hits both alike. Progress goes to stderr;
the markdown tables go to stdout; ``--json`` writes every raw figure and the top-level ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import torch  # noqa: E402

import runtime.pipeline as rp  # noqa: E402
from dsvl.config import PRESETS, VIS_PROJS  # noqa: E402
from dsvl.generate import SamplingConfig, generate, position_ids_for  # noqa: E402
from dsvl.loading import WeightSource, load_model, load_vision  # noqa: E402
from export import all as export_all  # noqa: E402
from export import quantize as q  # noqa: E402
from export import vision as export_vision  # noqa: E402
from export.common import DEFAULT_OPSET, Progress  # noqa: E402
from runtime import contract as c  # noqa: E402
from runtime.backends.ort import OrtVisionRunner  # noqa: E402
from runtime.prompt import format_round  # noqa: E402
from runtime.sampling import SamplingOptions  # noqa: E402

QUESTION = "Describe the image in detail."
CONTEXTS = (64, 1024)
# The quantized decoders measured: name -> (bits, MatMulNBits accuracy_level). "int4" is what
# `python -m export.quantize --bits 4` writes by default.
QUANTIZED = {"int4": (4, q.DEFAULT_ACCURACY_LEVEL), "int4-acc0": (4, 0), "int8": (8, q.DEFAULT_ACCURACY_LEVEL)}
TARGETS = {  # name -> (ratio key, comparison, threshold, what it means)
    "vision": ("vision_latency_ratio", "<=", 0.7, "ORT vision latency <= 0.7x PyTorch (1 image, perceiver)"),
    "decode": ("decode_speedup", ">=", 1.5, "ORT decode tok/s >= 1.5x PyTorch (ctx 64)"),
    "int4_speed": ("int4_speedup", ">=", 3.0, "int4 tok/s >= 3x fp32 ORT (ctx 64)"),
    "int4_agreement": ("int4_top1_agreement", ">=", 0.95, "int4 top-1 agreement >= 95% (teacher forcing)"),
    "context": ("ctx1024_over_ctx64", "<=", 1.3, "ORT decode step at ctx 1024 <= 1.3x ctx 64"),
    "python": ("python_overhead_fraction", "<=", 0.05, "Python outside the session <= 5% of a decode step"),
}


@dataclass
class Settings:
    preset: str
    repeats: int  # timed repeats of vision and time-to-first-token, after `warmup`
    warmup: int
    decode_runs: int  # prompt pass + `decode_steps` steps, per context and backend
    decode_steps: int
    agreement_tokens: int  # teacher-forced greedy tokens for the quantized decoders
    bandwidth_mb: int  # size of the array copied to measure memory bandwidth
    threads: int
    profile: bool = False  # per-op profiles of decode steps and the prompt pass
    kv_cache: str = "concat"  # the decoder export's KV cache: concat or shared (in place)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Time each function ``repeats`` times, alternating between them, after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: summary(t) for name, t in times.items()}


# ------------------------------------------------------------------ machine
def machine_info(threads: int) -> dict:
    import onnxruntime
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("flags")), [])
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags],
            "memory_gb": round(mem_kb / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__, "load_average_start": os.getloadavg()[0],
            "thread_note": f"torch.set_num_threads({threads}); ONNX Runtime intra_op_num_threads={threads}"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def memory_bandwidth(megabytes: int, tries: int = 7) -> dict:
    """Best-of-N numpy copy of a large array; bytes read + bytes written over the time."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return {"gb_per_s": 2 * src.nbytes / best / 1e9, "array_mb": megabytes, "tries": tries,
            "method": "np.copyto, best of tries, (read + written bytes) / time, one thread"}


def decoder_weight_bytes(path: Path) -> int:
    """Bytes of the weights one decode step reads: every MatMul's constant weight (the linear
    layers and the LM head) in the file's dtype, or MatMulNBits' packed weights + scales."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            total += sum(sizes.get(name, 0) for name in node.input)
        elif node.op_type == q.METHOD:
            total += sum(sizes.get(name, 0) for name in node.input[1:])
    return total


# ------------------------------------------------------------------ exports
def make_exports(settings: Settings, work: Path) -> dict:
    """export.all (perceiver) + vision-only exports of the other projectors + quantized copies."""
    out: dict = {"dirs": {}, "vision_files": {}, "torch_vision": {}, "export_s": {}}
    art = work / "artifacts"
    start = time.perf_counter()
    if export_all.main(["--preset", settings.preset, "--kv-cache", settings.kv_cache,
                        "--out", str(art)]) != 0:
        raise SystemExit("export.all failed its parity check")
    out["export_s"]["export.all (perceiver)"] = time.perf_counter() - start
    out["dirs"]["fp32"] = art
    out["vision_files"]["perceiver"] = art / c.VISION_FILE
    for vis_proj in VIS_PROJS:
        if vis_proj == "perceiver":
            continue
        start = time.perf_counter()
        module, loaded = load_vision(WeightSource(preset=settings.preset, vis_proj=vis_proj))
        stage = work / f"vision-{vis_proj}"
        stage.mkdir()
        result = export_vision.export_vision(module, loaded, stage, "fp32", DEFAULT_OPSET, False, 0,
                                             Progress(total=2))
        if not result.ok:
            raise SystemExit(f"export.vision ({vis_proj}) failed its parity check")
        out["export_s"][f"export.vision ({vis_proj})"] = time.perf_counter() - start
        out["vision_files"][vis_proj] = stage / c.VISION_FILE
        out["torch_vision"][vis_proj] = module.eval()
    for name, (bits, level) in QUANTIZED.items():
        start = time.perf_counter()
        target = work / f"artifacts-{name}"
        q.quantize_artifacts(art, target, bits, q.DEFAULT_BLOCK_SIZE, level, False, 0, Progress(total=2))
        out["export_s"][f"export.quantize ({name})"] = time.perf_counter() - start
        out["dirs"][name] = target
    return out


# ------------------------------------------------------------------ vision and first token
def bench_vision(settings: Settings, exports: dict, model, pipe: rp.Pipeline, size: int) -> dict:
    results = {}
    rng = np.random.default_rng(0)
    for vis_proj in VIS_PROJS:
        if vis_proj == "perceiver":
            torch_vision, ort_vision = model.vision().eval(), pipe.vision
        else:
            torch_vision = exports["torch_vision"][vis_proj]
            ort_vision = OrtVisionRunner(exports["vision_files"][vis_proj], threads=settings.threads)
        results[vis_proj] = {}
        for images in (1, 4):
            pixels = rng.standard_normal((images, 3, size, size)).astype(np.float32)
            pixels_t = torch.from_numpy(pixels)
            with torch.no_grad():
                want = torch_vision(pixels_t).numpy()
            err = float(np.abs(ort_vision.encode(pixels) - want).max())

            def run_torch(vision=torch_vision, px=pixels_t):
                with torch.no_grad():
                    return vision(px)

            timing = interleaved({"pytorch": run_torch,
                                  "ort": functools.partial(ort_vision.encode, pixels)},
                                 settings.repeats, settings.warmup)
            timing["ratio"] = timing["ort"]["median_ms"] / timing["pytorch"]["median_ms"]
            timing["max_abs_err"] = err
            results[vis_proj][str(images)] = timing
            log(f"      vision {vis_proj} x{images}: PyTorch {timing['pytorch']['median_ms']:.1f} ms, "
                f"ORT {timing['ort']['median_ms']:.1f} ms (max|err| {err:.1e})")
    return results


def bench_first_token(settings: Settings, model, pipes: dict[str, rp.Pipeline], ids: list[int],
                      pixels: np.ndarray) -> dict:
    """Vision + splice + prompt pass, to the first token's logits (preprocessing excluded)."""
    decoder = model.lang_decoder
    ids_t, pixels_t = torch.tensor(ids), torch.from_numpy(pixels)

    @torch.no_grad()
    def run_torch():
        embeds, mask = model.splice(ids_t, model.encode_images(pixels_t))
        logits, _ = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
        return int(logits[0, -1].argmax())

    def run_ort(pipe: rp.Pipeline):
        embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
        pipe.reset()
        return int(np.argmax(pipe.prefill(embeds, mask)))

    fns = {"pytorch": run_torch} | {name: functools.partial(run_ort, p) for name, p in pipes.items()}
    result = interleaved(fns, settings.repeats, settings.warmup)
    result["prompt_positions"] = len(ids) - 1 + int(pipes["fp32"].artifacts.vision["image_tokens"])
    return result


# ------------------------------------------------------------------ decode
@contextlib.contextmanager
def no_eos(pipe: rp.Pipeline) -> Iterator[None]:
    """Every run decodes exactly the steps asked for (random weights may pick EOS)."""
    eos = pipe.tokenizer.eos_token_id
    pipe.tokenizer.eos_token_id = -1
    try:
        yield
    finally:
        pipe.tokenizer.eos_token_id = eos


@contextlib.contextmanager
def session_timer(pipe: rp.Pipeline) -> Iterator[list[float]]:
    """Durations of every ``run_with_iobinding`` call of the decoder's session."""
    session = pipe.decoder.session
    durations: list[float] = []
    inner = session.run_with_iobinding

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - start)

    session.run_with_iobinding = timed
    try:
        yield durations
    finally:
        del session.run_with_iobinding


@contextlib.contextmanager
def step_clock(pipe: rp.Pipeline) -> Iterator[list[float]]:
    """Start times of every decoder.forward call: consecutive differences are whole decode steps
    (forward, sampling, the loop's bookkeeping)."""
    decoder = pipe.decoder
    starts: list[float] = []
    inner = decoder.forward

    def clocked(*args, **kwargs):
        starts.append(time.perf_counter())
        return inner(*args, **kwargs)

    decoder.forward = clocked
    try:
        yield starts
    finally:
        del decoder.forward


def ort_decode_run(pipe: rp.Pipeline, embeds: np.ndarray, steps: int) -> dict:
    """Prompt pass of len(embeds) positions, then ``steps`` greedy steps through Pipeline.decode."""
    pipe.reset()
    first = pipe.prefill(embeds, np.ones((1, embeds.shape[1]), np.int64))
    with no_eos(pipe), session_timer(pipe) as session_s, step_clock(pipe) as starts:
        start = time.perf_counter()
        tokens, _ = pipe.decode(first, SamplingOptions(max_new_tokens=steps + 1))
        total = time.perf_counter() - start
    assert len(tokens) - 1 == steps == len(session_s)
    ends = starts[1:] + [start + total]
    return {"step_s": [b - a for a, b in zip(starts, ends, strict=True)], "decode_s": total,
            "session_s": sum(session_s)}


@torch.no_grad()
def torch_decode_run(model, ids: torch.Tensor, steps: int) -> dict:
    """The reference loop of dsvl/generate.py, each step timed."""
    decoder = model.lang_decoder
    mask = torch.ones(1, len(ids), dtype=torch.long)
    logits, past = decoder(model.lang_embed(ids)[None], mask, position_ids_for(mask), decoder.empty_cache())
    token = int(logits[0, -1].argmax())
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        mask = torch.cat([mask, torch.full((1, 1), c.MASK_TEXT, dtype=torch.long)], dim=1)
        step_embeds = decoder.model.embed_tokens(torch.tensor([[token]]))
        logits, past = decoder(step_embeds, mask, position_ids_for(mask)[:, -1:], past)
        token = int(logits[0, -1].argmax())
        step_s.append(time.perf_counter() - start)
    return {"step_s": step_s, "decode_s": sum(step_s)}


def bench_decode(settings: Settings, model, pipes: dict[str, rp.Pipeline], context: int,
                 backends: list[str]) -> dict:
    """Decode step times after a prompt pass of ``context`` positions (random token ids, embedded
    with the prompt table by both sides), runs interleaved across backends."""
    ids = np.random.default_rng(context).integers(0, pipes["fp32"].artifacts.decoder["vocab_size"], context)
    embeds = np.asarray(pipes["fp32"].artifacts.prompt_embeddings[ids], np.float32)[None]
    runs: dict[str, list[dict]] = {name: [] for name in backends}
    for _ in range(settings.decode_runs):
        for name in backends:
            if name == "pytorch":
                runs[name].append(torch_decode_run(model, torch.from_numpy(ids), settings.decode_steps))
            else:
                runs[name].append(ort_decode_run(pipes[name], embeds, settings.decode_steps))
    result = {}
    for name, items in runs.items():
        steps = [s for run in items for s in run["step_s"]]
        entry = summary(steps) | {"tokens_per_s": 1e3 / float(np.median(np.asarray(steps) * 1e3))}
        if name != "pytorch":
            decode_s = sum(run["decode_s"] for run in items)
            entry["session_ms_per_step"] = 1e3 * sum(run["session_s"] for run in items) / len(steps)
            entry["python_overhead_fraction"] = 1 - sum(run["session_s"] for run in items) / decode_s
        result[name] = entry
    log("      decode ctx " + str(context) + ": " + ", ".join(
        f"{name} {entry['median_ms']:.1f} ms/token" for name, entry in result.items()))
    return result


# ------------------------------------------------------------------ quantized agreement
class ForcedSampler:
    """Stands in for runtime.sampling.Sampler: records each step's logits and returns the
    reference's token, so Pipeline.decode runs teacher-forced."""

    def __init__(self, tokens: list[int], record: list[np.ndarray]):
        self.tokens, self.record = tokens, record

    def __call__(self, logits: np.ndarray, generated: list[int]) -> int:
        self.record.append(np.array(logits, np.float32))
        return self.tokens[len(generated)]


def teacher_forced_logits(pipe: rp.Pipeline, ids: list[int], pixels: np.ndarray,
                          tokens: list[int]) -> np.ndarray:
    embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
    pipe.reset()
    first = pipe.prefill(embeds, mask)
    record: list[np.ndarray] = []
    original = rp.Sampler
    rp.Sampler = lambda options: ForcedSampler(tokens, record)
    try:
        with no_eos(pipe):
            pipe.decode(first, SamplingOptions(max_new_tokens=len(tokens)))
    finally:
        rp.Sampler = original
    return np.stack(record)


def bench_agreement(settings: Settings, model, pipes: dict[str, rp.Pipeline], ids: list[int],
                    pixels: np.ndarray) -> dict:
    """Greedy tokens of the PyTorch fp32 reference, fed step by step into each ORT decoder."""
    ref = generate(model, torch.tensor(ids), torch.from_numpy(pixels),
                   SamplingConfig(max_new_tokens=settings.agreement_tokens))
    want = torch.stack([ref.prompt_logits[-1], *ref.step_logits]).numpy()
    results = {}
    for name, pipe in pipes.items():
        got = teacher_forced_logits(pipe, ids, pixels, ref.tokens)
        err = np.abs(got - want)
        results[name] = {"top1_agreement": float(np.mean(got.argmax(-1) == np.asarray(ref.tokens))),
                         "logits_max_abs_err": float(err.max()), "logits_mean_abs_err": float(err.mean()),
                         "reference_logits_max_abs": float(np.abs(want).max()), "tokens": len(ref.tokens)}
        log(f"      {name}: top-1 agreement {results[name]['top1_agreement']:.1%}, "
            f"logits max|err| {results[name]['logits_max_abs_err']:.3g}")
    top2 = np.sort(want, axis=-1)[:, -2:]
    results["reference_top1_margin_median"] = float(np.median(top2[:, 1] - top2[:, 0]))
    return results


# ------------------------------------------------------------------ memory
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
HIGH_WATER = """
def peak_rss_mb():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) / 1024
"""
PEAK_RSS_ORT = HIGH_WATER + """
import json, sys
import numpy as np
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions
pipe = Pipeline.from_artifacts(sys.argv[1], threads=int(sys.argv[2]))
size = pipe.artifacts.vision["image_size"]
image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
pipe.generate([image], sys.argv[3], SamplingOptions(max_new_tokens=32))
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}))
"""
PEAK_RSS_TORCH = HIGH_WATER + """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from dsvl.generate import SamplingConfig, generate
from dsvl.loading import WeightSource, load_model
from runtime.prompt import format_round
model, tokenizer, loaded = load_model(WeightSource(preset=sys.argv[1]))
ids = torch.tensor(tokenizer(format_round(sys.argv[3], 1)).input_ids)
size = loaded.config.image_size
generate(model, ids, torch.randn(1, 3, size, size), SamplingConfig(max_new_tokens=32))
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def peak_rss(script: str, *args: str) -> dict:
    """Peak RSS of a fresh process that loads one backend and answers a one-image prompt."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak RSS child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ where the time goes
def profile_ort(path: Path, decoder: dict, threads: int, past: int, seq: int, runs: int) -> dict:
    """ONNX Runtime's op profiler on ``runs`` calls of one shape (runtime's session options):
    kernel time per op type, the heaviest nodes, and the time between kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="dsvl-prof-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        cache = (1, decoder["num_kv_heads"], past, decoder["head_dim"])
        feeds = {c.INPUTS_EMBEDS: rng.standard_normal((1, seq, decoder["hidden_size"])).astype(np.float32),
                 c.ATTENTION_MASK: np.ones((1, past + seq), np.int64),
                 c.POSITION_IDS: np.arange(past, past + seq, dtype=np.int64)[None]}
        for i in range(decoder["num_layers"]):
            feeds[c.past_key_name(i)] = rng.standard_normal(cache).astype(np.float32)
            feeds[c.past_value_name(i)] = rng.standard_normal(cache).astype(np.float32)
        for _ in range(runs + 2):
            session.run([c.LOGITS], feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][2:]
    ops: dict[str, float] = {}
    nodes: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            ops[op] = ops.get(op, 0.0) + e["dur"]
            node = e["name"].removesuffix("_kernel_time")
            nodes[node] = nodes.get(node, 0.0) + e["dur"]
    scale = 1e-3 / (runs + 2)  # us summed over all runs -> ms per run
    kernel_ms = sum(ops.values()) * scale
    run_ms = float(np.median(model_runs)) / 1e3
    top = sorted(ops.items(), key=lambda kv: -kv[1])
    return {"past": past, "seq": seq, "model_run_ms": run_ms, "kernel_ms": kernel_ms,
            "ops_ms": {op: us * scale for op, us in top},
            "top_nodes_ms": {n: us * scale for n, us in sorted(nodes.items(), key=lambda kv: -kv[1])[:8]},
            "kernels": sum(1 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
            // (runs + 2)}


@torch.no_grad()
def profile_torch_step(model, context: int, runs: int) -> dict:
    """torch.profiler on decode steps of the reference decoder: self CPU time per aten op."""
    decoder = model.lang_decoder
    mask = torch.ones(1, context + 1, dtype=torch.long)
    embeds = torch.randn(1, context, decoder.config.hidden_size)
    _, past = decoder(embeds, mask[:, :-1], torch.arange(context)[None], decoder.empty_cache())
    step = torch.randn(1, 1, decoder.config.hidden_size)
    positions = torch.tensor([[context]])
    decoder(step, mask, positions, past)
    with torch.profiler.profile() as prof:
        for _ in range(runs):
            decoder(step, mask, positions, past)
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
    return {"context": context, "ops_ms": {r.key: r.self_cpu_time_total / 1e3 / runs for r in rows[:10]},
            "total_ms": sum(r.self_cpu_time_total for r in rows) / 1e3 / runs}


def bench_profiles(settings: Settings, model, exports: dict, pipes: dict, prompt_positions: int) -> dict:
    runs = 3 if settings.preset == "tiny" else 10
    decoder = pipes["fp32"].artifacts.decoder
    out = {}
    for name in ("fp32", "int4"):
        path = exports["dirs"][name] / c.DECODER_FILE
        for context in CONTEXTS:
            out[f"ort_{name}_decode_ctx{context}"] = profile_ort(path, decoder, settings.threads, context, 1, runs)
        out[f"ort_{name}_prefill"] = profile_ort(path, decoder, settings.threads, 0, prompt_positions, 2)
    for context in CONTEXTS:
        out[f"pytorch_decode_ctx{context}"] = profile_torch_step(model, context, runs)
    return out


def profile_markdown(profiles: dict) -> str:
    lines = ["", "", "| op profile (ms per run; the profiler adds ~5-8 us per kernel) | run | "
             "kernels (sum) | top op types |", "|---|---|---|---|"]
    for name, p in profiles.items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p["ops_ms"].items())[:5])
        run = f"{p['model_run_ms']:.2f}" if "model_run_ms" in p else f"{p['total_ms']:.2f}"
        kernels = f"{p['kernel_ms']:.2f} ({p['kernels']} kernels)" if "kernel_ms" in p else "—"
        lines.append(f"| {name} | {run} | {kernels} | {top} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def ratios(report: dict) -> dict:
    decode64 = report["decode"]["ctx64"]
    ctx1024 = report["decode"]["ctx1024"]["fp32"]["median_ms"] / decode64["fp32"]["median_ms"]
    return {
        "vision_latency_ratio": report["vision"]["perceiver"]["1"]["ratio"],
        "decode_speedup": decode64["fp32"]["tokens_per_s"] / decode64["pytorch"]["tokens_per_s"],
        "int4_speedup": decode64["int4"]["tokens_per_s"] / decode64["fp32"]["tokens_per_s"],
        "int4_top1_agreement": report["agreement"]["int4"]["top1_agreement"],
        "ctx1024_over_ctx64": ctx1024,
        "python_overhead_fraction": decode64["fp32"]["python_overhead_fraction"],
        "bandwidth_fraction": report["floor"]["fp32"]["bandwidth_fraction"],
    }


def target_rows(report: dict) -> dict:
    rows = {}
    for name, (key, op, threshold, text) in TARGETS.items():
        value = report[key]
        met = value <= threshold if op == "<=" else value >= threshold
        rows[name] = {"target": text, "ratio_key": key, "value": value, "threshold": threshold, "met": met}
    return rows


def _ms(entry: dict) -> str:
    return f"{entry['median_ms']:.1f} [{entry['p10_ms']:.1f}–{entry['p90_ms']:.1f}]"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    backends = ["pytorch", "fp32", "int4"]
    head = ["| measure | PyTorch eager fp32 | ORT CPU fp32 | ORT CPU int4 | ORT fp32 / PyTorch |",
            "|---|---|---|---|---|"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), {m['memory_gb']} GB; "
             f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}.",
             f"Threads: {m['thread_note']}. Load average {m['load_average_start']:.2f} at start, "
             f"{m['load_average_end']:.2f} at end.",
             f"Preset `{s['preset']}` (seeded random weights); times in ms: median [p10–p90] over "
             f"{s['repeats']} repeats after {s['warmup']} warm-up (decode: {s['decode_runs']} runs x "
             f"{s['decode_steps']} steps). Decoder KV cache: `{s['kv_cache']}`.", ""] + head
    for vis_proj, sizes in report["vision"].items():
        for images, entry in sizes.items():
            lines.append(f"| vision + projector `{vis_proj}`, {images} image(s) | {_ms(entry['pytorch'])} | "
                         f"{_ms(entry['ort'])} | (same vision.onnx) | {entry['ratio']:.2f}x |")
    ttft = report["ttft"]
    lines.append(f"| time to first token, 1 image ({ttft['prompt_positions']} positions) | "
                 + " | ".join(_ms(ttft[b]) for b in backends)
                 + f" | {ttft['fp32']['median_ms'] / ttft['pytorch']['median_ms']:.2f}x |")
    for context in CONTEXTS:
        d = report["decode"][f"ctx{context}"]
        cells = [f"{d[b]['median_ms']:.1f} ms = {d[b]['tokens_per_s']:.1f} tok/s" if b in d else "—"
                 for b in backends]
        lines.append(f"| decode step, context {context} | " + " | ".join(cells)
                     + f" | {d['fp32']['tokens_per_s'] / d['pytorch']['tokens_per_s']:.2f}x tok/s |")
    d64 = report["decode"]["ctx64"]
    lines.append("| Python outside the session, ctx 64 decode step | — | "
                 f"{d64['fp32']['python_overhead_fraction']:.1%} | {d64['int4']['python_overhead_fraction']:.1%} | |")
    floor = report["floor"]
    lines.append(f"| decoder weights read per token (MB) | {floor['fp32']['weight_mb']:.1f} | "
                 f"{floor['fp32']['weight_mb']:.1f} | {floor['int4']['weight_mb']:.1f} | |")
    lines.append(f"| bandwidth floor per token (ms) at {report['bandwidth']['gb_per_s']:.1f} GB/s | "
                 f"{floor['fp32']['floor_ms']:.2f} | {floor['fp32']['floor_ms']:.2f} | {floor['int4']['floor_ms']:.2f} | |")
    lines.append(f"| floor / measured step (ctx 64) | {floor['pytorch']['bandwidth_fraction']:.1%} | "
                 f"{floor['fp32']['bandwidth_fraction']:.1%} | {floor['int4']['bandwidth_fraction']:.1%} | |")
    agree = report["agreement"]
    lines.append(f"| top-1 agreement with PyTorch, {agree['int4']['tokens']} teacher-forced tokens | "
                 f"(reference) | {agree['fp32']['top1_agreement']:.1%} | {agree['int4']['top1_agreement']:.1%} | |")
    lines.append(f"| logits max abs error vs PyTorch | — | {agree['fp32']['logits_max_abs_err']:.2g} | "
                 f"{agree['int4']['logits_max_abs_err']:.2g} | |")
    mem = report["memory"]
    lines.append(f"| peak RSS, fresh process, 1-image prompt + 32 tokens (MB) | {mem['pytorch']['peak_rss_mb']:.0f} | "
                 f"{mem['fp32']['peak_rss_mb']:.0f} | {mem['int4']['peak_rss_mb']:.0f} | |")
    sizes = report["sizes_mb"]
    lines.append(f"| decoder.onnx (MB) | — | {sizes['decoder.onnx (fp32)']:.1f} | {sizes['decoder.onnx (int4)']:.1f} | |")
    lines += ["", "| quantized decoder | tok/s ctx 64 | speedup vs ORT fp32 | top-1 agreement | logits max abs err | decoder.onnx MB |",
              "|---|---|---|---|---|---|"]
    for name in QUANTIZED:
        entry = d64[name]
        lines.append(f"| {name} (accuracy_level {QUANTIZED[name][1]}) | {entry['tokens_per_s']:.1f} | "
                     f"{entry['tokens_per_s'] / d64['fp32']['tokens_per_s']:.2f}x | "
                     f"{agree[name]['top1_agreement']:.1%} | {agree[name]['logits_max_abs_err']:.3g} | "
                     f"{sizes[f'decoder.onnx ({name})']:.1f} |")
    lines += ["", "| other | value |", "|---|---|",
              f"| memory bandwidth (numpy copy, read+write) | {report['bandwidth']['gb_per_s']:.1f} GB/s |",
              f"| reference top-1 margin (median top1 − top2 logit) | {agree['reference_top1_margin_median']:.3f} |",
              f"| peak RSS of this bench process | {mem['bench_process_peak_rss_mb']:.0f} MB |"]
    for what, seconds in report["export_s"].items():
        lines.append(f"| {what} | {seconds:.1f} s |")
    for name, mb in sizes.items():
        if not name.startswith("decoder.onnx"):
            lines.append(f"| {name} | {mb:.1f} MB |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for row in report["targets"].values():
        lines.append(f"| {row['target']} | `{row['ratio_key']}` = {row['value']:.3g} | "
                     f"{'yes' if row['met'] else '**no**'} |")
    lines.append(f"| (reported) decode step floor / measured, ORT fp32 ctx 64 | "
                 f"`bandwidth_fraction` = {report['bandwidth_fraction']:.3g} | |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def run(settings: Settings) -> dict:
    torch.set_num_threads(settings.threads)
    report: dict = {"settings": asdict(settings), "machine": machine_info(settings.threads)}
    if report["machine"]["load_average_start"] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {report['machine']['load_average_start']:.1f} on "
            f"{os.cpu_count()} cores: other processes compete for the CPU; timings will be noisy")
    log("== memory bandwidth")
    report["bandwidth"] = memory_bandwidth(settings.bandwidth_mb)
    with tempfile.TemporaryDirectory(prefix="dsvl-bench-") as tmp:
        work = Path(tmp)
        log("== exports")
        with contextlib.redirect_stdout(sys.stderr):
            exports = make_exports(settings, work)
        report["export_s"] = exports["export_s"]
        report["sizes_mb"] = _sizes(exports)
        log("== loading PyTorch reference and ONNX Runtime pipelines")
        model, tokenizer, loaded = load_model(WeightSource(preset=settings.preset))
        pipes = {name: rp.Pipeline.from_artifacts(path, threads=settings.threads)
                 for name, path in exports["dirs"].items()}
        size = loaded.config.image_size
        pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
        ids = pipes["fp32"].tokenizer.encode(format_round(QUESTION, 1))
        log("== vision + projector latency")
        report["vision"] = bench_vision(settings, exports, model, pipes["fp32"], size)
        log("== time to first token")
        report["ttft"] = bench_first_token(settings, model, {k: pipes[k] for k in ("fp32", "int4")}, ids, pixels)
        log("== decode")
        report["decode"] = {
            "ctx64": bench_decode(settings, model, pipes, 64, ["pytorch", "fp32", *QUANTIZED]),
            "ctx1024": bench_decode(settings, model, pipes, 1024, ["pytorch", "fp32", "int4"])}
        log("== teacher-forced agreement with the PyTorch reference")
        report["agreement"] = bench_agreement(settings, model, pipes, ids, pixels)
        report["floor"] = _floor(report, exports)
        if settings.profile:
            log("== op profiles (ONNX Runtime profiler, torch.profiler)")
            report["profiles"] = bench_profiles(settings, model, exports, pipes,
                                                report["ttft"]["prompt_positions"])
        log("== peak RSS (fresh processes)")
        del pipes
        report["memory"] = {
            "pytorch": peak_rss(PEAK_RSS_TORCH, settings.preset, str(settings.threads), QUESTION),
            "fp32": peak_rss(PEAK_RSS_ORT, str(exports["dirs"]["fp32"]), str(settings.threads), QUESTION),
            "int4": peak_rss(PEAK_RSS_ORT, str(exports["dirs"]["int4"]), str(settings.threads), QUESTION),
            "bench_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    report.update(ratios(report))
    report["targets"] = target_rows(report)
    return report


def _sizes(exports: dict) -> dict:
    sizes = {f"vision.onnx ({p})": path.stat().st_size / 1e6 for p, path in exports["vision_files"].items()}
    for name, root in exports["dirs"].items():
        sizes[f"decoder.onnx ({name})"] = sum(f.stat().st_size for f in root.glob(c.DECODER_FILE + "*")) / 1e6
    fp32 = exports["dirs"]["fp32"]
    sizes["embedding tables (2 x .npy)"] = sum((fp32 / n).stat().st_size
                                                for n in (c.PROMPT_EMBED_FILE, c.DECODER_EMBED_FILE)) / 1e6
    return sizes


def _floor(report: dict, exports: dict) -> dict:
    """Decode step floor: weight bytes read per token over the measured memory bandwidth."""
    bandwidth = report["bandwidth"]["gb_per_s"] * 1e9
    decode = report["decode"]["ctx64"]
    floor = {}
    for name in ["fp32", *QUANTIZED]:
        weight = decoder_weight_bytes(exports["dirs"][name] / c.DECODER_FILE)
        floor[name] = {"weight_mb": weight / 1e6, "floor_ms": 1e3 * weight / bandwidth,
                       "bandwidth_fraction": 1e3 * weight / bandwidth / decode[name]["median_ms"]}
    floor["pytorch"] = dict(floor["fp32"], bandwidth_fraction=floor["fp32"]["floor_ms"]
                            / decode["pytorch"]["median_ms"])
    return floor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench.py",
        description="PyTorch eager fp32 vs the ONNX Runtime CPU runtime (fp32 and quantized "
                    "decoders) on one preset's seeded random weights: vision latency, time to "
                    "first token, decode tokens/s at two contexts, memory, sizes, export times, "
                    "the bandwidth floor and int4 agreement. Markdown on stdout.")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model shapes (default: small; tiny with --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--repeats", type=int, help="timed repeats for latencies (default 10; 3 with --quick)")
    parser.add_argument("--decode-steps", type=int, help="decode steps per run (default 64; 8 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for both PyTorch and ONNX Runtime (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: tiny preset, few repeats")
    parser.add_argument("--kv-cache", choices=("concat", "shared"), default="concat",
                        help="decoder export's KV cache (see export.decoder --help; default concat)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile decode steps and the prompt pass per op (ORT profiler, "
                             "torch.profiler) and add the breakdown to the output")
    parser.add_argument("--peers", action="store_true",
                        help="then run scripts/bench_peers.py (same preset, threads and --profile): our "
                             "decoder against ONNX Runtime GenAI and llama.cpp on identical weights; "
                             "adds \"peers\" to the JSON")
    parser.add_argument("--peers-args", default="", metavar="ARGS",
                        help="more arguments for bench_peers.py, one string (e.g. \"--llama-cpp-convert "
                             "PATH --peers-python PY\"; see python scripts/bench_peers.py --help)")
    return parser.parse_args(argv)


def run_peers(args: argparse.Namespace, preset: str) -> tuple[dict, str]:
    """scripts/bench_peers.py in this process, after the main bench (nothing else running):
    its report and markdown."""
    import shlex

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_peers

    peer_args = ["--preset", preset, "--threads", str(args.threads), *shlex.split(args.peers_args)]
    if args.profile:
        peer_args.append("--profile")
    report = bench_peers.run(bench_peers.options_from(bench_peers.parse_args(peer_args)))
    return report, bench_peers.markdown(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    settings = Settings(preset=args.preset or ("tiny" if quick else "small"),
                        repeats=args.repeats or (3 if quick else 10), warmup=1 if quick else 2,
                        decode_runs=1 if quick else 3, decode_steps=args.decode_steps or (8 if quick else 64),
                        agreement_tokens=16 if quick else 256, bandwidth_mb=64 if quick else 512,
                        threads=args.threads, profile=args.profile, kv_cache=args.kv_cache)
    start = time.perf_counter()
    report = run(settings)
    table = markdown(report) + (profile_markdown(report["profiles"]) if "profiles" in report else "")
    if args.peers:
        log("== against ONNX Runtime GenAI and llama.cpp (scripts/bench_peers.py)")
        peers, peers_table = run_peers(args, settings.preset)
        report["peers"] = peers.pop("peers")
        report["peers_run"] = peers  # options, load, builds, skipped engines, ratios, profiles
        table += "\n\n" + peers_table
    report["bench_s"] = time.perf_counter() - start
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report | {"markdown": table}, indent=2))
        log(f"wrote {args.json}")
    log(f"bench took {report['bench_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
