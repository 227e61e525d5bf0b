"""Weight gradients of a power-of-two weight W = C·B, read as packed 5-bit codes:

    dW[b] = dy[:, rows of b].T @ x[:, 3r : 3r + 3]        [group, 3], block b at (f, r)
    dC[b, i, n] = sum_j dW[b][n, j]·B[n, g][i, j]         (straight-through for C)
    dB[n, g][i, j] = sum over blocks b of chunk g of C[b, i, n]·dW[b][n, j]

Threads split the block rows (filter groups), so each owns its rows of dB and the
chunk sums need no atomics. For each kept block, dW's 3 x group entries are reduced
over the batch in registers (one vector of output rows per 3 accumulators; the whole
group wide, so 3·group/lanes independent sums hide the FMA latency), then turned into
dC and added into dB, with C decoded in registers. dW itself is never stored.

dy and x are first repacked into panels (a TVM copy, :func:`_panels`): dy
[NB, M, group] and x [R, M, 3], so that the walk down the batch reads consecutive
memory instead of rows N·4 and K·4 bytes apart.
"""

from __future__ import annotations

import torch

from ...pow2.format import Pow2Weight
from ._pow2 import decode_expr
from ._runtime import compiled, kernel_arg


def _make_panels(width: int):
    from tvm.script import tirx as T

    @T.prim_func
    def panels(t_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, TW, NB = T.int32(), T.int32(), T.int32()
        t = T.match_buffer(t_h, (M, TW), "float32")
        out = T.match_buffer(out_h, (NB, M, width), "float32")
        # Whole panels take a plain vector copy; only the last, cut by the matrix edge,
        # pays for the bounds check (one guarded loop for both ran unvectorised).
        for j in T.parallel(NB):
            for m in T.serial(M):
                if j * width + width <= TW:
                    for c in T.vectorized(width):
                        out[j, m, c] = t[m, j * width + c]
                else:
                    for c in T.serial(width):
                        out[j, m, c] = T.if_then_else(j * width + c < TW, t[m, T.min(j * width + c, TW - 1)], T.float32(0))

    return panels


def _panels(t: torch.Tensor, blocks: int, width: int) -> torch.Tensor:
    """t [M, w] as [blocks, M, width]: one contiguous, zero-padded panel per block column
    (a TVM kernel rather than torch's permute-and-copy, which runs on one thread)."""
    out = torch.empty(blocks, t.shape[0], width, dtype=t.dtype)
    compiled(_make_panels, width)(kernel_arg(t), out)
    return out


def _make_grad_weight(P: int, chunk_rows: int, e_min: int):
    from tvm.script import tirx as T

    @T.prim_func
    def grad_weight(dy_h: T.handle, x_h: T.handle, words_h: T.handle, basis_h: T.handle, off_h: T.handle, idx_h: T.handle,
                    dc_h: T.handle, db_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, R, NNZ, NB, G, NOFF = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (NB, M, P), "float32")
        x = T.match_buffer(x_h, (R, M, 3), "float32")
        words = T.match_buffer(words_h, (NNZ, P), "int16")
        basis = T.match_buffer(basis_h, (NB, G, 3, 3, P), "float32")
        off = T.match_buffer(off_h, (NOFF,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        dc = T.match_buffer(dc_h, (NNZ, 3, P), "float32")
        db = T.match_buffer(db_h, (NB, G, 3, 3, P), "float32")
        for f in T.parallel(NOFF - 1):
            for g in T.serial(G):
                for i in T.unroll(3):
                    for j in T.unroll(3):
                        for p in T.vectorized(P):
                            db[f, g, i, j, p] = T.float32(0)
            for b in T.serial(off[f], off[f + 1]):
                acc = T.alloc_buffer((3, P), "float32")
                c = T.alloc_buffer((3, P), "float32")
                for j in T.unroll(3):
                    for p in T.vectorized(P):
                        acc[j, p] = T.float32(0)
                for m in T.serial(M):
                    for j in T.unroll(3):
                        for p in T.vectorized(P):
                            acc[j, p] = acc[j, p] + dy[f, m, p] * x[idx[b], m, j]
                for i in T.unroll(3):
                    for p in T.vectorized(P):
                        c[i, p] = decode_expr(words[b, p], i, e_min)
                for i in T.unroll(3):
                    for p in T.vectorized(P):
                        dc[b, i, p] = (acc[0, p] * basis[f, idx[b] // chunk_rows, i, 0, p]
                                       + acc[1, p] * basis[f, idx[b] // chunk_rows, i, 1, p]
                                       + acc[2, p] * basis[f, idx[b] // chunk_rows, i, 2, p])
                for i in T.unroll(3):
                    for j in T.unroll(3):
                        for p in T.vectorized(P):
                            db[f, idx[b] // chunk_rows, i, j, p] = db[f, idx[b] // chunk_rows, i, j, p] + c[i, p] * acc[j, p]

    return grad_weight


def pow2_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: Pow2Weight):
    """(dC [nnz_blocks, 3, group], dB like W.basis); dy [M, N], x [M, K] contiguous."""
    P = W.group
    dC = torch.zeros(W.nnz_blocks, 3, P, dtype=dy.dtype)
    dB = torch.zeros_like(W.basis)
    if dy.shape[0] == 0 or W.nnz_blocks == 0:
        return dC, dB
    fn = compiled(_make_grad_weight, P, W.chunk_rows, W.exp_range[0])
    fn(
        _panels(dy, W.block_rows, P), _panels(x, W.block_cols, 3), kernel_arg(W.words), kernel_arg(W.basis),
        kernel_arg(W.index.row_offsets), kernel_arg(W.index.col_indices), dC, dB,
    )
    return dC, dB
