"""Fixed sine-cosine position tables for masked image modelling.

Two layouts, because the two recipes differ:

- `sincos_2d` (MAE): half of the channels encode the column index, half the row index; within each
  half, ``[sin(pos·ω), cos(pos·ω)]`` concatenated with ``ω_i = 1 / 10000^(i / (D/4))``. An optional
  leading all-zero row is the class token's position (MAE gives the cls token no position).
- `sincos_1d` (SD-MAE): the Transformer table over the flattened patch index, interleaved:
  channel ``2i`` is ``sin(pos / 10000^(2i/D))`` and channel ``2i+1`` the matching cosine.

`fix_position_table_` writes a table into a model's position parameter and freezes it, so the
table is saved with the weights (timm loads it like any other) but never trained.
"""

from __future__ import annotations

import torch
from torch import nn


def _sincos_halves(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 1/10000^(i/(dim/2))``: (N,) -> (N, dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """2-D table for a (rows, cols) patch grid in row-major order: (prefix + rows·cols, dim) float32.

    The first ``dim/2`` channels encode the column index and the last ``dim/2`` the row index (MAE's
    order, so tables match MAE checkpoints); prefix rows (cls token) are zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid_size
    row_index = torch.arange(rows).repeat_interleave(cols)  # (rows·cols,)
    col_index = torch.arange(cols).repeat(rows)
    table = torch.cat([_sincos_halves(col_index, dim // 2), _sincos_halves(row_index, dim // 2)], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=table.dtype), table]).float()


def sincos_1d(num_positions: int, dim: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """1-D interleaved table over positions ``0..num_positions-1``: (prefix + num_positions, dim) float32."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim  # (dim,): 2i/D for channels 2i, 2i+1
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] / 10000 ** exponent[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=table.dtype), table]).float()


def position_table(
    kind: str, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """``"2d"`` or ``"1d"`` table for a patch grid: (prefix + rows·cols, dim)."""
    if kind == "2d":
        return sincos_2d(grid_size, dim, num_prefix_tokens)
    if kind == "1d":
        return sincos_1d(grid_size[0] * grid_size[1], dim, num_prefix_tokens)
    raise ValueError(f"position table kind must be '1d' or '2d', got {kind!r}")


@torch.no_grad()
def fix_position_table_(param: nn.Parameter, table: torch.Tensor) -> None:
    """Copy ``table`` (N, D) into ``param`` (1, N, D) and freeze it (no gradient, no optimiser state)."""
    if param.shape[1:] != table.shape:
        raise ValueError(f"position parameter has shape {tuple(param.shape)}, table {tuple(table.shape)}")
    param.copy_(table.unsqueeze(0))
    param.requires_grad_(False)
