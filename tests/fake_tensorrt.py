"""Stand-ins for TensorRT's Python bindings and cuda-python, built from TensorRT's documented
behaviour rather than from what this package expects.

Each behaviour cites its source: the C++ headers (``include/NvInfer.h``,
``include/NvInferRuntime.h``, ``include/NvInferRuntimeBase.h``) and the pybind11 bindings
(``python/src/infer/pyCore.cpp``, ``pyFoundationalTypes.cpp``) of NVIDIA/TensorRT at tags
v10.3.0 and v11.1. "Engines" are JSON specs (I/O names, types, Dims with -1, profiles); the
execution context runs a toy decoder / vision encoder on host memory handed out by the fake
cudaMalloc, so every copy the runtime makes is real.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from runtime import contract


def _major(version: str) -> int:
    return int(version.split(".")[0])


# --- enums, with the values of each release -------------------------------------------------


def _enum(name: str, members: dict[str, int]) -> type[enum.IntEnum]:
    """pybind11 enums declared with py::arithmetic: int() works, members have .name."""
    return enum.IntEnum(name, members)


def _network_flags(version: str, drop_strongly_typed: bool) -> type[enum.IntEnum]:
    # NvInfer.h v10.3.0: kEXPLICIT_BATCH = 0 (deprecated), kSTRONGLY_TYPED = 1.
    # NvInfer.h v11.0/v11.1: kSTRONGLY_TYPED = 0, "Deprecated in TensorRT 11.0. Strongly typed
    # mode is always enabled. This flag is retained for API compatibility but is ignored."
    if _major(version) == 10:
        return _enum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    members = {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1, "PREFER_JIT_PYTHON_PLUGINS": 2}
    if drop_strongly_typed:  # a later 11.x that removes the deprecated member
        del members["STRONGLY_TYPED"]
    return _enum("NetworkDefinitionCreationFlag", members)


def _builder_flags(version: str) -> type[enum.IntEnum]:
    # NvInfer.h v10.3.0: kFP16 = 0 ... kVERSION_COMPATIBLE = 13, kEXCLUDE_LEAN_RUNTIME = 14.
    # NvInfer.h v11.1: kFP16/kINT8/kBF16 removed (strong typing only); kVERSION_COMPATIBLE = 12.
    if _major(version) == 10:
        return _enum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3,
                                     "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
                                     "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14})
    return _enum("BuilderFlag", {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                                 "DISABLE_TIMING_CACHE": 5, "TF32": 6, "VERSION_COMPATIBLE": 12,
                                 "EXCLUDE_LEAN_RUNTIME": 13})


# NvInferRuntimeBase.h (v10.3.0 and v11.1): DataType kFLOAT = 0, kHALF = 1, kINT8 = 2,
# kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6, kBF16 = 7, kINT64 = 8, kINT4 = 9.
DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4,
                              "UINT8": 5, "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9})
NP_OF = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64,
         DataType.INT32: np.int32}
TYPE_OF = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int64": DataType.INT64}
# NvInferRuntime.h (v10.3.0 and v11.1): kSTATIC = 0 ("maximum size across all profiles"),
# kON_PROFILE_CHANGE = 1 ("reallocate for a profile when it's selected"), kUSER_MANAGED = 2.
AllocationStrategy = _enum("ExecutionContextAllocationStrategy",
                           {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})
# NvInferRuntime.h ILogger::Severity: kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3,
# kVERBOSE = 4.
Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3,
                              "VERBOSE": 4})
# NvInfer.h HardwareCompatibilityLevel: kNONE = 0, kAMPERE_PLUS = 1 (11.x adds
# kSAME_COMPUTE_CAPABILITY = 2).
HardwareLevel = _enum("HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1})
TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})


class Dims:
    """pyFoundationalTypes.cpp: Dims has __len__, __getitem__ and __eq__ against lists and
    tuples, no __iter__ (iteration goes through __getitem__), and -1 marks a dynamic dimension
    in network and engine shapes. It is not a tuple: ``tuple(dims)`` converts it."""

    def __init__(self, shape=()):
        self._dims = [int(d) for d in shape]

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index):
        return self._dims[index]  # IndexError ends iteration, as pybind's sequence protocol

    def __eq__(self, other) -> bool:
        return isinstance(other, (Dims, list, tuple)) and list(self._dims) == list(other)

    def __repr__(self) -> str:
        return f"Dims({self._dims})"


def _as_dims(shape) -> list[int]:
    """The binding converts a list/tuple/Dims to C++ Dims (castDimsFromPyIterable)."""
    return [int(shape[i]) for i in range(len(shape))]


# --- cuda-python on host memory ---------------------------------------------------------------


def fake_cudart() -> types.SimpleNamespace:
    """cudaMalloc hands out host memory, 256-byte aligned as cudaMalloc guarantees (and as
    IExecutionContext::setTensorAddress requires); every copy is a memmove. (The GPU's identity
    comes from runtime/backends/cuda.py's gpu_info, which the tests replace.)"""
    blocks: dict[int, object] = {}

    def malloc(n):
        block = ctypes.create_string_buffer(int(n) + 256)
        address = (ctypes.addressof(block) + 255) // 256 * 256
        blocks[address] = block
        return 0, address

    def copy2d(dst, dpitch, src, spitch, width, height, _kind, _stream):
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (0,)

    return types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaMemcpyKind=types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3),
        cudaGetErrorName=lambda e: (0, b"err"), cudaGetErrorString=lambda e: (0, b"err"),
        cudaMalloc=malloc,
        cudaFree=lambda p: (blocks.pop(p, None), 0)[1:],
        cudaMemcpyAsync=lambda d, s, n, k, st: (ctypes.memmove(d, s, n), 0)[1:],
        cudaMemcpy2DAsync=copy2d, cudaStreamCreate=lambda: (0, 7),
        cudaStreamSynchronize=lambda s: (0,), cudaStreamDestroy=lambda s: (0,), blocks=blocks)


def host_array(address: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * max(count * np.dtype(dtype).itemsize, 1)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))


# --- the runtime half: engine and execution context -------------------------------------------


class FakeContext:
    """IExecutionContext over a JSON engine spec, enforcing what NvInferRuntime.h documents."""

    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.spec = engine, engine.spec
        self.strategy = strategy
        self.profile = 0  # "The newly created execution context will be assigned profile 0."
        self.shapes: dict[str, list[int]] = {}
        self.addresses: dict[str, int] = {}
        self.profiles_used: list[int] = []
        self.allocations: list[int] = []  # device memory sizes the context allocated, in order
        if int(strategy) == int(AllocationStrategy.STATIC):
            self.allocations.append(max(engine.memory))  # kSTATIC: max over all profiles
        elif int(strategy) == int(AllocationStrategy.ON_PROFILE_CHANGE):
            self.allocations.append(engine.memory[0])

    def _error(self, message: str) -> None:
        self.engine.logger.log(Severity.ERROR, message)

    def set_optimization_profile_async(self, index: int, _stream: int) -> bool:
        # pyCore.cpp (v10.3.0, v11.1): PY_ASSERT_RUNTIME_ERROR(setOptimizationProfileAsync(...),
        # "Error in set optimization profile async."); return true. It raises, never False.
        if not 0 <= index < len(self.spec["profiles"]) or self.engine.fail_profile_switch:
            self._error(f"setOptimizationProfileAsync: profile {index} failed")
            raise RuntimeError("Error in set optimization profile async.")
        if index != self.profile:
            self.shapes.clear()  # "must be called before calling setInputShape()" for all inputs
            if int(self.strategy) == int(AllocationStrategy.ON_PROFILE_CHANGE):
                self.allocations.append(self.engine.memory[index])
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        # NvInferRuntime.h setInputShape: "True on success, false if the provided name does not
        # map to an input tensor, or if some other error occurred. Each dimension must agree with
        # the network dimension unless the latter was -1"; shapes outside the selected profile
        # are refused. pyCore.cpp binds it as a plain bool return.
        dims = _as_dims(shape)
        io = self.spec["io"].get(name)
        if io is None or io["mode"] != "input":
            self._error(f"setInputShape: '{name}' is not an input tensor")
            return False
        network = io["shape"]
        if len(dims) != len(network) or any(n != -1 and n != d for n, d in zip(network, dims, strict=True)):
            self._error(f"setInputShape: {dims} does not match {network} for '{name}'")
            return False
        lo, _, hi = self.spec["profiles"][self.profile][name]
        if not all(a <= d <= b for a, d, b in zip(lo, dims, hi, strict=True)):
            self._error(f"setInputShape: {dims} of '{name}' outside profile {self.profile}")
            return False
        self.shapes[name] = dims
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        # pyCore.cpp: returns self.setTensorAddress(...) (bool). NvInferRuntime.h: "Return false
        # if the provided name does not map to an input or output tensor"; "The pointer must
        # have at least 256-byte alignment."
        if name not in self.spec["io"]:
            self._error(f"setTensorAddress: no tensor '{name}'")
            return False
        if address % 256:
            self._error(f"setTensorAddress: '{name}' address not 256-byte aligned")
            return False
        self.addresses[name] = int(address)
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        """Outputs are known once every input shape is set; -1 until then (NvInferRuntime.h)."""
        io = self.spec["io"][name]
        if io["mode"] == "input":
            return Dims(self.shapes.get(name, io["shape"]))
        if not self._inputs_ready():
            return Dims(io["shape"])
        return Dims(self.engine.output_shape(name, self.shapes))

    def _inputs_ready(self) -> bool:
        return all(n in self.shapes for n, io in self.spec["io"].items() if io["mode"] == "input")

    def execute_async_v3(self, _stream: int) -> bool:
        # pyCore.cpp: returns enqueueV3(stream), "True if the kernels were enqueued
        # successfully, false otherwise"; NvInferRuntime.h setTensorAddress: "Before calling
        # enqueueV3(), each input must have a non-null address and each output must have a
        # non-null address"; input shapes must be set after the profile (see above).
        missing = [n for n in self.spec["io"] if n not in self.addresses]
        unset = [n for n, io in self.spec["io"].items()
                 if io["mode"] == "input" and n not in self.shapes]
        if missing or unset or self.engine.fail_execute:
            self._error(f"enqueueV3: unbound {missing}, unset shapes {unset}")
            return False
        self.profiles_used.append(self.profile)
        self.engine.compute(self)
        return True

    def read(self, name: str) -> np.ndarray:
        """An input as the engine's declared type reads it (dtype-honest)."""
        return host_array(self.addresses[name], self.shapes[name],
                          NP_OF[self.engine.get_tensor_dtype(name)]).copy()

    def write(self, name: str, value: np.ndarray) -> None:
        out = host_array(self.addresses[name], value.shape, NP_OF[self.engine.get_tensor_dtype(name)])
        out[:] = value


class FakeEngine:
    """ICudaEngine: I/O names, DataType, Dims with -1, profiles, per-profile device memory."""

    def __init__(self, spec: dict, logger: Any, version: str):
        self.spec, self.logger, self.version = spec, logger, version
        self.names = list(spec["io"])
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(spec["profiles"])
        self.memory = spec.get("device_memory") or [1 << 20] * len(spec["profiles"])
        self.contexts: list[FakeContext] = []
        self.fail_profile_switch = self.fail_execute = False

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return TensorIOMode.INPUT if self.spec["io"][name]["mode"] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return TYPE_OF[self.spec["io"][name]["dtype"]]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self.spec["io"][name]["shape"])

    def get_tensor_profile_shape(self, name: str, index: int) -> list[Dims]:
        return [Dims(s) for s in self.spec["profiles"][index][name]]

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        # NvInferRuntime.h (10.1+): "the maximum device memory required by the context for a
        # profile".
        return int(self.memory[index])

    def create_execution_context(self, strategy=AllocationStrategy.STATIC) -> FakeContext:
        # pyCore.cpp: create_execution_context(strategy=kSTATIC)
        self.contexts.append(FakeContext(self, strategy))
        return self.contexts[-1]

    def output_shape(self, name: str, shapes: dict[str, list[int]]) -> list[int]:
        if self.spec["kind"] == "vision":
            return [shapes[contract.VISION_INPUT][0], 4, self.spec["lang_dim"]]
        seq = shapes[contract.INPUTS_EMBEDS][1]
        if name == contract.LOGITS:
            return [1, seq, self.spec["vocab"]]
        past = shapes[contract.past_key_name(0)]
        return [1, past[1], past[2] + seq, past[3]]

    def compute(self, context: FakeContext) -> None:
        """A toy network whose outputs depend on every input and every cached position."""
        if self.spec["kind"] == "vision":
            pixels = context.read(contract.VISION_INPUT).astype(np.float32)
            out = np.ones((len(pixels), 4, self.spec["lang_dim"]), np.float32)
            context.write(contract.VISION_OUTPUT, out * pixels.mean(axis=(1, 2, 3))[:, None, None])
            return
        embeds = context.read(contract.INPUTS_EMBEDS)
        mask = context.read(contract.ATTENTION_MASK)
        positions = context.read(contract.POSITION_IDS)
        seq, heads, dim = embeds.shape[1], self.spec["heads"], self.spec["head_dim"]
        new = embeds[0, :, :heads * dim].reshape(seq, heads, dim).transpose(1, 0, 2)[None]
        total = None
        for layer in range(self.spec["layers"]):
            for which, past_name, present_name in (
                    (0, contract.past_key_name(layer), contract.present_key_name(layer)),
                    (1, contract.past_value_name(layer), contract.present_value_name(layer))):
                present = np.concatenate([context.read(past_name),
                                          (new + (layer + which)).astype(new.dtype)], axis=2)
                context.write(present_name, present)
                if layer == 0 and which == 0:
                    total = present
        cumulative = np.cumsum(total.astype(np.float32).sum(axis=(0, 1, 3)))[-seq:]
        cumulative = cumulative + mask.sum() / 64 + positions[0] / 128
        logits = cumulative[:, None] * np.arange(1, self.spec["vocab"] + 1) / 100
        context.write(contract.LOGITS, logits[None])


# --- the builder half -------------------------------------------------------------------------


class FakeProfile:
    """IOptimizationProfile. pyCore.cpp opt_profile_set_shape: each of setDimensions(kMIN/kOPT/
    kMAX) is wrapped in PY_ASSERT_RUNTIME_ERROR ("Shape provided for min is inconsistent with
    other shapes."): a bad shape raises RuntimeError. isValid() is the binding's __bool__."""

    def __init__(self):
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        lo, opt, hi = _as_dims(lo), _as_dims(opt), _as_dims(hi)
        if len(lo) != len(opt) or len(opt) != len(hi) or min(lo, default=0) < 0:
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        self.shapes[name] = (lo, opt, hi)

    def __bool__(self) -> bool:
        return bool(self.shapes)


class FakeNetwork:
    def __init__(self):
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int):
        return self.inputs[i]

    def get_output(self, i: int):
        return self.outputs[i]


class FakeTimingCache:
    def __init__(self, device: str, entries: bytes = b""):
        self.device, self.entries = device, entries

    def serialize(self) -> bytes:
        return f"TRTCACHE|{self.device}|".encode() + self.entries


def fake_tensorrt(version: str = "10.3.0", device: str = "Fake GPU sm87", *,
                  drop_strongly_typed: bool = False, fail_build: str | None = None,
                  memory: list[int] | None = None) -> types.ModuleType:
    """A ``tensorrt`` module as release ``version`` has it. ``fail_build`` makes the build
    return None after logging that message; ``memory`` is each profile's device memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.built = []  # (network flags, config) per build, for tests
    major = _major(version)
    network_flag = _network_flags(version, drop_strongly_typed)
    trt.NetworkDefinitionCreationFlag = network_flag
    trt.BuilderFlag = _builder_flags(version)
    trt.DataType, trt.ExecutionContextAllocationStrategy = DataType, AllocationStrategy
    trt.HardwareCompatibilityLevel, trt.TensorIOMode, trt.Dims = HardwareLevel, TensorIOMode, Dims
    trt.MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0})

    class ILogger:
        Severity = globals()["Severity"]

        def __init__(self, *_):
            pass

        def log(self, severity, msg):  # pragma: no cover - subclasses override
            pass

    class Logger(ILogger):
        """trt.Logger(min_severity): prints nothing here, keeps the messages."""

        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(Severity)

        def __init__(self, min_severity=Severity.WARNING):
            super().__init__()
            self.messages: list[tuple[int, str]] = []

        def log(self, severity, msg):
            self.messages.append((int(severity), msg))

    class IProgressMonitor:
        def __init__(self):
            pass

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            try:
                graph = json.loads(Path(path).read_text())
            except (OSError, ValueError) as err:
                self.errors.append(f"ModelImporter: cannot read {path}: {err}")
                return False
            self.network.inputs = [types.SimpleNamespace(name=n, shape=Dims(s), dtype=TYPE_OF[d])
                                   for n, (s, d) in graph["inputs"].items()]
            self.network.outputs = [types.SimpleNamespace(name=n, shape=Dims([]), dtype=TYPE_OF[d])
                                    for n, d in graph["outputs"].items()]
            self.network.meta = graph.get("meta", {})
            return True

    class BuilderConfig:
        def __init__(self, builder):
            self.builder = builder
            self.profiles: list[FakeProfile] = []
            self.flags: list[Any] = []
            self.progress_monitor = None
            self.hardware_compatibility_level = HardwareLevel.NONE
            self.builder_optimization_level = 3
            self.cache: FakeTimingCache | None = None

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            if flag not in list(trt.BuilderFlag):
                raise TypeError(f"set_flag(): incompatible function arguments: {flag!r}")
            self.flags.append(flag)

        def add_optimization_profile(self, profile) -> int:
            # NvInfer.h addOptimizationProfile: "The index of the optimization profile (starting
            # from 0) if the input is valid, or -1 if the input is not valid." A profile must
            # give every dynamic network input a shape.
            names = {t.name for t in self.builder.network.inputs}
            if not profile or set(profile.shapes) != names:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: bytes):
            # NvInfer.h createTimingCache: a size of 0 "means create a new cache from scratch".
            data = bytes(blob)
            if not data:
                return FakeTimingCache(device)
            if not data.startswith(b"TRTCACHE|"):
                self.builder.logger.log(Severity.ERROR, "createTimingCache: corrupt blob")
                return None
            _, owner, entries = data.split(b"|", 2)
            return FakeTimingCache(owner.decode(), entries)

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            # NvInfer.h setTimingCache: "A failure will be reported if the CUDA device property
            # in the provided cache is different from current environment"; "true if set
            # successfully, false otherwise".
            if cache.device != device and not ignore_mismatch:
                self.builder.logger.log(Severity.ERROR, "setTimingCache: device mismatch")
                return False
            self.cache = cache
            return True

    class HostMemory(bytes):
        @property
        def nbytes(self) -> int:
            return len(self)

    class Builder:
        def __init__(self, logger):
            self.logger, self.network = logger, None

        def create_network(self, flags: int = 0):
            valid = sum(1 << int(f) for f in network_flag)
            if flags & ~valid:
                self.logger.log(Severity.ERROR, f"createNetworkV2: invalid flags {flags}")
                return None
            self.network = FakeNetwork()
            self.network.flags = flags
            return self.network

        def create_builder_config(self):
            return BuilderConfig(self)

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            # 10.x builds a weakly typed network unless kSTRONGLY_TYPED is set; 11.x is always
            # strongly typed. Failures are reported through the logger, the result is None.
            strongly_typed = major >= 11 or network.flags & (1 << 1)
            if fail_build or not strongly_typed:
                self.logger.log(Severity.ERROR, fail_build or "network is not strongly typed")
                return None
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactics", "Building engine", 3)
                if not monitor.step_complete("Tactics", 0):
                    return None
                monitor.phase_finish("Tactics")
                monitor.phase_finish("Building engine")
            if config.cache is not None:
                config.cache.entries += b"+tuned"
            trt.built.append((network.flags, config))
            spec = plan_spec(network, config.profiles, memory)
            spec["built_by"] = version
            spec["version_compatible"] = trt.BuilderFlag.VERSION_COMPATIBLE in config.flags
            return HostMemory(json.dumps(spec).encode())

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            try:
                spec = json.loads(bytes(data))
            except ValueError:
                spec = {}
            if "io" not in spec or not self._compatible(spec):
                self.logger.log(Severity.ERROR, "deserializeCudaEngine: incompatible plan")
                return None
            return FakeEngine(spec, self.logger, version)

        def _compatible(self, spec: dict) -> bool:
            """Engine Compatibility (11.1) and the 11.4 support matrix: a plain plan loads only
            on its own release; a version-compatible one on later releases of its major, and
            10.x ones on 11.x, with engine_host_code_allowed set (its lean runtime)."""
            built = spec.get("built_by", version)
            if built == version:
                return True
            b, i = [int(x) for x in built.split(".")[:3]], [int(x) for x in version.split(".")[:3]]
            later = (b[0] == i[0] and i >= b) or (b[0], i[0]) == (10, 11)
            return bool(spec.get("version_compatible")) and later and self.engine_host_code_allowed

    trt.ILogger, trt.Logger, trt.IProgressMonitor = ILogger, Logger, IProgressMonitor
    trt.OnnxParser, trt.Builder, trt.Runtime = OnnxParser, Builder, Runtime
    return trt


def plan_spec(network: FakeNetwork, profiles: list[FakeProfile],
              memory: list[int] | None = None) -> dict:
    """What a built decoder/vision engine reports, from the network and the profiles."""
    io = {t.name: {"mode": "input", "dtype": _type_name(t.dtype), "shape": list(t.shape)}
          for t in network.inputs}
    kind = "vision" if contract.VISION_INPUT in io else "decoder"
    meta = getattr(network, "meta", {})
    spec: dict[str, Any] = {"kind": kind, "io": io,
                            "profiles": [{n: list(s) for n, s in p.shapes.items()} for p in profiles],
                            "device_memory": memory or [(i + 1) << 20 for i in range(len(profiles))]}
    if kind == "vision":
        spec["lang_dim"] = meta.get("lang_dim", 6)
        output_shape = lambda name: [-1, 4, spec["lang_dim"]]  # noqa: E731
    else:
        kv = io[contract.past_key_name(0)]["shape"]
        layers = sum(1 for n in io if n.startswith("past_key_values.") and n.endswith(".key"))
        spec.update(layers=layers, heads=kv[1], head_dim=kv[3], vocab=meta.get("vocab", 5))
        output_shape = lambda name: (  # noqa: E731
            [-1, -1, spec["vocab"]] if name == contract.LOGITS else [-1, kv[1], -1, kv[3]])
    for t in network.outputs:
        io[t.name] = {"mode": "output", "dtype": _type_name(t.dtype), "shape": output_shape(t.name)}
    return spec


def _type_name(dtype) -> str:
    return {v: k for k, v in TYPE_OF.items()}[dtype]


def fake_onnx_graphs(artifacts: Path, layers: int = 2, heads: int = 2, head_dim: int = 4,
                     hidden: int = 8, vocab: int = 5, dtype: str = "float16") -> None:
    """JSON stand-ins for vision.onnx / decoder.onnx that the fake parser reads."""
    vision = {"inputs": {contract.VISION_INPUT: [[-1, 3, 224, 224], dtype]},
              "outputs": {contract.VISION_OUTPUT: dtype}, "meta": {"lang_dim": 6}}
    kv = [-1, heads, -1, head_dim]
    inputs = {contract.INPUTS_EMBEDS: [[-1, -1, hidden], dtype],
              contract.ATTENTION_MASK: [[-1, -1], "int64"],
              contract.POSITION_IDS: [[-1, -1], "int64"]}
    outputs = {contract.LOGITS: dtype}
    for i in range(layers):
        inputs[contract.past_key_name(i)] = inputs[contract.past_value_name(i)] = [kv, dtype]
        outputs[contract.present_key_name(i)] = outputs[contract.present_value_name(i)] = dtype
    (artifacts / contract.VISION_FILE).write_text(json.dumps(vision))
    (artifacts / contract.DECODER_FILE).write_text(json.dumps({"inputs": inputs, "outputs": outputs,
                                                               "meta": {"vocab": vocab}}))
