"""Weight gradients of a power-of-two weight W = C·B (see kernels/tvm/pow2_linear_grad_weight.py
for the formulas): dC, the straight-through gradient of C's decoded values, and dB.

One program per block row (filter group): it walks its kept blocks, reduces the block's
dW = dy.T @ x over the batch in registers and writes dC. dB's 9 x group entries of the
current chunk are summed in registers too and stored once, when the walk (which goes
by increasing column, so chunk by chunk) reaches the next chunk: no atomics, a fixed
sum order, and no read-modify-write of dB that replicated lanes of a GPU layout could
race on. dW is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...pow2.format import Pow2Weight
from ._pow2 import basis_entry, kernel_args, load_codes
from .pow2_linear import block_m


@triton.jit
def _dc_row(dc_ptr, chunk, i: tl.constexpr, dw0, dw1, dw2, offs_p, p_mask, P: tl.constexpr):
    dc = (dw0 * basis_entry(chunk, i, 0, offs_p, p_mask, P) + dw1 * basis_entry(chunk, i, 1, offs_p, p_mask, P)
          + dw2 * basis_entry(chunk, i, 2, offs_p, p_mask, P))
    tl.store(dc_ptr + i * P + offs_p, dc.to(dc_ptr.dtype.element_ty), mask=p_mask)


@triton.jit
def _pow2_linear_grad_weight_kernel(
    dy_ptr, x_ptr, words_ptr, basis_ptr, row_offsets_ptr, col_indices_ptr, dc_ptr, db_ptr,
    M, N, K, G,
    P: tl.constexpr, BP: tl.constexpr, CHUNK: tl.constexpr, E_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    f = tl.program_id(0)
    offs_p = tl.arange(0, BP)
    p_mask = offs_p < P
    n = f * P + offs_p
    n_mask = p_mask & (n < N)
    # int64 bounds: the block number scales pointer offsets.
    start = tl.load(row_offsets_ptr + f).to(tl.int64)
    end = tl.load(row_offsets_ptr + f + 1).to(tl.int64)
    # dB of the current chunk as a [16, BP] tile: row ij < 9 holds B's entry (i, j) = (ij // 3, ij % 3).
    ij = tl.arange(0, 16)
    i_of, j_of = ij // 3, ij % 3
    db_mask = (ij < 9)[:, None] & p_mask[None, :]
    db_tile = ij[:, None] * P + offs_p[None, :]
    db_acc = tl.zeros((16, BP), dtype=tl.float32)
    current = tl.load(col_indices_ptr + start, mask=start < end, other=0) // CHUNK
    for b in range(start, end):
        r = tl.load(col_indices_ptr + b)
        dw0 = tl.zeros((BP,), dtype=tl.float32)
        dw1 = tl.zeros((BP,), dtype=tl.float32)
        dw2 = tl.zeros((BP,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m_mask = offs_m < M
            dy = tl.load(dy_ptr + offs_m[:, None] * N + n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            x_rows = x_ptr + offs_m * K + 3 * r
            x0 = tl.load(x_rows, mask=m_mask & (3 * r < K), other=0.0).to(tl.float32)
            x1 = tl.load(x_rows + 1, mask=m_mask & (3 * r + 1 < K), other=0.0).to(tl.float32)
            x2 = tl.load(x_rows + 2, mask=m_mask & (3 * r + 2 < K), other=0.0).to(tl.float32)
            dw0 += tl.sum(dy * x0[:, None], axis=0)
            dw1 += tl.sum(dy * x1[:, None], axis=0)
            dw2 += tl.sum(dy * x2[:, None], axis=0)
        chunk = basis_ptr + (f.to(tl.int64) * G + r // CHUNK) * (9 * P)
        dc_block = dc_ptr + b * (3 * P)
        _dc_row(dc_block, chunk, 0, dw0, dw1, dw2, offs_p, p_mask, P)
        _dc_row(dc_block, chunk, 1, dw0, dw1, dw2, offs_p, p_mask, P)
        _dc_row(dc_block, chunk, 2, dw0, dw1, dw2, offs_p, p_mask, P)
        # A new chunk: store the finished one, start the sum again.
        g = r // CHUNK
        done = g != current
        tl.store(db_ptr + (f.to(tl.int64) * G + current) * (9 * P) + db_tile, db_acc, mask=db_mask & done)
        db_acc = tl.where(done, 0.0, db_acc)
        current = g
        c0, c1, c2 = load_codes(words_ptr, b, offs_p, p_mask, P, E_BIAS)
        c = tl.where((i_of == 0)[:, None], c0[None, :], tl.where((i_of == 1)[:, None], c1[None, :], c2[None, :]))
        dw = tl.where((j_of == 0)[:, None], dw0[None, :], tl.where((j_of == 1)[:, None], dw1[None, :], dw2[None, :]))
        db_acc += c * dw
    tl.store(db_ptr + (f.to(tl.int64) * G + current) * (9 * P) + db_tile, db_acc, mask=db_mask & (start < end))


def pow2_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: Pow2Weight):
    """(dC [nnz_blocks, 3, group], dB like W.basis) for dy [M, N] and x [M, K]."""
    m = dy.shape[0]
    n, k = W.shape
    dC = torch.zeros(W.nnz_blocks, 3, W.group, dtype=dy.dtype, device=dy.device)
    # Summed in fp32 and cast once at the end; chunks without kept blocks stay zero.
    dB = torch.zeros(W.basis.shape, dtype=torch.float32, device=dy.device)
    if m == 0 or W.nnz_blocks == 0:
        return dC, dB.to(dy.dtype)
    _pow2_linear_grad_weight_kernel[(W.block_rows,)](
        dy.contiguous(), x.contiguous(), W.words, W.basis, W.index.row_offsets, W.index.col_indices, dC, dB,
        m, n, k, W.n_chunks, BLOCK_M=block_m(m), **kernel_args(W),
    )
    return dC, dB.to(dy.dtype)
