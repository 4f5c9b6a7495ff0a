"""Where the time goes: ONNX Runtime's op profiler on the runtime's decoder and torch.profiler on
the reference, per op type, for decode steps at each context and for the prompt pass."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from runtime import contract as c
from runtime.manifest import DecoderSection
from scripts.bench.settings import CONTEXTS, Settings


def profile_ort(path: Path, decoder: DecoderSection, threads: int, past: int, seq: int, runs: int) -> dict:
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
        cache = (1, decoder.num_kv_heads, past, decoder.head_dim)
        feeds = {c.INPUTS_EMBEDS: rng.standard_normal((1, seq, decoder.hidden_size)).astype(np.float32),
                 c.ATTENTION_MASK: np.ones((1, past + seq), np.int64),
                 c.POSITION_IDS: np.arange(past, past + seq, dtype=np.int64)[None]}
        for name, _ in c.cache_name_pairs(decoder.num_layers):
            feeds[name] = rng.standard_normal(cache).astype(np.float32)
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
    """ONNX Runtime's profiler on fp32 and int4 decode steps and the prompt pass; torch.profiler
    on the reference's decode steps."""
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
