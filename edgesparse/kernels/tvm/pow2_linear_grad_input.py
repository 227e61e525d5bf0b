"""grad-input of a power-of-two weight: dx = dy @ W with W = C·B read as packed 5-bit codes.

dx[m, 3r + j] = sum over the kept blocks b of block column r (the transposed index, as
the fp32 BSR grad-input walks it) and over the block's ``group`` output rows n of
dy[m, n]·W[n, 3r + j]. As in the forward (pow2_linear.py), each block's 3 x group
entries of W are rebuilt in registers from the codes and the chunk's B; the products
are accumulated lane-wise, one vector of output rows at a time, into a [rows, 3, cols]
tile that is summed across its lanes once, when the column's blocks are done.

Threads split the block columns; each owns its 3 output columns, no atomics.
"""

from __future__ import annotations

import torch

from ...formats import pad_columns
from ...pow2.format import Pow2Weight
from ._pow2 import decode_expr, heuristic_pow2
from ._runtime import compiled, kernel_arg
from .schedule import Schedule, check_fits


def _make_grad_input(P: int, chunk_rows: int, e_min: int, sched: Schedule):
    from tvm.script import tirx as T

    MT, PT = sched.rows, sched.cols

    @T.macro
    def tile(dy, words, basis, off, order, order_rows, out, r, m_start, rows):
        acc = T.alloc_buffer((rows, 3, PT), "float32")
        c = T.alloc_buffer((3, PT), "float32")
        w = T.alloc_buffer((3, PT), "float32")
        for mt in T.unroll(rows):
            for j in T.unroll(3):
                for p in T.vectorized(PT):
                    acc[mt, j, p] = T.float32(0)
        for q in T.serial(off[r], off[r + 1]):
            for p0 in T.serial(P // PT):
                for i in T.unroll(3):
                    for p in T.vectorized(PT):
                        c[i, p] = decode_expr(words[order[q], p0 * PT + p], i, e_min)
                for j in T.unroll(3):
                    for p in T.vectorized(PT):
                        w[j, p] = (c[0, p] * basis[order_rows[q], r // chunk_rows, 0, j, p0 * PT + p]
                                   + c[1, p] * basis[order_rows[q], r // chunk_rows, 1, j, p0 * PT + p]
                                   + c[2, p] * basis[order_rows[q], r // chunk_rows, 2, j, p0 * PT + p])
                for mt in T.unroll(rows):
                    for j in T.unroll(3):
                        for p in T.vectorized(PT):
                            acc[mt, j, p] = acc[mt, j, p] + dy[m_start + mt, order_rows[q] * P + p0 * PT + p] * w[j, p]
        for mt in T.unroll(rows):
            for j in T.unroll(3):
                out[m_start + mt, r * 3 + j] = T.float32(0)
                for p in T.serial(PT):
                    out[m_start + mt, r * 3 + j] = out[m_start + mt, r * 3 + j] + acc[mt, j, p]

    @T.prim_func
    def grad_input(dy_h: T.handle, words_h: T.handle, basis_h: T.handle, off_h: T.handle, order_h: T.handle, rows_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, IN_W, NNZ, NB, G, NOFF, OUT_W = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (M, IN_W), "float32")
        words = T.match_buffer(words_h, (NNZ, P), "int16")
        basis = T.match_buffer(basis_h, (NB, G, 3, 3, P), "float32")
        off = T.match_buffer(off_h, (NOFF,), "int32")
        order = T.match_buffer(order_h, (NNZ,), "int32")
        order_rows = T.match_buffer(rows_h, (NNZ,), "int32")
        out = T.match_buffer(out_h, (M, OUT_W), "float32")
        for r in T.parallel(NOFF - 1):
            for m0 in T.serial(M // MT):
                tile(dy, words, basis, off, order, order_rows, out, r, m0 * MT, MT)
            for m in T.serial(M % MT):
                tile(dy, words, basis, off, order, order_rows, out, r, M - M % MT + m, 1)

    return grad_input


def pow2_linear_grad_input(dy: torch.Tensor, W: Pow2Weight, schedule: Schedule | None = None) -> torch.Tensor:
    _, k = W.shape
    P = W.group
    if dy.shape[0] == 0 or W.nnz_blocks == 0:
        return torch.zeros(dy.shape[0], k, dtype=dy.dtype)
    # Half the forward's tile height: the tile holds 3 accumulators per row.
    sched = schedule or heuristic_pow2(dy.shape[0], P, rows=4)
    check_fits(sched, P, None, "output")
    fn = compiled(_make_grad_input, P, W.chunk_rows, W.exp_range[0], sched)
    dx = torch.empty(dy.shape[0], W.block_cols * 3, dtype=dy.dtype)
    ix = W.index
    fn(
        kernel_arg(pad_columns(dy, W.block_rows * P)), kernel_arg(W.words), kernel_arg(W.basis),
        kernel_arg(ix.col_offsets), kernel_arg(ix.col_order), kernel_arg(ix.col_order_rows), dx,
    )
    return dx[:, :k] if dx.shape[1] != k else dx
