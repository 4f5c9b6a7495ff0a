"""fp16 export with fp32 islands: the parts FP16 cannot hold stay in fp32 in the graph."""

from __future__ import annotations

import torch
from torch import nn


def fp32_islands(module: nn.Module) -> nn.Module:
    """For fp16 export: every LayerNorm computes in fp32 (DSVL's eps=1e-12 underflows in fp16
    and its variance can overflow), casting back to fp16 after."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, Fp32LayerNorm(child))
        else:
            fp32_islands(child)
    return module


class Fp32LayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False) if norm.bias is not None else None

    def _apply(self, fn, recurse=True):  # keep fp32 through .half()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)
