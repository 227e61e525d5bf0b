"""Forward of a power-of-two weight: y = x @ W.T + bias, W = C·B read as packed 5-bit codes.

The evaluation order is the TVM kernel's (kernels/tvm/pow2_linear.py, where it is
derived): per kept block, decode the 3 x group codes, mix them with the chunk's B into
W's 3 x group entries in registers, and accumulate x's 3 columns times them as outer
products. No tl.dot: the reduction per block is 3 long, below its minimum of 16.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...pow2.format import Pow2Weight
from ._launch import BLOCK_M_CANDIDATES
from ._pow2 import basis_entry, kernel_args, load_codes


@triton.jit
def _pow2_linear_kernel(
    x_ptr, words_ptr, basis_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    M, N, K, G,
    P: tl.constexpr, BP: tl.constexpr, CHUNK: tl.constexpr, E_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One program per (M tile, block row f): it owns y[tile, f*P : f*P + P], no atomics.
    pid_m = tl.program_id(0)
    f = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BP)
    m_mask = offs_m < M
    p_mask = offs_p < P
    x_rows = x_ptr + offs_m.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BP), dtype=tl.float32)
    # int64 bounds: the block number scales pointer offsets.
    start = tl.load(row_offsets_ptr + f).to(tl.int64)
    end = tl.load(row_offsets_ptr + f + 1).to(tl.int64)
    for b in range(start, end):
        r = tl.load(col_indices_ptr + b)
        chunk = basis_ptr + (f.to(tl.int64) * G + r // CHUNK) * (9 * P)
        c0, c1, c2 = load_codes(words_ptr, b, offs_p, p_mask, P, E_BIAS)
        for j in tl.static_range(3):
            w = (c0 * basis_entry(chunk, 0, j, offs_p, p_mask, P) + c1 * basis_entry(chunk, 1, j, offs_p, p_mask, P)
                 + c2 * basis_entry(chunk, 2, j, offs_p, p_mask, P))
            # 3r + j < K: the last C row hangs past K, where x has no storage.
            xj = tl.load(x_rows + 3 * r + j, mask=m_mask & (3 * r + j < K), other=0.0).to(tl.float32)
            acc += xj[:, None] * w[None, :]
    n = f * P + offs_p
    n_mask = p_mask & (n < N)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_m(m: int) -> int:
    """The smallest M tile of the BSR kernels' candidates that covers M, else the largest."""
    return next((c for c in BLOCK_M_CANDIDATES if c >= m), BLOCK_M_CANDIDATES[-1])


def pow2_linear(x: torch.Tensor, W: Pow2Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.to_dense().T + bias for x [M, K] on W's device; returns [M, N]."""
    m = x.shape[0]
    n, k = W.shape
    if m == 0 or W.nnz_blocks == 0:
        y = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        return y + bias if bias is not None else y
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm = block_m(m)
    _pow2_linear_kernel[(triton.cdiv(m, bm), W.block_rows)](
        x.contiguous(), W.words, W.basis, W.index.row_offsets, W.index.col_indices,
        bias.contiguous() if bias is not None else None, y,
        m, n, k, W.n_chunks, BLOCK_M=bm, **kernel_args(W),
    )
    return y
