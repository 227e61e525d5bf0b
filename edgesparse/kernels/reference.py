"""Pure-torch block-sparse products: the oracle the other backends are read against,
and the fallback for devices and dtypes no compiled backend covers.

They gather only the kept blocks (no dense W or dense gradient is ever built), in
chunks of blocks so that the gathered operand stays under ``_GATHER_ELEMENTS``.
Sums run in float32 at least (fp16/bf16 inputs are summed in fp32 and rounded once
at the end, as the compiled backends do). All three take 2-D contiguous operands;
:mod:`edgesparse.ops` does the reshaping and argument checks.
"""

from __future__ import annotations

import torch

from ..formats import BSR, pad_columns

# 16 Mi elements (64 MiB in fp32) per gathered chunk: large enough that the einsum
# dominates, small enough for density-1 weights with tiny blocks.
_GATHER_ELEMENTS = 1 << 24


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(W: BSR, rows: int):
    step = max(1, _GATHER_ELEMENTS // max(1, rows * max(W.block)))
    for start in range(0, W.nnz_blocks, step):
        yield slice(start, min(start + step, W.nnz_blocks))


def bsr_linear(x: torch.Tensor, W: BSR, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [M, K]."""
    m = x.shape[0]
    bn, bk = W.block
    acc = _accumulator_dtype(x.dtype)
    xb = pad_columns(x, W.padded_shape[1]).reshape(m, W.block_cols, bk).to(acc)
    y = torch.zeros(m, W.block_rows, bn, dtype=acc, device=x.device)
    for part in _chunks(W, m):
        gathered = xb[:, W.col_indices[part].long()]  # [M, blocks, bk]
        y.index_add_(1, W.row_indices[part].long(), torch.einsum("mbk,bnk->mbn", gathered, W.values[part].to(acc)))
    y = y.reshape(m, W.padded_shape[0])[:, : W.shape[0]]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous()


def bsr_linear_grad_input(dy: torch.Tensor, W: BSR) -> torch.Tensor:
    """dx = dy @ W for dy [M, N]."""
    m = dy.shape[0]
    bn, bk = W.block
    acc = _accumulator_dtype(dy.dtype)
    dyb = pad_columns(dy, W.padded_shape[0]).reshape(m, W.block_rows, bn).to(acc)
    dx = torch.zeros(m, W.block_cols, bk, dtype=acc, device=dy.device)
    for part in _chunks(W, m):
        gathered = dyb[:, W.row_indices[part].long()]  # [M, blocks, bn]
        dx.index_add_(1, W.col_indices[part].long(), torch.einsum("mbn,bnk->mbk", gathered, W.values[part].to(acc)))
    return dx.reshape(m, W.padded_shape[1])[:, : W.shape[1]].to(dy.dtype).contiguous()


def bsr_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: BSR) -> torch.Tensor:
    """The blocks of dy.T @ x on W's pattern, as values [nnz_blocks, bn, bk]."""
    m = dy.shape[0]
    bn, bk = W.block
    acc = _accumulator_dtype(dy.dtype)
    dyb = pad_columns(dy, W.padded_shape[0]).reshape(m, W.block_rows, bn).to(acc)
    xb = pad_columns(x, W.padded_shape[1]).reshape(m, W.block_cols, bk).to(acc)
    out = torch.empty_like(W.values, dtype=dy.dtype)
    for part in _chunks(W, m):
        out[part] = torch.einsum(
            "mbn,mbk->bnk", dyb[:, W.row_indices[part].long()], xb[:, W.col_indices[part].long()]
        ).to(dy.dtype)
    return out
