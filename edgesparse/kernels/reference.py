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


def _chunks(n_blocks: int, elements_per_block: int):
    """Slices of the blocks, each gathering at most _GATHER_ELEMENTS elements."""
    step = max(1, _GATHER_ELEMENTS // max(1, elements_per_block))
    for start in range(0, n_blocks, step):
        yield slice(start, min(start + step, n_blocks))


def _block_rows_product(inp, V, gather, scatter, in_blocks: int, out_blocks: int, out_width: int) -> torch.Tensor:
    """out[:, block j] = sum over blocks b scattered to j of inp[:, block gather[b]] @ V[b].

    The forward and grad-input are this product with the roles of W's rows and columns
    swapped, as in the TVM kernel (kernels/tvm/_block_rows.py).
    """
    m = inp.shape[0]
    q, p = V.shape[1:]
    acc = _accumulator_dtype(inp.dtype)
    blocks = pad_columns(inp, in_blocks * q).reshape(m, in_blocks, q).to(acc)
    out = torch.zeros(m, out_blocks, p, dtype=acc, device=inp.device)
    for part in _chunks(V.shape[0], m * max(p, q)):
        gathered = blocks[:, gather[part].long()]  # [M, blocks, q]
        out.index_add_(1, scatter[part].long(), torch.einsum("mbq,bqp->mbp", gathered, V[part].to(acc)))
    return out.reshape(m, out_blocks * p)[:, :out_width]


def bsr_linear(x: torch.Tensor, W: BSR, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [M, K]."""
    y = _block_rows_product(
        x, W.values.transpose(1, 2), W.col_indices, W.row_indices, W.block_cols, W.block_rows, W.shape[0]
    )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).contiguous()


def bsr_linear_grad_input(dy: torch.Tensor, W: BSR) -> torch.Tensor:
    """dx = dy @ W for dy [M, N]."""
    dx = _block_rows_product(dy, W.values, W.row_indices, W.col_indices, W.block_rows, W.block_cols, W.shape[1])
    return dx.to(dy.dtype).contiguous()


def bsr_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: BSR) -> torch.Tensor:
    """The blocks of dy.T @ x on W's pattern, as values [nnz_blocks, bn, bk]."""
    m = dy.shape[0]
    bn, bk = W.block
    acc = _accumulator_dtype(dy.dtype)
    dyb = pad_columns(dy, W.padded_shape[0]).reshape(m, W.block_rows, bn).to(acc)
    xb = pad_columns(x, W.padded_shape[1]).reshape(m, W.block_cols, bk).to(acc)
    out = torch.empty_like(W.values, dtype=dy.dtype)
    for part in _chunks(W.nnz_blocks, m * (bn + bk)):
        out[part] = torch.einsum(
            "mbn,mbk->bnk", dyb[:, W.row_indices[part].long()], xb[:, W.col_indices[part].long()]
        ).to(dy.dtype)
    return out
