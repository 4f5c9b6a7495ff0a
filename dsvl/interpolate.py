"""Bicubic resizing of a fixed 2-D table as two matrix products.

CLIP's position embeddings and the perceiver's key positional embedding are resized with
``F.interpolate(mode="bicubic", align_corners=False)``. Exported naively that becomes an ONNX
``Resize`` in cubic mode, which ONNX Runtime's CPU kernel accepts only on some layouts and
TensorRT supports unevenly across versions, and tracing tends to bake the output size in.

Bicubic resizing of a table is separable and linear: ``out = W_h @ table @ W_w.T``, where each
row of ``W`` holds the four cubic-convolution weights (A = -0.75) at border-clamped indices.
Built from the output size with Range/Floor/Equal/Mul, the matrices trace to elementary ops
that every runtime runs, and the size stays dynamic.
"""

from __future__ import annotations

import torch

CUBIC_A = -0.75


def _cubic_near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
    return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
    return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def bicubic_matrix(in_size: int, out_size: torch.Tensor | int) -> torch.Tensor:
    """[out_size, in_size] matrix equal to PyTorch's bicubic resampling along one axis.

    ``out_size`` may be a traced 0-d tensor so the exported graph keeps it dynamic.
    """
    out_size_t = out_size if isinstance(out_size, torch.Tensor) else torch.tensor(out_size)
    dst = torch.arange(out_size_t, dtype=torch.float32)
    scale = float(in_size) / out_size_t.to(torch.float32)
    src = (dst + 0.5) * scale - 0.5  # align_corners=False; cubic does not clamp src at 0
    base = torch.floor(src)
    t = src - base
    weights = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
    columns = torch.arange(in_size, dtype=torch.float32)
    matrix = torch.zeros_like(dst).unsqueeze(1) * columns.unsqueeze(0)
    for offset, weight in zip((-1, 0, 1, 2), weights, strict=False):
        index = torch.clamp(base + offset, 0, in_size - 1)
        hit = (index.unsqueeze(1) == columns.unsqueeze(0)).to(torch.float32)
        matrix = matrix + weight.unsqueeze(1) * hit
    return matrix


def resize_table(table: torch.Tensor, grid: int, out_h: torch.Tensor | int,
                 out_w: torch.Tensor | int) -> torch.Tensor:
    """Resize a [grid*grid, C] table to [out_h*out_w, C] bicubically (fp32 math)."""
    channels = table.shape[-1]
    square = table.to(torch.float32).reshape(grid, grid, channels)
    rows = bicubic_matrix(grid, out_h)  # [out_h, grid]
    cols = bicubic_matrix(grid, out_w)  # [out_w, grid]
    # Plain MatMuls (no Einsum): every runtime, TensorRT included, runs them.
    resized = torch.matmul(rows, square.reshape(grid, grid * channels))  # [out_h, grid*C]
    resized = resized.reshape(-1, grid, channels).transpose(1, 2)  # [out_h, C, grid]
    resized = torch.matmul(resized, cols.transpose(0, 1))  # [out_h, C, out_w]
    return resized.transpose(1, 2).reshape(-1, channels).to(table.dtype)
