"""Backward, weight: the blocks of dy.T @ x on W's pattern; the dense N x K gradient is
never built."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...formats import BSR
from ._launch import TritonLaunch, kernel_args, nothing_to_launch


@triton.jit
def _bsr_linear_grad_weight_kernel(
    dy_ptr, x_ptr, row_indices_ptr, col_indices_ptr, out_ptr,
    M, N, K,
    bn: tl.constexpr, bk: tl.constexpr,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per kept block, reducing over all M rows itself: each output block has
    # a single writer, so there are no atomics and the sum order is deterministic.
    blk = tl.program_id(0)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n = tl.load(row_indices_ptr + blk) * bn + offs_n
    k = tl.load(col_indices_ptr + blk) * bk + offs_k
    # Lanes past the block or past N / K load zeros (ops.bsr_linear_grad_weight then clears
    # the padding, where a NaN or inf in dy or x can still leave 0 * inf).
    n_mask = (offs_n < bn) & (n < N)
    k_mask = (offs_k < bk) & (k < K)

    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        # 64-bit row offsets: M * N and M * K pass 2**31 elements for large batches.
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = offs_m < M
        # dy's tile read transposed, [BN, BLOCK_M], so the dot is dy^T @ x directly.
        dy_t = tl.load(dy_ptr + offs_m[None, :] * N + n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dy_t.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION)

    out_ptrs = out_ptr + blk.to(tl.int64) * (bn * bk) + offs_n[:, None] * bk + offs_k[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < bn) & (offs_k[None, :] < bk))


def bsr_linear_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, W: BSR, *, launch: Optional[TritonLaunch] = None
) -> torch.Tensor:
    """The blocks of dy.T @ x on W's pattern, as values [nnz_blocks, bn, bk] of W's dtype."""
    m = dy.shape[0]
    n, k = W.shape
    if nothing_to_launch(m, W):
        return torch.zeros_like(W.values)
    dy, x = dy.contiguous(), x.contiguous()
    out = torch.empty_like(W.values)
    args = kernel_args(m, W, launch)
    _bsr_linear_grad_weight_kernel[(W.nnz_blocks,)](
        dy, x, W.row_indices, W.col_indices, out,
        m, n, k, **args,
    )
    return out
