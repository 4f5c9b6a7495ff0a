"""dsvl.interpolate.resize_table must equal PyTorch's bicubic F.interpolate (align_corners=False).

The exporter replaces ``F.interpolate(mode="bicubic")`` with two matrix products so the size
stays dynamic in ONNX; these tests pin that rewrite to the reference it replaces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsvl.config import PERCEIVER_GRID, vision_config_from_preset
from dsvl.interpolate import bicubic_matrix, resize_table
from dsvl.projectors import PerceiverProjector

TOL = 1e-5


def reference(table: torch.Tensor, grid: int, out_h: int, out_w: int) -> torch.Tensor:
    """What DSVL (get_abs_pos) and transformers (interpolate_pos_encoding) compute."""
    channels = table.shape[-1]
    square = table.float().reshape(1, grid, grid, channels).permute(0, 3, 1, 2)
    out = F.interpolate(square, size=(out_h, out_w), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(out_h * out_w, channels).to(table.dtype)


def make_table(grid: int, channels: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(grid * grid, channels, generator=gen)


@pytest.mark.parametrize(
    ("grid", "out_h", "out_w"),
    [
        (16, 4, 4),  # perceiver at 56 px (tiny preset): down
        (16, 6, 6),  # perceiver at 84 px
        (16, 1, 1),  # extreme down
        (16, 24, 24),  # up (336 px CLIP)
        (16, 37, 37),  # up, not a multiple
        (4, 6, 6),  # CLIP tiny: 56 px table to 84 px
        (4, 4, 6),  # non-square (56x84)
        (16, 10, 24),  # non-square, one down, one up
        (16, 24, 7),
        (4, 9, 2),
    ],
)
def test_matches_f_interpolate(grid: int, out_h: int, out_w: int) -> None:
    table = make_table(grid, 12, seed=grid * 100 + out_h * 10 + out_w)
    got = resize_table(table, grid, out_h, out_w)
    want = reference(table, grid, out_h, out_w)
    assert got.shape == (out_h * out_w, 12)
    assert got.dtype == table.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize(("grid", "out_h", "out_w"), [(16, 6, 6), (4, 4, 6), (16, 24, 7)])
def test_tensor_sizes_as_traced(grid: int, out_h: int, out_w: int) -> None:
    """The exporter passes 0-d int64 tensors (traced shapes); the result must be the same."""
    table = make_table(grid, 8, seed=1)
    got = resize_table(table, grid, torch.tensor(out_h), torch.tensor(out_w))
    torch.testing.assert_close(got, reference(table, grid, out_h, out_w), rtol=0, atol=TOL)


@pytest.mark.parametrize("grid", [4, 16])
def test_identity_is_exact(grid: int) -> None:
    table = make_table(grid, 16, seed=7)
    assert torch.equal(resize_table(table, grid, grid, grid), table)
    assert torch.equal(bicubic_matrix(grid, grid), torch.eye(grid))
    # and F.interpolate agrees (it is exact at identity too)
    assert torch.equal(reference(table, grid, grid, grid), table)


def test_rows_of_matrix_sum_to_one() -> None:
    """Cubic convolution weights are a partition of unity, border clamping included."""
    for out in (1, 3, 4, 6, 16, 24, 37):
        sums = bicubic_matrix(16, out).sum(dim=1)
        torch.testing.assert_close(sums, torch.ones(out), rtol=0, atol=1e-6)


def test_half_table_keeps_dtype_and_computes_in_fp32() -> None:
    table = make_table(16, 8, seed=3)
    got = resize_table(table.half(), 16, 6, 6)
    assert got.dtype == torch.float16
    want = reference(table, 16, 6, 6)  # fp32 math, then one rounding
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("tokens", [17, 37, 50, 257, 577])
def test_perceiver_key_pos_embed_graph_friendly_matches_eager(tokens: int) -> None:
    """The perceiver's key positional embedding: the exported path (matrix products) equals
    the eager path (F.interpolate), with the side from int(sqrt(tokens incl. CLS))."""
    torch.manual_seed(0)
    proj = PerceiverProjector(vision_config_from_preset("tiny"), 128)
    with torch.no_grad():
        proj.pos_embed.add_(0.1 * torch.randn_like(proj.pos_embed))  # trained, not sin-cos
        eager = proj.key_pos_embed(tokens)
        proj.graph_friendly_resize = True
        friendly = proj.key_pos_embed(torch.tensor(tokens))
    side = int(tokens**0.5)
    assert eager.shape == friendly.shape == (side * side, 128)
    torch.testing.assert_close(friendly, eager, rtol=0, atol=TOL)
    if side == PERCEIVER_GRID:
        assert torch.equal(friendly, proj.pos_embed)
