"""The package's one door to CUDA.

* ``gpu_info``: the GPU's name, compute capability, memory and whether it shares memory with
  the CPU (Jetson), straight from the driver through ctypes. No CUDA Python package is needed,
  so the engine builder runs where only TensorRT is installed; builder and runner read the
  same fields the same way, so what the manifest records is what the runner compares.
* ``cudart`` and ``DeviceBuffer``: device memory, copies and streams for the TensorRT runner,
  through cuda-python (imported on first use; missing, it is a ``BackendUnavailable``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backends.errors import BackendUnavailable

# CUdevice_attribute values (cuda.h)
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR, _INTEGRATED = 75, 76, 18
_CUDA_ERROR_NO_DEVICE = 100


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    total_memory_bytes: int
    integrated: bool = False  # the GPU shares the board's memory (Jetson)


def _driver() -> ctypes.CDLL:
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(lib)
        except OSError:
            continue
    raise BackendUnavailable("no CUDA driver found (libcuda.so.1): TensorRT engines are built and "
                             "run on the machine with the NVIDIA GPU")


def gpu_info(device: int = 0) -> GpuInfo:
    """One GPU's identity from the driver API (the names cudaGetDeviceProperties reports)."""
    cuda = _driver()
    no_gpu = "no CUDA GPU found: TensorRT engines are built and run on the GPU that uses them"
    rc = cuda.cuInit(0)
    if rc == _CUDA_ERROR_NO_DEVICE:
        raise BackendUnavailable(no_gpu)
    if rc != 0:
        raise BackendUnavailable(f"the CUDA driver failed to initialise (CUresult {rc}): check "
                                 "`nvidia-smi` (or `tegrastats` on Jetson)")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        raise BackendUnavailable(no_gpu)
    handle = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(handle), device)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, handle)

    def attribute(which: int) -> int:
        value = ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(value), which, handle)
        return value.value

    memory = ctypes.c_size_t(0)
    cuda.cuDeviceTotalMem_v2(ctypes.byref(memory), handle)
    capability = f"{attribute(_COMPUTE_CAPABILITY_MAJOR)}.{attribute(_COMPUTE_CAPABILITY_MINOR)}"
    return GpuInfo(name.value.decode(errors="replace"), capability, int(memory.value),
                   bool(attribute(_INTEGRATED)))


def cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6);
    looked up on each call (a dictionary lookup once imported), so tests can swap in fakes."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as err:
            raise BackendUnavailable(
                "cuda-python is not installed: `pip install cuda-python` (same CUDA major version "
                "as the driver; 12.x on JetPack 6)") from err
    return runtime


def check(result: Any) -> Any:
    """cuda-python returns (error, *values): raise on an error, else return the values."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        raise RuntimeError(f"CUDA error {name.decode()}: {text.decode()}")
    return values[0] if len(values) == 1 else values


class DeviceBuffer:
    """One cudaMalloc'd block; copies run on the caller's stream."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream: Any) -> np.ndarray:
        """Copy host -> device; returns the contiguous array the copy reads (keep it alive)."""
        rt = cudart()
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        check(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        return array

    def download(self, out: np.ndarray, stream: Any, offset: int = 0) -> np.ndarray:
        rt = cudart()
        if offset + out.nbytes > self.nbytes:
            raise ValueError("download past the end of the device buffer")
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr + offset, out.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        return out

    def copy_rows(self, dst: DeviceBuffer, rows: int, src_pitch: int, dst_pitch: int, width: int,
                  stream: Any) -> None:
        """``rows`` strided rows of ``width`` bytes into ``dst`` (cudaMemcpy2DAsync, on device)."""
        rt = cudart()
        check(rt.cudaMemcpy2DAsync(dst.ptr, dst_pitch, self.ptr, src_pitch, width, rows,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def free(self) -> None:
        if self.ptr:
            cudart().cudaFree(self.ptr)
            self.ptr = 0
