"""The machine a bench ran on, and its memory bandwidth (the decode step's floor)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info(threads: int) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    cpuinfo = _read("/proc/cpuinfo").splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "simd": [f for f in SIMD_FLAGS if f in flags],
            "memory_gb": round(mem_kb / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__, "load_average_start": os.getloadavg()[0],
            "thread_note": f"torch.set_num_threads({threads}); ONNX Runtime intra_op_num_threads={threads}"}


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
