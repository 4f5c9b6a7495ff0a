"""Write an ONNX model's weights tensor by tensor, straight into its external data file.

The streaming decoder builder (export/decoder_graph.py) never holds the model: each weight is
read, cast or quantized, appended to ``decoder.onnx.data`` here and dropped, and the graph keeps
only a TensorProto that points at its bytes (location, offset, length), as ONNX's external-data
format defines. Offsets are page-aligned so ONNX Runtime can map each initializer on its own.

Quantized weights use ONNX Runtime's own MatMulNBits kernels for packing
(``quantize_matmul_4bits`` / ``_8bits``, what ``MatMulNBitsQuantizer`` calls), so a streamed int4
export holds the same bytes as ``export.quantize`` writes for the same weight and block size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ALIGNMENT = 4096  # page size: ONNX Runtime maps page-aligned external initializers directly
INLINE_BYTES = 1024  # small constants stay in the graph itself (as onnx.save does)


class ExternalData:
    """Appends arrays to one external-data file and returns TensorProtos that reference them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self.offset = 0
        self.tensors: dict[str, TensorProto] = {}

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        """Write ``array`` now; the returned proto (also kept in ``tensors``) holds no data."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            proto = numpy_helper.from_array(array, name)
        else:
            pad = -self.offset % ALIGNMENT
            if pad:
                self.file.write(b"\0" * pad)
                self.offset += pad
            self.file.write(memoryview(array).cast("B"))
            proto = TensorProto(name=name, dims=list(array.shape),
                                data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                               ("length", str(array.nbytes))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            self.offset += array.nbytes
        self.tensors[name] = proto
        return proto

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def quantize_nbits(weight_kn: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' symmetric blockwise layout of a [K, N] weight: (packed uint8 [N, blocks,
    block_size*bits/8], scales [N, blocks]) in the weight's float type."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight_kn.shape
    blocks = (rows + block_size - 1) // block_size
    pad = blocks * block_size - rows
    weight = np.ascontiguousarray(np.pad(weight_kn, ((0, pad), (0, 0))) if pad else weight_kn)
    kpack = 8 // bits
    packed = np.zeros((cols, blocks, (block_size + kpack - 1) // kpack), np.uint8)
    zero_points = np.zeros((cols, (blocks + kpack - 1) // kpack), np.uint8)
    scales = np.zeros((cols, blocks), weight.dtype)
    quantize = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    quantize(packed, weight, scales, zero_points, block_size, cols, rows, True)
    return packed, scales
