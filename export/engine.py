"""Build TensorRT engines from an export's vision.onnx and decoder.onnx.

    python -m export.engine --artifacts DIR [--images 1,1,8] [--resolution MIN,OPT,MAX]
        [--prompt-len MIN,OPT,MAX] [--append-len N] [--max-context N] [--memory-budget-gb G]
        [--single-profile] [--only vision|decoder] [--version-compatible]
        [--hardware-compatible] [--workspace-gb G] [--opt-level N] [--dry-run] [--verbose]

Writes ``DIR/engines/{vision,decoder}.plan`` (temp file + rename), keeps ``timing.cache`` there
for the next build, and records what was built in the manifest's ``engines`` section
(runtime/manifest.py: EngineEntry). Profile axes are the contract's (runtime/graphs.py); the
CLI plumbing (errors as one line, progress steps, durable writes) is the exporters'
(export/cli.py, export/publish.py).

Precision comes from the ONNX types: the network is strongly typed, the only mode TensorRT 11
has (it removed ``BuilderFlag.FP16``) and one TensorRT 10.3 (JetPack 6.1/6.2) supports. An FP16
export (``--precision fp16``, FP32 islands for norms and softmax) gives an FP16 engine whose
islands stay FP32; an FP32 export gives an FP32 engine.

Decoder profiles: three by default, because TensorRT sizes every tensor of a profile for that
profile's largest shapes. One profile for "up to C new positions over up to C-1 cached" would
size concat(past, new) at 2C-1 positions and the attention scores at [heads, C, 2C-1].
``prompt`` is the first prompt: sequence 1..max_prompt with nothing cached. ``append`` covers
later prompts and chat turns: sequence 1..append_len (512 by default: one new image of 256
tokens plus a question; the runtime splits longer appends where that is exact) over 1..C-1
cached. ``decode`` is sequence 1 over 0..C-1 cached, tuned at half the context, where generation
spends its time.
They share the weights; each costs build time and, with the default STATIC allocation, the
largest one's activations (the runtime asks for ON_PROFILE_CHANGE on shared-memory Jetsons).
``--single-profile`` builds one profile over all ranges when build time matters more.
TensorRT cannot express past + seq <= max_context, so the runtime enforces it.
``--memory-budget-gb`` refuses a plan whose memory, computed from shapes (export/engine_memory.py),
does not fit; a real build records TensorRT's own per-profile figure in the manifest.

No torch here: this runs on a Jetson that has TensorRT and numpy but not PyTorch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export import engine_memory
from export.cli import Progress, cli_status
from runtime import contract
from runtime import graphs as g
from runtime.backends.cuda import GpuInfo, gpu_info
from runtime.durable import write_durable
from runtime.errors import BackendError
from runtime.manifest import (
    DecoderSection,
    EngineEntry,
    EnginesSection,
    GpuRecord,
    Manifest,
    MemoryEstimate,
    ProfileRecord,
    ShapeRange,
    VisionSection,
    read_manifest,
)

DEFAULT_IMAGES = "1,1,8"
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_APPEND_LEN = 512
JETSON_RELEASE = Path("/etc/nv_tegra_release")
JETSON_HINT = "on Jetson, JetPack 6.1+ ships it for the system python3 (python3-libnvinfer)"


class EngineBuildError(BackendError):
    """A user-facing problem: printed as one line, exit status 2 (as the other exporters)."""


# --- profiles (pure: testable without TensorRT) ---------------------------------------------


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """Named axes (the contract's: images/height/width, or batch/sequence/past_sequence/
    total_sequence) with their min/opt/max."""

    name: str
    axes: dict[str, Range] = field(default_factory=dict)

    def record_axes(self) -> dict[str, list[int]]:
        return {k: r.as_list() for k, r in self.axes.items()}

    def record(self) -> ProfileRecord:
        return ProfileRecord(self.name, self.record_axes())


BATCH = Range(1, 1, 1)  # the runtime runs batch 1


def parse_range(text: str, flag: str, minimum: int = 1) -> Range:
    """'1,4,8' -> Range(1, 4, 8); a single 'N' means N,N,N. Errors name the flag."""
    pieces = [p.strip() for p in str(text).split(",")]
    if len(pieces) not in (1, 3):
        raise EngineBuildError(f"{flag} expects MIN,OPT,MAX (e.g. 1,1,8), got '{text}'")
    try:
        values = [int(p) for p in pieces]
    except ValueError:
        raise EngineBuildError(f"{flag} expects integers MIN,OPT,MAX, got '{text}'") from None
    lo, opt, hi = values * 3 if len(values) == 1 else values
    if lo < minimum:
        raise EngineBuildError(f"{flag}: MIN must be >= {minimum}, got {lo}")
    if not lo <= opt <= hi:
        raise EngineBuildError(f"{flag}: need MIN <= OPT <= MAX, got {lo},{opt},{hi}")
    return Range(lo, opt, hi)


def vision_profile(vision: VisionSection, images: Range | None = None,
                   resolution: Range | None = None) -> Profile:
    """Images per call and (for dynamic-resolution exports) square sizes in pixels."""
    images = images or parse_range(DEFAULT_IMAGES, "--images")
    size, patch = vision.image_size, vision.patch_size
    if resolution is None:
        resolution = Range(size, size, size)
    elif not vision.dynamic_resolution and resolution != Range(size, size, size):
        raise EngineBuildError(
            f"--resolution: this vision.onnx has a fixed {size} px input; the flag applies only "
            "to dynamic-resolution exports (baseline/vit projectors exported with dynamic H/W)")
    for value in resolution.as_list():
        if value % patch:
            raise EngineBuildError(
                f"--resolution: {value} px is not a multiple of the patch size {patch}")
    return Profile("vision", {g.IMAGES: images, g.HEIGHT: resolution, g.WIDTH: resolution})


def default_max_context(decoder: DecoderSection) -> int:
    return min(DEFAULT_MAX_CONTEXT, decoder.max_position_embeddings)


def decoder_profiles(decoder: DecoderSection, image_tokens: int | None = None,
                     prompt_len: Range | None = None, max_context: int | None = None,
                     single: bool = False, append_len: int | None = None) -> list[Profile]:
    """The prompt, append and decode profiles (see the module docstring), or one merged one.
    ``image_tokens`` (one image's) tunes the first prompt's optimum."""
    if decoder.graph == contract.GRAPH_FUSED or decoder.kv_cache != contract.KV_CONCAT:
        raise EngineBuildError(
            "decoder.onnx is built from ONNX Runtime's fused ops (GroupQueryAttention, "
            "SkipSimplifiedLayerNormalization), which TensorRT cannot parse: re-export with "
            "`python -m export.all --decoder-graph standard` for TensorRT")
    limit = decoder.max_position_embeddings
    context = default_max_context(decoder) if max_context is None else int(max_context)
    if not 2 <= context <= limit:
        raise EngineBuildError(
            f"--max-context must be in 2..{limit} (max_position_embeddings), got {context}")
    if prompt_len is None:
        tokens = 192 if image_tokens is None else image_tokens
        prompt_len = Range(1, min(context, tokens + 64), context)
    if prompt_len.max > context:
        raise EngineBuildError(
            f"--prompt-len: MAX {prompt_len.max} exceeds --max-context {context} (past + seq)")
    past_opt = context // 2
    decode = Profile("decode", {g.BATCH: BATCH, g.SEQUENCE: Range(1, 1, 1),
                                g.PAST: Range(0, past_opt, context - 1),
                                g.TOTAL: Range(1, past_opt + 1, context)})
    if single:
        return [Profile("any", {g.BATCH: BATCH, g.SEQUENCE: Range(1, 1, prompt_len.max),
                                g.PAST: Range(0, past_opt, context - 1),
                                g.TOTAL: Range(1, past_opt + 1, context)})]
    append_max = DEFAULT_APPEND_LEN if append_len is None else int(append_len)
    if append_max < 1:
        raise EngineBuildError(f"--append-len must be >= 1, got {append_max}")
    append_max = min(append_max, context - 1)
    append_opt = min(64, append_max)  # a chat turn's question and template
    prompt = Profile("prompt", {g.BATCH: BATCH, g.SEQUENCE: prompt_len, g.PAST: Range(0, 0, 0),
                                g.TOTAL: prompt_len})
    append = Profile("append", {g.BATCH: BATCH, g.SEQUENCE: Range(1, append_opt, append_max),
                                g.PAST: Range(1, past_opt, context - 1),
                                g.TOTAL: Range(2, past_opt + append_opt, context)})
    return [prompt, append, decode]


def check_memory_budget(decoder: DecoderSection, profiles: list[Profile], max_context: int,
                        budget_gb: float) -> engine_memory.MemoryPlan:
    """Refuse a decoder plan whose memory, computed from shapes, exceeds ``budget_gb``."""
    dims = engine_memory.DecoderDims.from_section(decoder)
    plan = engine_memory.plan_memory(dims, profiles, max_context)
    if plan.static > budget_gb * engine_memory.GIB:
        largest = plan.largest()
        g = engine_memory.gib
        raise EngineBuildError(
            f"--memory-budget-gb {budget_gb:g}: the decoder needs about {g(plan.static)} GiB "
            f"computed from shapes (weights {g(plan.weights)} + KV cache {g(plan.kv_cache)} + "
            f"profile '{largest}' {g(plan.profiles[largest])}): lower --max-context, "
            "--prompt-len or --append-len")
    return plan


def input_axes(graph: g.GraphSpec, kind: str, name: str) -> Sequence[str]:
    """The contract's axis names of one input (runtime/graphs.py)."""
    if name not in graph.input_names:
        raise EngineBuildError(f"{kind}.onnx has an unexpected input '{name}' (contract: "
                               f"{', '.join(graph.input_names[:4])}...)")
    return graph.tensor(name).axes


def profile_shapes(name: str, onnx_shape: Sequence[int], axes: Sequence[str],
                   profile: Profile) -> tuple[list[int], list[int], list[int]]:
    """Min/opt/max shapes of one input: the profile's ranges on its axes, every other dim fixed
    by the ONNX."""
    if len(onnx_shape) != len(axes):
        raise EngineBuildError(f"input '{name}' has rank {len(onnx_shape)}, the contract says "
                               f"{len(axes)}: re-export with this package")
    shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, (dim, axis) in enumerate(zip(onnx_shape, axes, strict=True)):
        ranged = profile.axes.get(axis, BATCH if axis == g.BATCH else None)
        if ranged is None:
            if dim < 0:
                raise EngineBuildError(f"input '{name}' dim {i} ({axis}) is dynamic in the ONNX but "
                                       "should be fixed")
            values = [dim, dim, dim]
        else:
            values = ranged.as_list()
            if dim >= 0 and values != [dim, dim, dim]:
                raise EngineBuildError(
                    f"input '{name}' dim {i} ({axis}) is fixed to {dim} in the ONNX, but the "
                    f"profile '{profile.name}' asks for {values[0]}..{values[2]}")
        for shape, value in zip(shapes, values, strict=True):
            shape.append(value)
    return shapes


# --- files and manifest ---------------------------------------------------------------------


def update_manifest(artifacts: Path, kind: str, entry: EngineEntry, timing_cache: str | None) -> Manifest:
    """Record one engine in the manifest's engines section; everything else is kept as it is."""
    manifest = read_manifest(artifacts)
    engines = manifest.engines or EnginesSection()
    setattr(engines, kind, entry)
    engines.timing_cache = timing_cache or engines.timing_cache
    manifest.engines = engines
    manifest.validate("manifest")
    write_durable(Path(artifacts) / contract.MANIFEST_NAME, manifest.dumps().encode())
    return manifest


# --- environment checks ---------------------------------------------------------------------


def tensorrt_major(version: str) -> int:
    """'10.3.0.26' -> 10; 0 when unreadable."""
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def import_tensorrt() -> Any:
    """TensorRT 10 or newer: strongly typed networks, named-tensor execution, IProgressMonitor."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:
        raise EngineBuildError(f"TensorRT is not installed ({err}): `pip install tensorrt`; "
                               f"{JETSON_HINT}") from None
    if tensorrt_major(trt.__version__) < 10:
        raise EngineBuildError(f"TensorRT {trt.__version__} is too old: TensorRT 10 or newer is "
                               "needed for strongly typed networks (JetPack 6.1+ on Jetson)")
    return trt


def network_flags(trt: Any) -> int:
    """Creation flags for a strongly typed network. TensorRT 10 needs kSTRONGLY_TYPED (= 1 in
    NvInfer.h v10.3.0); from 11.0 every network is strongly typed and the flag is deprecated
    and ignored (= 0 in v11.0/v11.1), so none is passed there."""
    if tensorrt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def on_jetson() -> bool:
    """Jetson (L4T) boards carry /etc/nv_tegra_release; their GPU shares memory with the CPU."""
    return JETSON_RELEASE.exists()


# --- progress -------------------------------------------------------------------------------


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


STEPS_PER_ENGINE = 6  # parse, build, timing cache and hash, save, device memory, manifest


def make_logger(trt: Any, verbose: bool) -> Any:
    """A TensorRT logger that prints warnings (or everything) and remembers errors."""
    shown = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            try:  # an exception escaping into TensorRT's noexcept callback would abort
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                if int(severity) <= shown:
                    print(f"    TensorRT: {msg}", file=sys.stderr, flush=True)
            except BaseException:  # noqa: BLE001
                pass

    return Logger()


def make_progress_monitor(trt: Any) -> Any | None:
    """Phase progress from IProgressMonitor (TensorRT 10+); None where the API is missing."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Progress(base):
        """Prints top phases and their direct children, step counts at most every 10 s.

        Ctrl-C inside a callback cancels the build (step_complete returns False) rather
        than letting the exception reach TensorRT's noexcept code.
        """

        def __init__(self) -> None:
            base.__init__(self)
            self.lock = threading.Lock()
            self.depth: dict[str, int] = {}
            self.started: dict[str, float] = {}
            self.steps: dict[str, int] = {}
            self.last_print = 0.0
            self.cancelled = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self.lock:
                    depth = 0 if not parent_phase else self.depth.get(parent_phase, 0) + 1
                    self.depth[phase_name] = depth
                    self.started[phase_name] = time.perf_counter()
                    self.steps[phase_name] = num_steps
                    if depth <= 1:
                        print(f"    {'  ' * depth}{phase_name} ({num_steps} steps)", flush=True)
            except BaseException:  # noqa: BLE001
                self.cancelled = True

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self.lock:
                    now = time.perf_counter()
                    if self.depth.get(phase_name, 9) <= 1 and now - self.last_print > 10:
                        self.last_print = now
                        total = self.steps.get(phase_name, 0)
                        print(f"      {phase_name}: {step + 1}/{total}", flush=True)
            except BaseException:  # noqa: BLE001
                self.cancelled = True
            return not self.cancelled

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self.lock:
                    depth = self.depth.pop(phase_name, 9)
                    elapsed = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
                    if depth <= 1:
                        print(f"    {'  ' * depth}{phase_name} done in {_fmt_seconds(elapsed)}",
                              flush=True)
            except BaseException:  # noqa: BLE001
                self.cancelled = True

    return Progress()


# --- building -------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    version_compatible: bool = False
    hardware_compatible: bool = False
    workspace_gb: float | None = None
    opt_level: int | None = None
    verbose: bool = False


def parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A strongly typed network from the ONNX file (external data resolved beside it)."""
    network = builder.create_network(network_flags(trt))
    if network is None:
        detail = "; ".join(logger.errors[-2:]) or "no details"
        raise EngineBuildError(f"TensorRT {trt.__version__} refused a strongly typed network "
                               f"({detail}): use TensorRT 10 or newer")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for error in errors:
            print(f"    parser: {error}", file=sys.stderr)
        first = errors[0] if errors else "no details"
        raise EngineBuildError(f"TensorRT could not parse {onnx_path} ({len(errors)} errors; "
                               f"first: {first})")
    return network, parser  # the parser must outlive the network's weights


def network_io(network: Any) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = (list(tensor.shape), contract.tensorrt_dtype_name(tensor.dtype))
    outputs = {network.get_output(i).name: contract.tensorrt_dtype_name(network.get_output(i).dtype)
               for i in range(network.num_outputs)}
    return inputs, outputs


def precision_of(kind: str, inputs: dict[str, tuple[list[int], str]]) -> str:
    """The engine's precision, read off its float input: strong typing keeps ONNX types."""
    main = contract.VISION_INPUT if kind == "vision" else contract.INPUTS_EMBEDS
    fp32 = contract.io_dtype("fp32")
    dtype = inputs.get(main, ([], fp32))[1]
    if dtype == fp32:
        print(f"note: {kind}.onnx is FP32, so its strongly typed engine will be FP32 (about twice "
              "the memory and slower). For FP16, re-export with `python -m export.all "
              "--precision fp16 --out DIR`.", flush=True)
        return "fp32"
    return contract.precision_of(dtype)


def apply_compatibility(trt: Any, config: Any, options: BuildOptions) -> None:
    """Map the two compatibility flags onto the builder, or stop if this TensorRT lacks them."""
    if options.version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise EngineBuildError(f"--version-compatible: TensorRT {trt.__version__} has no "
                                   "BuilderFlag.VERSION_COMPATIBLE")
        config.set_flag(flag)
    if options.hardware_compatible:
        refuse_hardware_compatible_on_jetson()
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        level = getattr(levels, "AMPERE_PLUS", None)
        if level is None or not hasattr(config, "hardware_compatibility_level"):
            raise EngineBuildError(f"--hardware-compatible: TensorRT {trt.__version__} has no "
                                   "HardwareCompatibilityLevel.AMPERE_PLUS")
        config.hardware_compatibility_level = level


def refuse_hardware_compatible_on_jetson() -> None:
    """TensorRT's hardware compatibility targets discrete Ampere+ GPUs, not Jetson."""
    if on_jetson():
        raise EngineBuildError("--hardware-compatible is not supported on Jetson (TensorRT builds "
                               "hardware-compatible engines for discrete Ampere+ GPUs only): "
                               "drop the flag and build on the board that runs the engine")


def add_profiles(builder: Any, config: Any, kind: str, graph: g.GraphSpec, profiles: list[Profile],
                 inputs: dict[str, tuple[list[int], str]]) -> list[dict[str, Any]]:
    """One optimization profile per Profile, in order; returns the shapes for the manifest.

    IOptimizationProfile.set_shape raises RuntimeError on inconsistent shapes (pyCore.cpp) and
    add_optimization_profile returns -1 for an invalid profile (NvInfer.h): both stop the build
    with the profile, input and shapes named.
    """
    records = []
    for index, profile in enumerate(profiles):
        trt_profile = builder.create_optimization_profile()
        shapes: dict[str, ShapeRange] = {}
        for name, (onnx_shape, _) in inputs.items():
            lo, opt, hi = profile_shapes(name, onnx_shape, input_axes(graph, kind, name), profile)
            try:
                trt_profile.set_shape(name, lo, opt, hi)
            except (RuntimeError, TypeError, ValueError) as err:
                raise EngineBuildError(f"TensorRT refused shapes min {lo} opt {opt} max {hi} for "
                                       f"'{name}' in {kind} profile '{profile.name}' ({err})"
                                       ) from None
            if not contract.is_past_name(name) or name == contract.past_key_name(0):
                key = contract.PAST_GLOB if contract.is_past_name(name) else name
                shapes[key] = ShapeRange(lo, opt, hi)
        added = config.add_optimization_profile(trt_profile)
        if added != index:
            raise EngineBuildError(f"TensorRT rejected {kind} profile '{profile.name}' "
                                   f"(add_optimization_profile returned {added}, expected "
                                   f"{index}): its shapes are {profile.record_axes()}")
        records.append(ProfileRecord(profile.name, profile.record_axes(), shapes))
    return records


def profile_device_memory(trt: Any, logger: Any, plan: Any, count: int,
                          version_compatible: bool = False) -> list[int] | None:
    """TensorRT's own activation memory per profile (get_device_memory_size_for_profile_v2,
    TensorRT 10.1+), read by deserializing the plan once; None where that is not possible."""
    runtime = trt.Runtime(logger)
    if version_compatible:  # the plan embeds its lean runtime, which must be allowed to load
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None
    query = getattr(engine, "get_device_memory_size_for_profile_v2", None)
    sizes = [int(query(i)) for i in range(count)] if query is not None else None
    del engine, runtime  # free the weights before the next build
    return sizes


def attach_timing_cache(config: Any, cache_bytes: bytes) -> Any:
    """Reuse measured tactics from earlier builds; a stale or foreign cache is replaced."""
    try:
        cache = config.create_timing_cache(cache_bytes)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    except Exception:  # noqa: BLE001 - a corrupt cache file is not worth stopping for
        pass
    print("note: timing.cache does not fit this TensorRT/GPU; starting a fresh one", flush=True)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        print("note: TensorRT refused a fresh timing cache; building without one", flush=True)
        return None
    return cache


def build_one(trt: Any, kind: str, onnx_path: Path, plan_path: Path, graph: g.GraphSpec,
              profiles: list[Profile], options: BuildOptions, cache_path: Path,
              gpu: GpuInfo, progress: Progress) -> EngineEntry:
    """Parse, build, save one engine and the timing cache; return its manifest entry."""
    logger = make_logger(trt, options.verbose)
    try:
        builder = trt.Builder(logger)
    except Exception as err:  # noqa: BLE001 - pybind reports a failed CUDA init as TypeError
        raise EngineBuildError(f"TensorRT could not create a builder ({err}): is the GPU "
                               "usable by this process?") from None
    with progress.step(f"{kind}: parse {onnx_path.name}"):
        network, _parser = parse_onnx(trt, builder, logger, onnx_path)
        inputs, outputs = network_io(network)
    precision = precision_of(kind, inputs)
    config = builder.create_builder_config()
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    apply_compatibility(trt, config, options)
    records = add_profiles(builder, config, kind, graph, profiles, inputs)
    cache = attach_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"")
    monitor = make_progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    start = time.perf_counter()
    with progress.step(f"{kind}: build ({precision}, {len(profiles)} profile(s))"):
        plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if plan is None:
        if monitor is not None and monitor.cancelled:
            raise EngineBuildError(f"{kind} build cancelled")
        detail = "; ".join(logger.errors[-3:]) or "see the TensorRT messages above"
        raise EngineBuildError(f"TensorRT failed to build the {kind} engine: {detail}")
    with progress.step(f"{kind}: serialize timing cache and hash plan"):
        cache_bytes = bytes(cache.serialize()) if cache is not None else None
        digest = hashlib.sha256(memoryview(plan)).hexdigest()
    with progress.step(f"{kind}: save {plan_path.name} ({plan.nbytes / 2**20:.1f} MiB)"):
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        write_durable(plan_path, memoryview(plan))
        if cache_bytes is not None:
            write_durable(cache_path, cache_bytes)
    del network, _parser, config, builder  # release the builder's memory before the check
    with progress.step(f"{kind}: device memory per profile"):
        memory = profile_device_memory(trt, logger, plan, len(profiles), options.version_compatible)
    for record, size in zip(records, memory or [], strict=False):
        record.device_memory_bytes = size
    io_dtypes = {n: d for n, (_, d) in inputs.items() if not contract.is_past_name(n)}
    io_dtypes.update({n: d for n, d in outputs.items() if not contract.is_present_name(n)})
    if contract.past_key_name(0) in inputs:
        io_dtypes[contract.PAST_GLOB] = inputs[contract.past_key_name(0)][1]
    return EngineEntry(
        file=f"{contract.ENGINES_DIR}/{plan_path.name}", bytes=int(plan.nbytes), sha256=digest,
        precision=precision, tensorrt_version=trt.__version__,
        gpu=GpuRecord(gpu.name, gpu.compute_capability, gpu.total_memory_bytes),
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(build_seconds, 1), strongly_typed=True,
        version_compatible=options.version_compatible,
        hardware_compatibility="ampere_plus" if options.hardware_compatible else "none",
        io_dtypes=io_dtypes, profiles=records)


# --- CLI ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m export.engine", description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True, type=Path, help="export directory (manifest.json)")
    ap.add_argument("--images", default=DEFAULT_IMAGES, help="vision images per call MIN,OPT,MAX")
    ap.add_argument("--resolution", help="vision H=W pixels MIN,OPT,MAX (dynamic exports only); "
                    "default: the manifest's image_size")
    ap.add_argument("--prompt-len", help="decoder first-prompt seq MIN,OPT,MAX; default "
                    "1,image_tokens+64,max_context")
    ap.add_argument("--max-context", type=int, help="past+seq positions (default "
                    f"min({DEFAULT_MAX_CONTEXT}, max_position_embeddings))")
    ap.add_argument("--append-len", type=int, help="most new positions per call after the first "
                    f"prompt (chat turns; default {DEFAULT_APPEND_LEN})")
    ap.add_argument("--memory-budget-gb", type=float, help="refuse a decoder plan whose memory, "
                    "computed from shapes (weights + KV cache + largest profile), exceeds G GiB")
    ap.add_argument("--single-profile", action="store_true",
                    help="one decoder profile for prompt, append and decode (faster build)")
    ap.add_argument("--only", choices=("vision", "decoder"), help="build one engine")
    ap.add_argument("--version-compatible", action="store_true",
                    help="BuilderFlag.VERSION_COMPATIBLE: runs on later TensorRT of the same major")
    ap.add_argument("--hardware-compatible", action="store_true",
                    help="HardwareCompatibilityLevel.AMPERE_PLUS: runs on any sm_80+ GPU")
    ap.add_argument("--workspace-gb", type=float, help="builder workspace limit in GiB")
    ap.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the profiles and exit (no TensorRT needed)")
    ap.add_argument("--verbose", action="store_true", help="show TensorRT's verbose log")
    return ap.parse_args(argv)


def plan_profiles(args: argparse.Namespace, manifest: Manifest,
                  artifacts: Path) -> dict[str, list[Profile]]:
    """Validate the flags against the manifest and return the profiles of each engine to build."""
    kinds = [args.only] if args.only else ["vision", "decoder"]
    manifest.require(*kinds, root=artifacts)
    plans: dict[str, list[Profile]] = {}
    if manifest.vision is not None and "vision" in kinds:
        resolution = parse_range(args.resolution, "--resolution") if args.resolution else None
        plans["vision"] = [vision_profile(manifest.vision, parse_range(args.images, "--images"),
                                          resolution)]
    if manifest.decoder is not None and "decoder" in kinds:
        prompt = parse_range(args.prompt_len, "--prompt-len") if args.prompt_len else None
        image_tokens = manifest.vision.image_tokens if manifest.vision else None
        plans["decoder"] = decoder_profiles(manifest.decoder, image_tokens, prompt, args.max_context,
                                            args.single_profile, args.append_len)
        if args.memory_budget_gb is not None:
            check_memory_budget(manifest.decoder, plans["decoder"], decoder_context(plans["decoder"]),
                                args.memory_budget_gb)
    if args.hardware_compatible:
        refuse_hardware_compatible_on_jetson()
    return plans


def decoder_context(profiles: list[Profile]) -> int:
    return max(p.axes[g.TOTAL].max for p in profiles)


def memory_estimate(decoder: DecoderSection, profiles: list[Profile]) -> MemoryEstimate:
    """The manifest's record of what the decoder needs, computed from shapes."""
    dims = engine_memory.DecoderDims.from_section(decoder)
    plan = engine_memory.plan_memory(dims, profiles, decoder_context(profiles))
    return MemoryEstimate(plan.weights, plan.kv_cache, plan.profiles, plan.static)


def graph_of(manifest: Manifest, kind: str) -> g.GraphSpec:
    """The contract's I/O table for the ONNX file the engine is built from."""
    if kind == "vision" and manifest.vision is not None:
        return g.vision_graph(manifest.vision.dynamic_resolution, manifest.vision.fixed_tokens)
    assert manifest.decoder is not None  # noqa: S101 - plan_profiles required it
    return g.decoder_graph(manifest.decoder.num_layers, manifest.decoder.kv_cache, manifest.decoder.graph,
                           manifest.decoder.kv_cache_dtype)


def onnx_path(artifacts: Path, manifest: Manifest, kind: str) -> Path:
    """The ONNX file of an engine, as the manifest names it."""
    section = manifest.vision if kind == "vision" else manifest.decoder
    assert section is not None  # noqa: S101 - plan_profiles required it
    path = artifacts / section.file.path
    if not path.is_file():
        raise EngineBuildError(f"{path} not found: export first with "
                               f"`python -m export.all --out {artifacts} --precision fp16`")
    return path


def run(args: argparse.Namespace) -> int:
    artifacts: Path = args.artifacts
    if not artifacts.is_dir():
        raise EngineBuildError(f"artefact directory {artifacts} not found: export first with "
                               f"`python -m export.all --out {artifacts} --precision fp16`")
    manifest = read_manifest(artifacts)
    plans = plan_profiles(args, manifest, artifacts)
    if args.dry_run:
        printed: dict[str, Any] = {k: [p.record().to_dict() for p in v] for k, v in plans.items()}
        if manifest.decoder is not None and "decoder" in plans:
            printed["decoder_memory"] = memory_estimate(manifest.decoder, plans["decoder"]).to_dict()
        print(json.dumps(printed))
        return 0
    paths = {kind: onnx_path(artifacts, manifest, kind) for kind in plans}
    trt = import_tensorrt()
    gpu = gpu_info()
    print(f"TensorRT {trt.__version__} on {gpu.name} (sm {gpu.compute_capability}, "
          f"{gpu.total_memory_bytes / 2**30:.1f} GiB)", flush=True)
    options = BuildOptions(args.version_compatible, args.hardware_compatible,
                           args.workspace_gb, args.opt_level, args.verbose)
    engines_dir = artifacts / contract.ENGINES_DIR
    cache_path = engines_dir / contract.TIMING_CACHE
    plan_files = {"vision": contract.VISION_PLAN, "decoder": contract.DECODER_PLAN}
    progress = Progress(total=STEPS_PER_ENGINE * len(plans))
    for kind, profiles in plans.items():
        entry = build_one(trt, kind, paths[kind], engines_dir / plan_files[kind],
                          graph_of(manifest, kind), profiles, options, cache_path, gpu, progress)
        source = manifest.vision if kind == "vision" else manifest.decoder
        entry.onnx_sha256 = source.file.sha256 if source is not None else None
        if kind == "decoder" and manifest.decoder is not None:
            entry.max_context = decoder_context(profiles)
            entry.max_prompt = profiles[0].axes[g.SEQUENCE].max
            entry.memory_estimate = memory_estimate(manifest.decoder, profiles)
        with progress.step(f"{kind}: update {contract.MANIFEST_NAME}"):
            update_manifest(artifacts, kind, entry, f"{contract.ENGINES_DIR}/{contract.TIMING_CACHE}")
    print(f"engines in {engines_dir}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Build, returning the exit status: 2 with one ``error:`` line for a user-facing problem
    (export/cli.py's ``cli_status``, as every exporter), 130 on Ctrl-C."""
    args = parse_args(argv)
    return cli_status(lambda: run(args),
                      interrupted="error: interrupted; no engine file was left half-written",
                      disk_hint="free space, then re-run; the engines and manifest.json already "
                                "there are untouched")


if __name__ == "__main__":
    sys.exit(main())
