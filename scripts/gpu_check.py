"""ONNX Runtime's CUDA provider against PyTorch eager on a GPU, in one run: fp16 accuracy for
every projector with MMCA off and on, then speed, and a LLaMA-2-7B-shaped decoder of a few
layers. Writes one JSON and a markdown table (the GPU issue's check; docs/benchmarks.md, "GPU").

    python scripts/gpu_check.py --out DIR                        # a CUDA GPU: fp16, small preset
    python scripts/gpu_check.py --device cpu --quick --out DIR   # a dry run on any CPU

Accuracy, per export (projector x MMCA): the vision output's cosine and max error against
PyTorch in fp16 on the same device and in fp32; the reference fp32 model's greedy tokens fed
step by step (teacher forcing) into the runtime, top-1 agreement over ``--tokens`` of them; the
runtime's own greedy tokens against the reference's for ``--greedy``; NaN/Inf anywhere.
Speed, on the first projector with MMCA off and on: vision with 1 and 4 images (also through
CUDA graphs), the first token, decode steps at contexts 64 and 1024 (PyTorch eager fp16 against
the runtime, repeats interleaved, CUDA synchronised), each step against the bandwidth floor (the
step's weight bytes over a device-to-device copy's rate); the in-place KV cache against the
concat one. Node placement and the host/device copies ONNX Runtime inserts, for every decoder
and the first vision graph. The first projector's export with an int8 KV cache
(``export.quantize_kv``): placement, accuracy and decode steps. The big decoder
(``--big-preset``, ``--big-layers`` layers at its real widths) gives per-layer decode figures.

With ``--device cpu`` the same code runs PyTorch on the CPU and ONNX Runtime's CPU provider on
fp32 exports: every step is exercised without a GPU (tests/test_gpu_check_smoke.py), and its
figures say nothing about GPUs. Exports are written under ``--exports`` (default ``--out``) and
kept, so a rerun reuses them. Each export's check, its speed and the big decoder are sections:
one that fails is recorded with its error and the run goes on, and the JSON and the table are
rewritten after every section, so a run cut short still leaves what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsvl.config import VIS_PROJS  # noqa: E402
from dsvl.generate import generate, position_ids_for  # noqa: E402
from dsvl.loading import WeightSource, load_model  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.prompt import format_round  # noqa: E402
from runtime.sampling import SamplingOptions  # noqa: E402
from scripts.bench.agreement import teacher_forced_logits  # noqa: E402
from scripts.bench.decode import ort_decode_run, torch_decode_run  # noqa: E402
from scripts.bench.exports import decoder_weight_bytes  # noqa: E402
from scripts.bench.timing import interleaved, log, summary  # noqa: E402

QUESTION = "Describe the image in detail."
CONTEXTS = (64, 1024)
COSINE_MIN, TOP1_MIN = 0.999, 0.99  # the accuracy bars


class Device:
    """Where PyTorch runs, how it is timed, and what the runtime's backend is."""

    def __init__(self, name: str):
        self.name = name
        self.cuda = name == "cuda"
        self.backend = "ort-cuda" if self.cuda else "ort-cpu"
        self.precision = "fp16" if self.cuda else "fp32"  # the export, and PyTorch's fast side
        self.dtype = torch.float16 if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def context(self):
        """Tensors the reference makes inside (masks, caches) land on this device."""
        return torch.device(self.name) if self.cuda else contextlib.nullcontext()

    def bandwidth(self, megabytes: int = 1024) -> dict:
        """Device-to-device copy rate, bytes read + written, best of 7 (the floor's divisor)."""
        if not self.cuda:
            from scripts.bench.machine import memory_bandwidth

            return memory_bandwidth(megabytes)
        src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        best = min(self.timed(lambda: dst.copy_(src)) for _ in range(7))
        return {"gb_per_s": 2 * src.numel() / best / 1e9, "megabytes": megabytes, "how": "torch copy_ on the GPU"}


def machine(device: Device) -> dict:
    import onnxruntime as ort

    info = {"device": device.name, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers()}
    if device.cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 2**30,
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info


def export_flags(preset: str, vis_proj: str, mmca: bool, precision: str, *extra: str) -> list[str]:
    return ["--preset", preset, "--vis-proj", vis_proj, "--precision", precision, *extra,
            *(["--enable-mmca-attention"] if mmca else [])]


def export(out: Path, preset: str, vis_proj: str, mmca: bool, precision: str, *extra: str) -> tuple[Path, float | None]:
    """``export.all`` into ``out`` (kept: a rerun reuses it, and reports no time)."""
    from export import all as export_all

    if (out / "manifest.json").exists():
        return out, None
    flags = export_flags(preset, vis_proj, mmca, precision, *extra)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        if export_all.main([*flags, "--out", str(out)]) != 0:
            raise RuntimeError(f"export.all {' '.join(flags)} failed (its messages are above)")
    return out, time.perf_counter() - start


def planned_exports(args: argparse.Namespace, device: Device) -> dict[str, list[str]]:
    """Every export the run will make, by folder name, with its ``export.all`` flags: the same
    names and flags as the sections' own ``export`` calls, so these are reused there."""
    projectors = args.projectors.split(",")
    plans = {}
    for vis_proj in projectors:
        for mmca in (False, True):
            name = export_name(vis_proj, mmca)
            plans[name] = export_flags(args.preset, vis_proj, mmca, device.precision)
            if vis_proj == projectors[0]:
                plans[f"{name}-concat"] = export_flags(args.preset, vis_proj, mmca, device.precision,
                                                       "--kv-cache", "concat")
    if args.big_layers:
        plans[big_name(args)] = export_flags(args.big_preset, projectors[0], False, device.precision,
                                             "--preset-layers", str(args.big_layers))
    return plans


def export_in_parallel(args: argparse.Namespace, device: Device, report: dict) -> None:
    """Make the missing exports ``--jobs`` at a time, each ``python -m export.all`` in its own
    process (its messages in ``NAME.log`` beside it): tracing and checking an export is mostly
    one core's work, so a many-core GPU machine does them side by side. One that fails is
    left to its section, which makes it again and records why."""
    import subprocess

    work = Path(args.exports)
    work.mkdir(parents=True, exist_ok=True)
    todo = {name: flags for name, flags in planned_exports(args, device).items()
            if not (work / name / "manifest.json").exists()}
    if not todo or args.jobs < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // args.jobs)  # each export's own cores: no thread pool oversubscribes
    slots = [set(cores[i * share:(i + 1) * share]) for i in range(args.jobs)]
    log(f"== {len(todo)} exports, {args.jobs} at a time, {share} cores each: {', '.join(todo)}")
    waiting, running = list(todo.items()), {}
    while waiting or running:
        while waiting and len(running) < args.jobs:
            name, flags = waiting.pop(0)
            slot = next(i for i in range(args.jobs) if i not in {r[3] for r in running.values()})
            log_file = open(work / f"{name}.log", "w")  # noqa: SIM115  (closed when it ends)
            command = [sys.executable, "-m", "export.all", *flags, "--out", str(work / name)]
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=os.environ | {"OMP_NUM_THREADS": str(share)},
                                    preexec_fn=functools.partial(os.sched_setaffinity, 0, slots[slot]))
            running[name] = (proc, log_file, time.perf_counter(), slot)
        time.sleep(0.5)
        for name, (proc, log_file, start, _) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[name]
            seconds = time.perf_counter() - start
            if proc.returncode == 0:
                report["export_s"][name] = seconds
            log(f"      {name}: {'done' if proc.returncode == 0 else 'FAILED (its section retries)'} in {seconds:.0f} s")


def argmax_ties(device: Device) -> dict:
    """Which of two equal fp16 logits ONNX Runtime's ``ArgMax`` picks on this provider: the
    in-graph greedy pick's tie rule, against PyTorch's (the first)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from runtime.backends.ort import PROVIDERS

    node = helper.make_node("ArgMax", ["x"], ["y"], axis=-1, keepdims=0)
    graph = helper.make_graph([node], "ties", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=[PROVIDERS[device.backend]])
    rows = np.random.default_rng(3).standard_normal((64, 32003)).astype(np.float16)
    pairs = np.stack([np.random.default_rng(4 + i).choice(32003, 2, replace=False) for i in range(64)])
    for row, pair in zip(rows, pairs, strict=True):
        row[pair] = np.float16(8.0)  # two equal maxima per row
    picks = session.run(None, {"x": rows})[0]
    first = pairs.min(-1)
    return {"provider": session.get_providers()[0], "rows": len(rows),
            "first_index": int((picks == first).sum()), "last_index": int((picks == pairs.max(-1)).sum()),
            "torch_first_index": bool((torch.from_numpy(rows).to(device.name).argmax(-1).cpu().numpy() == first).all())}


def host_casts(repeats: int) -> dict:
    """This machine's CPU converting float32 <-> float16 with numpy and with ONNX Runtime
    (scripts/bench_casts.py): what an fp16 export's host side pays around each GPU call."""
    from scripts import bench_casts

    log("== host fp16 conversions (numpy against ONNX Runtime)")
    return bench_casts.run(repeats, warmup=2)


def finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_models(device: Device, source: WeightSource, fp32: bool = True) -> tuple:
    """(fp32, fast): the export's weights as PyTorch modules in fp32 (None unless ``fp32``)
    and ``device.dtype``, on the device. Built on the CPU first (the seeded initialisation is
    the export's), then moved."""
    model = load_model(source)[0].eval().to(device.name)
    if device.dtype == torch.float32:
        return model, model
    fast = model if not fp32 else load_model(source)[0].eval().to(device.name)
    model = model if fp32 else None
    for param in fast.parameters():  # the weights only: buffers (rotary inv_freq) stay fp32
        param.data = param.data.to(device.dtype)
    return model, fast


def accuracy(device: Device, pipe: Pipeline, model, fast, tokens: int, greedy: int) -> dict:
    size = pipe.artifacts.vision.image_size
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    ids = pipe.tokenizer.encode(format_round(QUESTION, 1))
    got = pipe.vision.encode(pixels)
    with torch.no_grad(), device.context():
        px = torch.from_numpy(pixels).to(device.name)
        want32 = model.encode_images(px).float().cpu().numpy()
        want16 = fast.encode_images(px.to(device.dtype)).float().cpu().numpy()
        ids_t = torch.tensor(ids, device=device.name)
        ref = generate(model, ids_t, px, SamplingOptions(max_new_tokens=tokens))
    forced = teacher_forced_logits(pipe, ids, pixels, ref.tokens)
    pipe.reset()
    embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
    first = pipe.prefill(embeds, mask)
    own, _ = pipe.decode(first, SamplingOptions(max_new_tokens=greedy), stop_ids=())
    result = {
        "vision_cosine_fp32": cosine(got, want32), "vision_cosine_fast": cosine(got, want16),
        "vision_max_abs_err_fp32": float(np.abs(got - want32).max()),
        "vision_max_abs_err_fast": float(np.abs(got - want16).max()),
        "vision_output_max_abs": float(np.abs(want32).max()),
        "top1_agreement": float(np.mean(forced.argmax(-1) == np.asarray(ref.tokens))),
        "teacher_forced_tokens": len(ref.tokens),
        "greedy_equal": own == ref.tokens[:greedy], "greedy_tokens": greedy,
        "finite": finite(got, forced, first)}
    result["met"] = (result["vision_cosine_fp32"] >= COSINE_MIN and result["top1_agreement"] >= TOP1_MIN
                     and result["greedy_equal"] and result["finite"])
    return result


def node_placement(path: Path, device: Device) -> dict:
    """Which execution provider ONNX Runtime assigns each node of ``path`` to, read from its
    verbose session log (fd 2, captured while the session is made): nodes left on the CPU in a
    CUDA session are silent host round trips each step. And the copies ONNX Runtime inserts
    between host and device (``memcpy``: op and the tensor it copies, from the optimized graph
    the session saves): any one of them rules out CUDA graphs for that session."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from runtime.backends.ort import PROVIDERS

    options = ort.SessionOptions()
    options.log_severity_level = options.log_verbosity_level = 0
    providers = [PROVIDERS[device.backend]] + (["CPUExecutionProvider"] if device.cuda else [])
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+b") as log_file:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(log_file.fileno(), 2)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        del session
        log_file.seek(0)
        placed = placement_from_log(log_file.read().decode(errors="replace"))
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        placed["memcpy"] = [f"{n.op_type}({n.input[0]})" for n in optimized.graph.node
                            if n.op_type.startswith("Memcpy")]
        return placed


def placement_from_log(text: str) -> dict:
    """``VerifyEachNodeIsAssignedToAnEp``'s lines: a count per provider, and the nodes (op and
    name) listed under the CPU provider when other providers hold the rest."""
    counts: dict[str, int] = {}
    listed: dict[str, list[str]] = {}
    provider = None
    for line in text.splitlines():
        if "VerifyEachNodeIsAssignedToAnEp" not in line:
            provider = None
            continue
        placed = re.search(r"placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if placed:
            provider = placed.group(1)
            counts[provider] = counts.get(provider, 0) + int(placed.group(2))
        elif provider and re.search(r"\]\s{2,}\S+ \(", line):
            listed.setdefault(provider, []).append(line.split("]", 1)[1].strip())
    cpu = listed.get("CPUExecutionProvider", []) if len(counts) > 1 else []
    return {"nodes_by_provider": counts, "cpu_nodes": cpu}


def torch_decode_steps(device: Device, model, context: int, steps: int) -> list[float]:
    """scripts/bench/decode.py's reference loop after a ``context``-token prompt, on the device."""
    vocab = model.lang_decoder.lm_head.weight.shape[0]
    ids = torch.from_numpy(np.random.default_rng(context).integers(0, vocab, context)).to(device.name)
    with device.context():
        return torch_decode_run(model, ids, steps, device.timed)["step_s"]


def decode_speed(device: Device, fast, pipes: dict[str, Pipeline], runs: int, steps: int,
                 floor_gb_s: float) -> dict:
    """Per context: step medians of PyTorch (``fast``) and each pipeline, runs interleaved."""
    result: dict = {}
    for context in CONTEXTS:
        artifacts = next(iter(pipes.values())).artifacts
        if context + steps + 1 > artifacts.decoder.max_position_embeddings:
            continue
        ids = np.random.default_rng(context).integers(0, artifacts.decoder.vocab_size, context)
        embeds = np.asarray(artifacts.prompt_embeddings[ids], np.float32)[None]
        samples: dict[str, list[float]] = {"pytorch": [], **{name: [] for name in pipes}}
        in_session = dict.fromkeys(pipes, 0.0)  # seconds inside the session's run, all steps
        for _ in range(runs):
            samples["pytorch"] += torch_decode_steps(device, fast, context, steps)
            for name, pipe in pipes.items():
                run = ort_decode_run(pipe, embeds, steps)
                samples[name] += run["step_s"]
                in_session[name] += run["session_s"]
        entry = {name: summary(s) for name, s in samples.items()}
        for name, pipe in pipes.items():
            weight_bytes = decoder_weight_bytes(pipe.artifacts.root / pipe.artifacts.decoder.file.path)
            floor_ms = weight_bytes / (floor_gb_s * 1e9) * 1e3
            entry[name] |= {"weight_mb": weight_bytes / 1e6, "floor_ms": floor_ms,
                            "floor_fraction": floor_ms / entry[name]["median_ms"],
                            "over_pytorch": entry["pytorch"]["median_ms"] / entry[name]["median_ms"],
                            # inside the session's run; the rest of a step is the loop's
                            "session_ms_mean": in_session[name] / len(samples[name]) * 1e3}
        result[f"ctx{context}"] = entry
        log(f"      decode ctx {context}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in entry.items()))
    return result


def first_token(device: Device, fast, pipe: Pipeline, repeats: int, warmup: int) -> dict:
    size = pipe.artifacts.vision.image_size
    pixels = np.random.default_rng(2).standard_normal((1, 3, size, size)).astype(np.float32)
    ids = pipe.tokenizer.encode(format_round(QUESTION, 1))
    decoder = fast.lang_decoder

    @torch.no_grad()
    def run_torch():
        with device.context():
            px = torch.from_numpy(pixels).to(device.name, device.dtype)
            embeds, mask = fast.splice(torch.tensor(ids, device=device.name), fast.encode_images(px))
            logits, _ = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
            return logits[0, -1].argmax()

    def run_ort():
        embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
        pipe.reset()
        return pipe.prefill(embeds, mask)

    result = interleaved({"pytorch": run_torch, "ort": run_ort}, repeats, warmup, device.timed)
    result["ratio"] = result["ort"]["median_ms"] / result["pytorch"]["median_ms"]
    return result


def replaying_vision(device: Device, pipe: Pipeline):
    """The export's vision encoder through CUDA graphs, one per image count
    (runtime/backends/ort_graphs.py); on the CPU the same bound-buffer path without capture,
    so the dry run exercises it."""
    from runtime.backends.ort import OrtVisionRunner
    from runtime.backends.ort_graphs import ImageCountGraphs

    spec = pipe.artifacts.vision
    path = pipe.artifacts.root / spec.file.path
    if device.cuda:
        return OrtVisionRunner(path, spec, "ort-cuda", cuda_graph=True)
    runner = OrtVisionRunner(path, spec)
    runner.replays = ImageCountGraphs(runner.session, "cpu", runner.output_shape, runner.dtype)
    return runner


def vision_speed(device: Device, fast, pipe: Pipeline, repeats: int, warmup: int) -> dict:
    """PyTorch eager against the runtime's ``encode``, and against the same through CUDA graphs
    (``ort-graph``; its output after capture against the plain session's: the same kernels, so
    it should be exact)."""
    size = pipe.artifacts.vision.image_size
    result: dict = {}
    replay = attempt("vision through CUDA graphs", functools.partial(replaying_vision, device, pipe))
    if isinstance(replay, dict):
        result["graph_error"] = replay["error"]
        replay = None
    try:
        for images in (1, 4):
            pixels = np.random.default_rng(images).standard_normal((images, 3, size, size)).astype(np.float32)
            px = torch.from_numpy(pixels).to(device.name, device.dtype)

            @torch.no_grad()
            def run_torch(px=px):
                return fast.encode_images(px)

            sides = {"pytorch": run_torch, "ort": functools.partial(pipe.vision.encode, pixels)}
            if replay is not None:
                sides["ort-graph"] = functools.partial(replay.encode, pixels)
            entry = interleaved(sides, repeats, warmup, device.timed)
            entry["ratio"] = entry["ort"]["median_ms"] / entry["pytorch"]["median_ms"]
            if replay is not None:
                entry["graph_ratio"] = entry["ort-graph"]["median_ms"] / entry["pytorch"]["median_ms"]
                plain, replayed = pipe.vision.encode(pixels), replay.encode(pixels)  # captured by now
                entry["graph_max_abs_diff"] = float(np.abs(replayed - plain).max())
                entry["graph_cosine"] = cosine(replayed, plain)
            result[str(images)] = entry
            log(f"      vision x{images}: " + ", ".join(
                f"{name} {entry[name]['median_ms']:.2f} ms" for name in sides))
    finally:
        if replay is not None:
            replay.close()
    return result


def vision_breakdown(device: Device, pipe: Pipeline, repeats: int, warmup: int, images: int = 4) -> dict:
    """Where ORT's vision time goes, ``images`` at once: the runtime's ``encode`` (float32 in,
    cast, copies both ways, float32 out) against the session alone with its input already in
    the graph's dtype, and with input and output bound on the device (the graph alone); then
    ONNX Runtime's profiler, time per op type per run."""
    import onnxruntime as ort

    from runtime import contract
    from runtime.backends.ort import make_session

    runner = pipe.vision
    session = runner.session
    spec = pipe.artifacts.vision
    size = spec.image_size
    pixels = np.random.default_rng(images).standard_normal((images, 3, size, size)).astype(np.float32)
    cast = pixels.astype(runner.dtype)
    where = "cuda" if device.cuda else "cpu"
    bound = session.io_binding()
    bound.bind_ortvalue_input(contract.VISION_INPUT, ort.OrtValue.ortvalue_from_numpy(cast, where, 0))
    bound.bind_output(contract.VISION_OUTPUT, where, 0)

    def graph_only():
        session.run_with_iobinding(bound)

    sides = {"encode": functools.partial(runner.encode, pixels),
             "session": functools.partial(session.run, [contract.VISION_OUTPUT], {contract.VISION_INPUT: cast}),
             "graph_on_device": graph_only}
    result = interleaved(sides, repeats, warmup, device.timed)
    profiled = make_session(pipe.artifacts.root / spec.file.path, device.backend,
                            runner.dtype == np.float16, profile=True)
    for _ in range(warmup + repeats):
        profiled.run([contract.VISION_OUTPUT], {contract.VISION_INPUT: cast})
    result["ops_ms_per_run"] = op_times(profiled.end_profiling(), warmup, repeats)
    return result


def op_times(profile_path: str, warmup: int, repeats: int, top: int = 10) -> dict[str, float]:
    """ONNX Runtime's profile: each op type's kernel time summed over the runs after
    ``warmup``, per run, the ``top`` largest (the profile file is removed)."""
    events = json.loads(Path(profile_path).read_text())
    Path(profile_path).unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[warmup]["ts"] if len(runs) > warmup else 0
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= start:
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / repeats
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def attempt(what: str, section: Callable[[], Any]) -> Any:
    """One section of the check: its result, or ``{"error": ...}`` when it fails. A GPU
    session's one run goes on past a failure and still reports what worked."""
    try:
        return section()
    except Exception as err:  # noqa: BLE001  (any failure: recorded, the next section runs)
        log(f"      FAILED {what}: {type(err).__name__}: {err}")
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(err).__name__}: {err}"}


def save(report: dict, out: Path) -> None:
    """The JSON and the table as they stand: a run cut short (a device call's time limit)
    still leaves every finished section."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def export_name(vis_proj: str, mmca: bool) -> str:
    """The name an export's entries and folder go by: ``perceiver``, ``perceiver-mmca``."""
    return f"{vis_proj}{'-mmca' if mmca else ''}"


def check_export(args: argparse.Namespace, device: Device, report: dict, vis_proj: str,
                 mmca: bool, speed: bool) -> None:
    """Export one projector x MMCA, its accuracy and node placement, and (``speed``) its
    timings, each into ``report`` under the export's name."""
    name = export_name(vis_proj, mmca)
    work = Path(args.exports)
    log(f"== {name}: export and accuracy")
    path, seconds = export(work / name, args.preset, vis_proj, mmca, device.precision)
    report["export_s"].setdefault(name, seconds)
    model, fast = reference_models(device, WeightSource(preset=args.preset, vis_proj=vis_proj,
                                                           enable_mmca_attention=mmca))
    try:
        with Pipeline.from_artifacts(path, backend=device.backend) as pipe:
            report["accuracy"][name] = attempt(f"{name} accuracy", functools.partial(
                accuracy, device, pipe, model, fast, args.tokens, args.greedy))
            log(f"      {json.dumps(report['accuracy'][name])}")
            report["placement"][name] = attempt(f"{name} placement", functools.partial(
                node_placement, path / pipe.artifacts.decoder.file.path, device))
            log(f"      decoder node placement: {report['placement'][name]}")
            if speed:
                log(f"== {name}: speed")
                report["speed"][name] = attempt(f"{name} speed", functools.partial(
                    speed_of, args, device, work, report, vis_proj, mmca, pipe, fast))
    finally:
        model = fast = None  # the GPU's memory back before the next export's models
        if device.cuda:
            torch.cuda.empty_cache()


def speed_of(args: argparse.Namespace, device: Device, work: Path, report: dict, vis_proj: str,
             mmca: bool, pipe: Pipeline, fast) -> dict:
    name = export_name(vis_proj, mmca)
    concat, seconds = export(work / f"{name}-concat", args.preset, vis_proj, mmca, device.precision,
                             "--kv-cache", "concat")
    report["export_s"].setdefault(f"{name}-concat", seconds)
    floor = report["bandwidth"]["gb_per_s"]
    with Pipeline.from_artifacts(concat, backend=device.backend) as other:
        return {"vision_placement": attempt("vision placement", functools.partial(
                    node_placement, pipe.artifacts.root / pipe.artifacts.vision.file.path, device)),
                "vision": vision_speed(device, fast, pipe, args.repeats, args.warmup),
                "vision_breakdown": attempt("vision breakdown", functools.partial(
                    vision_breakdown, device, pipe, args.repeats, args.warmup)),
                "first_token": first_token(device, fast, pipe, args.repeats, args.warmup),
                "decode": decode_speed(device, fast, {"ort": pipe, "ort-concat": other},
                                       args.decode_runs, args.decode_steps, floor)}


def check_kv8(args: argparse.Namespace, device: Device, report: dict) -> dict:
    """The first projector's export with an int8 KV cache (``python -m export.quantize_kv``,
    calibrated on the CPU provider) on the runtime's backend: whether the provider takes the
    quantized ``GroupQueryAttention``, where its nodes run, its accuracy against PyTorch fp32,
    and its decode steps beside the float cache's."""
    from export import quantize_kv

    vis_proj = args.projectors.split(",")[0]
    name = export_name(vis_proj, False)
    work = Path(args.exports)
    log(f"== {name}-kv8: int8 KV cache on {device.backend}")
    source, _ = export(work / name, args.preset, vis_proj, False, device.precision)
    out = work / f"{name}-kv8"
    if not (out / "manifest.json").exists():
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            if quantize_kv.main(["--artifacts", str(source), "--out", str(out)]) != 0:
                raise RuntimeError("export.quantize_kv failed (its messages are above)")
        report["export_s"][f"{name}-kv8"] = time.perf_counter() - start
    result: dict = {"placement": attempt("kv8 placement", functools.partial(
        node_placement, out / read_manifest(out).decoder.file.path, device))}
    log(f"      decoder node placement: {result['placement']}")
    model, fast = reference_models(device, WeightSource(preset=args.preset, vis_proj=vis_proj))
    try:
        with Pipeline.from_artifacts(out, backend=device.backend) as pipe:
            result["accuracy"] = attempt("kv8 accuracy", functools.partial(
                accuracy, device, pipe, model, fast, args.tokens, args.greedy))
            log(f"      {json.dumps(result['accuracy'])}")
            with Pipeline.from_artifacts(source, backend=device.backend) as plain:
                result["decode"] = attempt("kv8 decode", functools.partial(
                    decode_speed, device, fast, {"ort": plain, "ort-kv8": pipe}, args.decode_runs,
                    args.decode_steps, report["bandwidth"]["gb_per_s"]))
    finally:
        model = fast = None
        if device.cuda:
            torch.cuda.empty_cache()
    return result


def big_name(args: argparse.Namespace) -> str:
    return f"{args.big_preset}-{args.big_layers}-layers"


def check_big(args: argparse.Namespace, device: Device, report: dict) -> dict:
    """The LLaMA-2-7B-shaped decoder of ``--big-layers`` layers: decode steps, per layer too."""
    name, vis_proj = big_name(args), args.projectors.split(",")[0]
    log(f"== {name}: export and decode (per-layer figures: {args.big_layers} layers only)")
    path, seconds = export(Path(args.exports) / name, args.big_preset, vis_proj,
                           False, device.precision, "--preset-layers", str(args.big_layers))
    report["export_s"].setdefault(name, seconds)
    _, fast = reference_models(device, WeightSource(preset=args.big_preset, vis_proj=vis_proj,
                                                       preset_layers=args.big_layers), fp32=False)
    with Pipeline.from_artifacts(path, backend=device.backend) as pipe:
        decode = decode_speed(device, fast, {"ort": pipe}, args.decode_runs, args.decode_steps,
                              report["bandwidth"]["gb_per_s"])
    for entry in decode.values():
        for side in entry.values():
            side["median_ms_per_layer"] = side["median_ms"] / args.big_layers
    return {"name": name, "layers": args.big_layers, "decode": decode}


def run(args: argparse.Namespace) -> dict:
    device = Device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(device), "settings": {k: v for k, v in vars(args).items()},
                    "accuracy": {}, "placement": {}, "speed": {}, "export_s": {}}
    if device.cuda and "CUDAExecutionProvider" not in report["machine"]["providers"]:
        raise SystemExit("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu "
                         f"(providers: {', '.join(report['machine']['providers'])})")
    log("== bandwidth")
    report["bandwidth"] = device.bandwidth(args.bandwidth_mb)
    report["argmax_ties"] = attempt("ArgMax ties", functools.partial(argmax_ties, device))
    log(f"      fp16 ArgMax ties: {report['argmax_ties']}")
    report["host_casts"] = attempt("host casts", functools.partial(host_casts, args.repeats))
    save(report, out)
    export_in_parallel(args, device, report)
    save(report, out)
    projectors = args.projectors.split(",")
    for vis_proj in projectors:
        for mmca in (False, True):
            name = export_name(vis_proj, mmca)
            failed = attempt(name, functools.partial(check_export, args, device, report, vis_proj,
                                                     mmca, speed=vis_proj == projectors[0]))
            if failed:  # the export or the reference models: the export's row says why
                report["accuracy"].setdefault(name, failed)
            save(report, out)
    report["kv8"] = attempt("int8 KV cache", functools.partial(check_kv8, args, device, report))
    save(report, out)
    if args.big_layers:
        report["big"] = attempt("big decoder", functools.partial(check_big, args, device, report))
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Device: {m.get('gpu', 'CPU')} ({m['device']}); torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             f"bandwidth {report['bandwidth']['gb_per_s']:.0f} GB/s", "",
             *ties_line(report.get("argmax_ties")),
             "| export | vision cosine fp32 / fast | vision max err fp32 / fast | top-1 | greedy equal | finite | met |",
             "|---|---|---|---|---|---|---|"]
    for name, a in report["accuracy"].items():
        if "error" in a:
            lines.append(f"| {name} | failed: {a['error']} | | | | | False |")
            continue
        lines.append(f"| {name} | {a['vision_cosine_fp32']:.6f} / {a['vision_cosine_fast']:.6f} | "
                     f"{a['vision_max_abs_err_fp32']:.2e} / {a['vision_max_abs_err_fast']:.2e} | "
                     f"{a['top1_agreement']:.1%} of {a['teacher_forced_tokens']} | {a['greedy_equal']} | "
                     f"{a['finite']} | {a['met']} |")
    lines.append("")
    for name, placed in report.get("placement", {}).items():
        if "error" in placed:
            lines.append(f"- decoder `{name}`: placement failed: {placed['error']}")
            continue
        lines.append(f"- decoder `{name}`: {placement_text(placed)}")
    for name, speed in report.get("speed", {}).items():
        if "error" in speed:
            lines += ["", f"Speed, {name}: failed: {speed['error']}"]
            continue
        lines += ["", f"Speed, {name} (median ms; ratio = ORT / PyTorch):", "",
                  "| measure | PyTorch | ORT | ratio |", "|---|---|---|---|"]
        for images, v in speed["vision"].items():
            if images == "graph_error":
                lines.append(f"| vision, CUDA graphs | failed: {v} | | |")
                continue
            lines.append(f"| vision x{images} | {v['pytorch']['median_ms']:.2f} | {v['ort']['median_ms']:.2f} | {v['ratio']:.2f}x |")
            if "ort-graph" in v:
                lines.append(f"| vision x{images}, CUDA graphs (max diff {v['graph_max_abs_diff']:.1e} from the "
                             f"plain session) | {v['pytorch']['median_ms']:.2f} | {v['ort-graph']['median_ms']:.2f} | "
                             f"{v['graph_ratio']:.2f}x |")
        breakdown = speed.get("vision_breakdown") or {}
        if "encode" in breakdown:
            lines.append("| vision x4, ORT: runtime's encode / session, input cast already / graph, "
                         f"IO on the device | | {breakdown['encode']['median_ms']:.2f} / "
                         f"{breakdown['session']['median_ms']:.2f} / {breakdown['graph_on_device']['median_ms']:.2f} | |")
        placed = speed.get("vision_placement") or {}
        if "nodes_by_provider" in placed:
            lines.append(f"| vision: {placement_text(placed)} | | | |")
        ft = speed["first_token"]
        lines.append(f"| first token | {ft['pytorch']['median_ms']:.2f} | {ft['ort']['median_ms']:.2f} | {ft['ratio']:.2f}x |")
        lines += decode_rows(speed["decode"])
        if "ops_ms_per_run" in breakdown:
            ops = ", ".join(f"{op} {ms:.3f}" for op, ms in breakdown["ops_ms_per_run"].items())
            lines += ["", f"ORT vision x4 by op type (ms per run, ONNX Runtime's profiler): {ops}"]
        elif "error" in breakdown:
            lines += ["", f"ORT vision breakdown failed: {breakdown['error']}"]
    lines += kv8_rows(report.get("kv8"))
    casts = report.get("host_casts") or {}
    if "cases" in casts:
        from scripts import bench_casts

        lines += ["", "Host fp16 conversions on this machine's CPU (scripts/bench_casts.py):", "",
                  bench_casts.markdown(casts).rstrip()]
    elif "error" in casts:
        lines += ["", f"Host fp16 conversions: failed: {casts['error']}"]
    if "error" in report.get("big", {}):
        lines += ["", f"Big decoder: failed: {report['big']['error']}"]
    elif "big" in report:
        layers = report["big"]["layers"]
        lines += ["", f"{report['big']['name']} (the whole step of {layers} layers and the LM head; "
                      f"per layer = median / {layers}, the head's share included):", "",
                  "| measure | PyTorch | ORT | ratio | PyTorch per layer | ORT per layer |",
                  "|---|---|---|---|---|---|"]
        for ctx, entry in report["big"]["decode"].items():
            torch_side, ort_side = entry["pytorch"], entry["ort"]
            lines.append(f"| decode step {ctx} (floor {ort_side['floor_ms']:.2f} ms = {ort_side['floor_fraction']:.0%}) | "
                         f"{torch_side['median_ms']:.2f} | {ort_side['median_ms']:.2f} | "
                         f"{ort_side['median_ms'] / torch_side['median_ms']:.2f}x | "
                         f"{torch_side['median_ms_per_layer']:.3f} | {ort_side['median_ms_per_layer']:.3f} |")
    return "\n".join(lines) + "\n"


def placement_text(placed: dict) -> str:
    """``node_placement``'s result in words: nodes per provider, those on the CPU, the copies."""
    cpu, copies = placed["cpu_nodes"], placed.get("memcpy", [])
    return (f"nodes by provider {placed['nodes_by_provider']}" + (f"; on the CPU: {', '.join(cpu)}" if cpu else "")
            + f"; host/device copies: {', '.join(copies) or 'none'}")


def kv8_rows(kv8: dict | None) -> list[str]:
    """The int8-cache section: placement, accuracy and decode steps, or why it failed."""
    if not kv8:
        return []
    if "error" in kv8:
        return ["", f"int8 KV cache: failed: {kv8['error']}"]
    lines = ["", "int8 KV cache (`python -m export.quantize_kv`) on the first projector's export:", ""]
    placed, a = kv8.get("placement", {}), kv8.get("accuracy", {})
    if "error" in placed:
        lines.append(f"- placement failed: {placed['error']}")
    elif placed:
        lines.append(f"- decoder: {placement_text(placed)}")
    if "error" in a:
        lines.append(f"- accuracy failed: {a['error']}")
    elif a:
        lines.append(f"- top-1 {a['top1_agreement']:.1%} of {a['teacher_forced_tokens']} against PyTorch fp32; "
                     f"greedy equal {a['greedy_equal']}; finite {a['finite']}; met {a['met']}")
    decode = kv8.get("decode", {})
    if "error" in decode:
        lines.append(f"- decode failed: {decode['error']}")
    elif decode:
        lines += ["", "| measure | PyTorch | ORT | ratio |", "|---|---|---|---|", *decode_rows(decode)]
    return lines


def ties_line(ties: dict | None) -> list[str]:
    """The fp16 ``ArgMax`` tie rule of the provider, as a line and a blank (none if not run)."""
    if not ties:
        return []
    if "error" in ties:
        return [f"fp16 ArgMax ties: failed: {ties['error']}", ""]
    return [f"fp16 ArgMax ties on {ties['provider']}: first index in {ties['first_index']} of "
            f"{ties['rows']} rows, last in {ties['last_index']}; PyTorch's argmax takes the first: "
            f"{ties['torch_first_index']}", ""]


def decode_rows(decode: dict) -> list[str]:
    rows = []
    for ctx, entry in decode.items():
        for name, v in entry.items():
            if name == "pytorch":
                continue
            inside = f"; {v['session_ms_mean']:.2f} ms in the session" if "session_ms_mean" in v else ""
            rows.append(f"| decode step {ctx} ({name}; floor {v['floor_ms']:.2f} ms = {v['floor_fraction']:.0%}{inside}) | "
                        f"{entry['pytorch']['median_ms']:.2f} | {v['median_ms']:.2f} | "
                        f"{v['median_ms'] / entry['pytorch']['median_ms']:.2f}x |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the JSON and the table go here, rewritten after every section; also the "
                        "exports unless --exports")
    p.add_argument("--exports", metavar="DIR",
                   help="where the exports go (kept, and reused by a rerun; default: --out)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: fp16 exports on ONNX Runtime's CUDA provider (default); cpu: a dry run, fp32")
    p.add_argument("--preset", default="small", help="preset of the accuracy and speed exports (default small)")
    p.add_argument("--projectors", default=",".join(VIS_PROJS),
                   help="comma-separated; the first also gets the speed runs (default: all three)")
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced tokens per export (default 256)")
    p.add_argument("--greedy", type=int, default=32, help="greedy tokens compared per export (default 32)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of vision and first token (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode-runs", type=int, default=3, help="prompt + steps runs per context and side")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--big-preset", default="dsvl-7b", help="the LLaMA-2-7B-shaped decoder (default dsvl-7b)")
    p.add_argument("--big-layers", type=int, default=4, help="its layers at real widths; 0 skips it (default 4)")
    p.add_argument("--bandwidth-mb", type=int, default=1024)
    p.add_argument("--jobs", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="exports made side by side, each in its own process, before the sections "
                        "(default: the cores, at most 8; 1 makes each in its section)")
    p.add_argument("--quick", action="store_true", help="tiny preset, few tokens and repeats, no big decoder: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.tokens, args.greedy, args.repeats, args.warmup = "tiny", 8, 4, 2, 1
        args.decode_runs, args.decode_steps, args.big_layers, args.bandwidth_mb = 1, 4, 0, 64
    for name in ("tokens", "greedy", "repeats", "decode_runs", "decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.exports = args.exports or args.out
    if args.big_layers < 0:
        p.error("--big-layers must be 0 (skip) or more")
    unknown = set(args.projectors.split(",")) - set(VIS_PROJS)
    if unknown:
        p.error(f"unknown projector(s) {', '.join(sorted(unknown))}: choose from {', '.join(VIS_PROJS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU that PyTorch sees; use --device cpu for a dry run",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = run(args)
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    save(report, out)
    print(markdown(report))
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
