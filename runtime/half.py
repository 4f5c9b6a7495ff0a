"""float32 <-> float16 on the host, through ONNX Runtime's CPU ``Cast`` kernel.

An fp16 export's runners convert on the host: the pixels going in, the image embeddings and
logits coming out, a prompt's embeddings. numpy's ``astype`` converts one element at a time:
four 224-pixel images (602,112 values) took 3.8 ms to fp16 on a 2-core Xeon with AVX-512,
more than PyTorch's whole fp16 vision encoder on an H200 (3.1 ms for four images). ONNX
Runtime's ``Cast`` uses the CPU's conversion instructions: 0.67 ms, bit for bit the same values
(both round to nearest even; tests/test_half.py checks every fp16 value and the edge cases;
``scripts/bench_casts.py`` times both).
Small arrays stay with numpy, where a session call would cost more than it saves, and so does
everything on an install without ONNX Runtime (TensorRT's alone).
"""

from __future__ import annotations

import threading

import numpy as np

# From this many elements a session call (~13 us) is cheaper than numpy's conversion (level at
# 4,096; a LLaMA vocabulary's 32,000-logit row 25 us against numpy's 63).
MIN_ELEMENTS = 8192

# Two one-node ONNX models, ``y = Cast(x, to=...)`` for a tensor of any shape, serialized (ONNX
# IR 7, opset 13): the runtime does not depend on the onnx package.
# tests/test_half.py rebuilds both with onnx.helper and compares the bytes.
TO_HALF_MODEL = (b'\x08\x07\x12\tdsvl-edge:8\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\n\xa0\x01'
                 b'\x02\x12\x07to_halfZ\t\n\x01x\x12\x04\n\x02\x08\x01b\t\n\x01y\x12\x04\n\x02\x08\nB'
                 b'\x04\n\x00\x10\r')
TO_FLOAT_MODEL = (b'\x08\x07\x12\tdsvl-edge:9\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\x01\xa0'
                  b'\x01\x02\x12\x08to_floatZ\t\n\x01x\x12\x04\n\x02\x08\nb\t\n\x01y\x12\x04\n\x02'
                  b'\x08\x01B\x04\n\x00\x10\r')

# the model that converts to each target type
MODELS = {np.dtype(np.float16): TO_HALF_MODEL, np.dtype(np.float32): TO_FLOAT_MODEL}

_sessions: dict[np.dtype, object] = {}
_lock = threading.Lock()


def _session(target: np.dtype):
    """One CPU session per target type for the process, made on first use (one thread: the
    conversion is bound by memory, and the model's own sessions keep the cores)."""
    with _lock:
        if target not in _sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            _sessions[target] = ort.InferenceSession(MODELS[target], options,
                                                     providers=["CPUExecutionProvider"])
        return _sessions[target]


def convert(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` as ``dtype``, the same values as ``array.astype(dtype)``; no copy where it
    already is. float32 <-> float16 of ``MIN_ELEMENTS`` or more go through ONNX Runtime."""
    if getattr(array, "dtype", None) == dtype:  # first and cheap: every fp32 decode step asks
        return array
    dtype = np.dtype(dtype)
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    pair = (array.dtype, dtype)
    if array.size < MIN_ELEMENTS or pair not in ((np.float32, np.float16), (np.float16, np.float32)):
        return array.astype(dtype)
    try:
        session = _session(dtype)
    except ImportError:  # a TensorRT-only install: no ONNX Runtime
        return array.astype(dtype)
    return session.run(None, {"x": np.ascontiguousarray(array)})[0]
