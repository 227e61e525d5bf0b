"""grad-weight on the pattern: for each kept block b at (block row r, block column c),

    out[b] = dy[:, r*bn:(r+1)*bn].T @ x[:, c*bk:(c+1)*bk]          [bn, bk]

Threads split the nonzero blocks; the register tile is ``rows`` rows of the block by
``cols`` of its columns, vectorised over the columns, with dy broadcast. The dense
N x K gradient is never formed.

dy and x are first repacked into block-column panels [blocks, M, width] so that the
walk down the batch reads consecutive memory. Read in place, consecutive rows are
N*4 bytes apart (8 KiB for N = 2048): every row of a 32-wide slab falls into the same
L1 sets, and the kernel ran at 9 GFLOP/s; the two copies cost about a tenth of the
kernel time.

Only the block rows and columns that hold a kept block are packed (``_used``): a
convolution's weight matrix has 9x more columns than rows, so at 10% of 32x32 blocks on
256 x 2304 (8 block rows) 43% of the block columns are empty, and their panels (the
unfolded input, 19 MB at batch 32 on 8x8) were written for nothing.
"""

from __future__ import annotations

import torch

from ...formats import BSR
from ._runtime import cached_on, compiled, kernel_arg, placeholder, rows_operand
from .schedule import Schedule, check_fits, heuristic_grad_weight, tuned


# Rows of the panels walked per pass over a block's register tiles. Each of the block's
# (bn / rows) x (bk / cols) tiles walks the batch; walked whole, a 32 x 32 block of a
# conv at batch 32 on 32x32 pixels re-read its two 4 MiB panels from memory 16 times and
# ran at 13 GFLOP/s a thread. 256 rows of two 32-wide panels (64 KiB) stay in L2 across
# the tiles: layer 1 of the 90%-pruned ResNet-18 (64 ch, M = 32768) went from 10.1 to
# 4.5 ms (2 threads), and M = 256 (one chunk) is unchanged.
CHUNK_ROWS = 256


def _make_grad_weight(bn: int, bk: int, sched: Schedule):
    from tvm.script import tirx as T

    RT, CT, UM = sched.rows, sched.cols, sched.unroll

    @T.macro
    def accumulate(dy, x, acc, row, col, r0, c0, m):
        for rt in T.unroll(RT):
            for c in T.vectorized(CT):
                acc[rt, c] = acc[rt, c] + dy[row, m, r0 * RT + rt] * x[col, m, c0 * CT + c]

    @T.macro
    def chunk(dy, x, out, row, col, b, m_start, length):
        for r0 in T.serial(bn // RT):
            for c0 in T.serial(bk // CT):
                acc = T.alloc_buffer((RT, CT), "float32")
                for rt in T.unroll(RT):
                    for c in T.vectorized(CT):
                        acc[rt, c] = out[b, r0 * RT + rt, c0 * CT + c]
                for m0 in T.serial(length // UM):
                    for m1 in T.unroll(UM):
                        accumulate(dy, x, acc, row, col, r0, c0, m_start + m0 * UM + m1)
                for m in T.serial(length % UM):
                    accumulate(dy, x, acc, row, col, r0, c0, m_start + length - length % UM + m)
                for rt in T.unroll(RT):
                    for c in T.vectorized(CT):
                        out[b, r0 * RT + rt, c0 * CT + c] = acc[rt, c]

    @T.prim_func
    def grad_weight(dy_h: T.handle, x_h: T.handle, rows_h: T.handle, cols_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, NB, KB, NNZ = T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (NB, M, bn), "float32")
        x = T.match_buffer(x_h, (KB, M, bk), "float32")
        block_row = T.match_buffer(rows_h, (NNZ,), "int32")
        block_col = T.match_buffer(cols_h, (NNZ,), "int32")
        out = T.match_buffer(out_h, (NNZ, bn, bk), "float32")
        for b in T.parallel(NNZ):
            for r in T.serial(bn):
                for c in T.vectorized(bk):
                    out[b, r, c] = T.float32(0)
            for mc in T.serial(M // CHUNK_ROWS):
                chunk(dy, x, out, block_row[b], block_col[b], b, mc * CHUNK_ROWS, CHUNK_ROWS)
            chunk(dy, x, out, block_row[b], block_col[b], b, M - M % CHUNK_ROWS, M % CHUNK_ROWS)

    return grad_weight


def _make_panels(width: int, gather: bool):
    from tvm.script import tirx as T

    t_shape, t_at = rows_operand(gather)

    def columns(t_width, n_col_off):  # gathered: one table entry per column
        return n_col_off if gather else t_width

    @T.prim_func
    def panels(t_h: T.handle, row_base_h: T.handle, col_off_h: T.handle, which_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, TW, NB, FLAT, NRB, NCO = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        out = T.match_buffer(out_h, (NB, M, width), "float32")
        t = T.match_buffer(t_h, t_shape(M, TW, FLAT), "float32")
        row_base = T.match_buffer(row_base_h, (NRB,), "int32")
        col_off = T.match_buffer(col_off_h, (NCO,), "int32")
        which = T.match_buffer(which_h, (NB,), "int32")
        W = columns(TW, NCO)
        # Whole panels take a plain vector copy; only the last block column, cut by the
        # matrix edge, pays for the bounds check. One guarded loop for both, its bound
        # read through which[j], ran unvectorised: 1.6 ms against 0.14 ms for the two
        # panels of x [256, 2048] at 32-wide blocks.
        for j in T.parallel(NB):
            for m in T.serial(M):
                if which[j] * width + width <= W:
                    for c in T.vectorized(width):
                        out[j, m, c] = t_at(t, row_base, col_off, m, which[j] * width + c)
                else:
                    for c in T.serial(width):
                        out[j, m, c] = T.if_then_else(
                            which[j] * width + c < W,
                            t_at(t, row_base, col_off, m, T.min(which[j] * width + c, W - 1)),
                            T.float32(0),
                        )

    return panels


def _panels(t: torch.Tensor, blocks: int, width: int, gather=None, which: torch.Tensor | None = None) -> torch.Tensor:
    """t [M, w] as [blocks, M, width]: one contiguous, zero-padded panel per block column;
    with ``which`` (int32), only those block columns, as [len(which), M, width].

    A TVM kernel rather than torch's permute-and-copy, which runs on one thread: at
    M = 256 and 2048 columns the two copies took a quarter of grad-weight's time.

    ``gather``: (row_base [M], col_off [w]) when t is a flat image whose unfolded rows
    are read through these tables (``rows_operand``): a convolution's implicit im2col.
    """
    row_base, col_off = gather if gather is not None else (placeholder(torch.int32), placeholder(torch.int32))
    which = torch.arange(blocks, dtype=torch.int32) if which is None else which
    out = torch.empty(which.shape[0], t.shape[0] if gather is None else row_base.shape[0], width, dtype=t.dtype)
    fn = compiled(_make_panels, width, gather is not None)
    fn(kernel_arg(t), kernel_arg(row_base), kernel_arg(col_off), kernel_arg(which), out)
    return out


def _used(block_indices: torch.Tensor):
    """(the distinct block indices, sorted; each entry's position among them), int32:
    which panels to pack, and where each kept block finds its panel. Kept with the index."""

    def derive(indices):
        used, position = torch.unique(indices, return_inverse=True)
        return used.to(torch.int32), position.to(torch.int32)

    return cached_on(block_indices, "tvm_used_panels", derive)


def bsr_linear_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, W: BSR, schedule: Schedule | None = None, gather=None
) -> torch.Tensor:
    """Values [nnz_blocks, bn, bk] of dy.T @ x on W's pattern; dy [M, N], x [M, K] contiguous.

    ``gather``: (row_base [M], col_off [K]) int32 when x is a flat padded image whose
    implicit im2col rows are read through these tables (see ``bsr_conv2d.py``)."""
    bn, bk = W.block
    sched = schedule or (gather is None and tuned("grad_weight", W, dy.shape[0])) or heuristic_grad_weight(W.block, dy.shape[0])
    check_fits(sched, bk, None, "column")
    if bn % sched.rows:
        raise ValueError(f"schedule.rows={sched.rows} must divide the block's row count {bn}")
    if W.nnz_blocks == 0 or dy.shape[0] == 0:
        return torch.zeros_like(W.values)
    out = torch.empty_like(W.values)
    fn = compiled(_make_grad_weight, bn, bk, sched)
    (rows, row_panel), (cols, col_panel) = _used(W.row_indices), _used(W.col_indices)
    fn(_panels(dy, W.block_rows, bn, which=rows), _panels(x, W.block_cols, bk, gather, cols), row_panel, col_panel, out)
    return out
