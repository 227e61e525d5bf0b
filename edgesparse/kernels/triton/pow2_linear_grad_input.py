"""grad-input of a power-of-two weight: dx = dy @ W, W = C·B read as packed 5-bit codes.

One program per (M tile, block column r), walking the transposed index like the fp32
BSR grad-input: each kept block's W entries are rebuilt in registers (see
pow2_linear.py), multiplied lane-wise with dy's tile and summed across the group's
output rows once the column is done.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...pow2.format import Pow2Weight
from ._pow2 import basis_entry, kernel_args, load_codes
from .pow2_linear import block_m


@triton.jit
def _pow2_linear_grad_input_kernel(
    dy_ptr, words_ptr, basis_ptr, col_offsets_ptr, col_order_ptr, col_order_rows_ptr, dx_ptr,
    M, N, K, G,
    P: tl.constexpr, BP: tl.constexpr, CHUNK: tl.constexpr, E_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BP)
    m_mask = offs_m < M
    p_mask = offs_p < P
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * N
    acc0 = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    start = tl.load(col_offsets_ptr + r)
    end = tl.load(col_offsets_ptr + r + 1)
    for q in range(start, end):
        blk = tl.load(col_order_ptr + q).to(tl.int64)
        f = tl.load(col_order_rows_ptr + q)
        chunk = basis_ptr + (f.to(tl.int64) * G + r // CHUNK) * (9 * P)
        c0, c1, c2 = load_codes(words_ptr, blk, offs_p, p_mask, P, E_BIAS)
        n = f * P + offs_p
        # n < N: the last block row may hang past N, where dy has no storage.
        dy = tl.load(dy_rows + n[None, :], mask=m_mask[:, None] & (p_mask & (n < N))[None, :], other=0.0).to(tl.float32)
        w0 = (c0 * basis_entry(chunk, 0, 0, offs_p, p_mask, P) + c1 * basis_entry(chunk, 1, 0, offs_p, p_mask, P)
              + c2 * basis_entry(chunk, 2, 0, offs_p, p_mask, P))
        w1 = (c0 * basis_entry(chunk, 0, 1, offs_p, p_mask, P) + c1 * basis_entry(chunk, 1, 1, offs_p, p_mask, P)
              + c2 * basis_entry(chunk, 2, 1, offs_p, p_mask, P))
        w2 = (c0 * basis_entry(chunk, 0, 2, offs_p, p_mask, P) + c1 * basis_entry(chunk, 1, 2, offs_p, p_mask, P)
              + c2 * basis_entry(chunk, 2, 2, offs_p, p_mask, P))
        acc0 += dy * w0[None, :]
        acc1 += dy * w1[None, :]
        acc2 += dy * w2[None, :]
    dx_rows = dx_ptr + offs_m.to(tl.int64) * K + 3 * r
    ty = dx_ptr.dtype.element_ty
    tl.store(dx_rows, tl.sum(acc0, axis=1).to(ty), mask=m_mask & (3 * r < K))
    tl.store(dx_rows + 1, tl.sum(acc1, axis=1).to(ty), mask=m_mask & (3 * r + 1 < K))
    tl.store(dx_rows + 2, tl.sum(acc2, axis=1).to(ty), mask=m_mask & (3 * r + 2 < K))


def pow2_linear_grad_input(dy: torch.Tensor, W: Pow2Weight) -> torch.Tensor:
    """dx = dy @ W.to_dense() for dy [M, N] on W's device; returns [M, K]."""
    m = dy.shape[0]
    n, k = W.shape
    if m == 0 or W.nnz_blocks == 0:
        return torch.zeros(m, k, dtype=dy.dtype, device=dy.device)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    bm = block_m(m)
    ix = W.index
    _pow2_linear_grad_input_kernel[(triton.cdiv(m, bm), W.block_cols)](
        dy.contiguous(), W.words, W.basis, ix.col_offsets, ix.col_order, ix.col_order_rows, dx,
        m, n, k, W.n_chunks, BLOCK_M=bm, **kernel_args(W),
    )
    return dx
