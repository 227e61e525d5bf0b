"""Forward: y = x @ W.to_dense().T + bias, reading only W's kept blocks."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...formats import BSR
from ._launch import TritonLaunch, kernel_args, nothing_to_launch


@triton.jit
def _bsr_linear_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    M, N, K,
    bn: tl.constexpr, bk: tl.constexpr,
    BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (M tile, block row): it owns y[tile, row*bn : row*bn+bn] outright,
    # so the sum over the row's blocks needs no atomics.
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    # 64-bit row offsets: M * K passes 2**31 elements for large batches on a big GPU.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    # The block's transpose [BK, BN], read straight from the row-major [bn, bk] block.
    w_tile = offs_k[:, None] + offs_n[None, :] * bk
    w_mask = (offs_k[:, None] < bk) & (offs_n[None, :] < bn)

    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    start = tl.load(row_offsets_ptr + row).to(tl.int64)
    end = tl.load(row_offsets_ptr + row + 1).to(tl.int64)
    for p in range(start, end):
        k = tl.load(col_indices_ptr + p) * bk + offs_k
        # k < K: the last block column may hang past K, where x has no storage.
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & ((offs_k < bk) & (k < K))[None, :], other=0.0)
        w = tl.load(values_ptr + p * (bn * bk) + w_tile, mask=w_mask, other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    n = row * bn + offs_n
    n_mask = (offs_n < bn) & (n < N)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def bsr_linear(
    x: torch.Tensor, W: BSR, bias: Optional[torch.Tensor] = None, *, launch: Optional[TritonLaunch] = None
) -> torch.Tensor:
    """y = x @ W.to_dense().T + bias for x [M, K] on W's device and dtype; returns [M, N]."""
    m = x.shape[0]
    n, k = W.shape
    if nothing_to_launch(m, W):
        y = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        return y + bias if bias is not None else y
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = kernel_args(m, W, launch)
    grid = (triton.cdiv(m, args["BLOCK_M"]), W.block_rows)
    _bsr_linear_kernel[grid](
        x, W.values, W.row_offsets, W.col_indices,
        bias.contiguous() if bias is not None else None, y,
        m, n, k, **args,
    )
    return y
