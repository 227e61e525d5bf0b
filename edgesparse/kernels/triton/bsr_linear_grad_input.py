"""Backward, input: dx = dy @ W.to_dense(), reading only W's kept blocks."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...formats import BSR
from ._launch import TritonLaunch, kernel_args, nothing_to_launch


@triton.jit
def _bsr_linear_grad_input_kernel(
    dy_ptr, values_ptr, col_offsets_ptr, col_order_ptr, col_order_rows_ptr, dx_ptr,
    M, N, K,
    bn: tl.constexpr, bk: tl.constexpr,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (M tile, block column), walking the transposed index: each program
    # owns dx[tile, col*bk : col*bk+bk], so there are no atomics and no transposed copy of W.
    pid_m = tl.program_id(0)
    col = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    # 64-bit row offsets: M * N passes 2**31 elements for large batches on a big GPU.
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * N
    w_tile = offs_n[:, None] * bk + offs_k[None, :]
    w_mask = (offs_n[:, None] < bn) & (offs_k[None, :] < bk)

    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    start = tl.load(col_offsets_ptr + col).to(tl.int64)
    end = tl.load(col_offsets_ptr + col + 1).to(tl.int64)
    for q in range(start, end):
        blk = tl.load(col_order_ptr + q).to(tl.int64)
        n = tl.load(col_order_rows_ptr + q) * bn + offs_n
        # n < N: the last block row may hang past N, where dy has no storage.
        dy = tl.load(dy_rows + n[None, :], mask=m_mask[:, None] & ((offs_n < bn) & (n < N))[None, :], other=0.0)
        w = tl.load(values_ptr + blk * (bn * bk) + w_tile, mask=w_mask, other=0.0)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    k = col * bk + offs_k
    k_mask = (offs_k < bk) & (k < K)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * K + k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


def bsr_linear_grad_input(dy: torch.Tensor, W: BSR, *, launch: Optional[TritonLaunch] = None) -> torch.Tensor:
    """dx = dy @ W.to_dense() for dy [M, N] on W's device and dtype; returns [M, K]."""
    m = dy.shape[0]
    n, k = W.shape
    if nothing_to_launch(m, W):
        return torch.zeros(m, k, dtype=dy.dtype, device=dy.device)
    dy = dy.contiguous()
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    args = kernel_args(m, W, launch)
    grid = (triton.cdiv(m, args["BLOCK_M"]), W.block_cols)
    _bsr_linear_grad_input_kernel[grid](
        dy, W.values, W.col_offsets, W.col_order, W.col_order_rows, dx,
        m, n, k, **args,
    )
    return dx
