"""grad-weight on the pattern: for each kept block b at (block row r, block column c),

    out[b] = dy[:, r*bn:(r+1)*bn].T @ x[:, c*bk:(c+1)*bk]          [bn, bk]

Threads split the nonzero blocks; the register tile is ``rows`` rows of the block by
``cols`` of its columns, vectorised over the columns, with dy broadcast. The dense
N x K gradient is never formed, and nothing the size of the batch is allocated: each
thread copies chunks of rows (``chunk_rows``) of its block's slices of dy and x into
two small buffers (or reads them in place when the block is one register tile), so the
extra memory is the gradient itself at any batch (tests/nn/test_functional.py
measures it).

Blocks of few entries (8 x 4, 1 x 4, ...) fill too little of a vector along their
columns: there the kernel vectorises along the batch instead (``Schedule.vector ==
"batch"``, :func:`_make_grad_weight_batch`), and its extra memory is transposed
copies of dy and x (M x (N + K) floats) for the length of the call.

An earlier version packed whole block-column panels [blocks, M, width] of dy and x
first: M x (N + K) floats, 3.5x the nonzeros at M = 256 for 2048 x 2048 at 10%, and
for a convolution's unfolded input tens of MB, freshly page-faulted on every call.
"""

from __future__ import annotations

import torch

from ...formats import BSR, pad_columns
from ...compiler.target import vector_unit
from ._runtime import compiled, kernel_arg, placeholder, rows_operand, threads, transposing_copy
from .schedule import Schedule, check_fits, check_transposable, heuristic_grad_weight, tuned


def chunk_rows(bn: int, bk: int) -> int:
    """Rows of dy and x copied per pass. Each of a block's (bn / rows) x (bk / cols)
    register tiles walks the batch: walked whole, a 32 x 32 block of a conv at batch 32
    on 32x32 pixels re-read 4 MiB of each operand 16 times and ran at 13 GFLOP/s a
    thread. 256 rows of two 32-wide slices (64 KiB) stay in L2 across the tiles: 10.1 ->
    4.5 ms for layer 1 of the 90%-pruned ResNet-18 (64 ch, M = 32768, 2 threads).

    Blocks of 2048 entries or more take 32 rows, whose slices (16 KiB at 64 x 64) stay in
    L1 beside the block being summed. GFLOP/s at 256 / 32 rows, 2048 x 2048 at 10%, M =
    256, three runs: 64 x 64 85 / 100, 61 / 78, 84 / 93; 32 x 64 88 / 92, 71 / 81,
    80 / 83; 64 x 32 78 / 79, 72 / 78; 64 x 64 of a 2304-wide conv at M = 2048: 72 / 75,
    69 / 74. Smaller blocks gained nothing beyond the noise (32 x 32: 68 / 71 and 80 /
    81; 16 x 16: 60 / 61 and 56 / 52) and 8 x 16 lost (49 / 44)."""
    return 32 if bn * bk >= 2048 else 256


def _reads_in_place(bn: int, bk: int, sched: Schedule, gather: bool) -> bool:
    """Whether the kernel reads dy and x where they lie instead of copying chunks: when the
    block is a single register tile, each row is read once per block and a copy buys no
    reuse. At 8 x 8 blocks, 10% of 2048 x 2048, M = 256: 3.7 ms in place against 7.1 ms
    copying (2 threads). A convolution's gathered x is always copied (its padded columns
    read real pixels, which the copy zeroes)."""
    return sched.rows == bn and sched.cols == bk and not gather


def _make_grad_weight(bn: int, bk: int, sched: Schedule, gather: bool):
    from tvm.script import tirx as T

    RT, CT, UM = sched.rows, sched.cols, sched.unroll
    CHUNK = chunk_rows(bn, bk)
    x_shape, x_at = rows_operand(gather)
    in_place = _reads_in_place(bn, bk, sched, gather)

    def x_width(width, n_col_off):  # gathered: one table entry per column
        return n_col_off if gather else width

    if in_place:  # the wrapper padded dy and x to whole blocks
        def dy_at(dy, dyc, row, m_start, m, r):
            return dy[m_start + m, row * bn + r]

        def xs_at(x, row_base, col_off, xc, col, m_start, m, c):
            return x[m_start + m, col * bk + c]
    else:
        def dy_at(dy, dyc, row, m_start, m, r):
            return dyc[m, r]

        def xs_at(x, row_base, col_off, xc, col, m_start, m, c):
            return xc[m, c]

    @T.macro
    def copy_chunk(dy, x, row_base, col_off, dyc, xc, row, col, N, K, m_start, length):
        """dy's and x's rows m_start.. sliced to the block's columns, zero past the matrix
        edge: consecutive in memory, where in place consecutive rows are N*4 bytes apart
        (8 KiB at N = 2048, every row in the same L1 sets: 9 GFLOP/s)."""
        for m in T.serial(length):
            if row * bn + bn <= N:
                for r in T.vectorized(bn):
                    dyc[m, r] = dy[m_start + m, row * bn + r]
            else:
                for r in T.serial(bn):
                    dyc[m, r] = T.if_then_else(row * bn + r < N, dy[m_start + m, T.min(row * bn + r, N - 1)], T.float32(0))
            if col * bk + bk <= K:
                for c in T.vectorized(bk):
                    xc[m, c] = x_at(x, row_base, col_off, m_start + m, col * bk + c)
            else:
                for c in T.serial(bk):
                    xc[m, c] = T.if_then_else(
                        col * bk + c < K, x_at(x, row_base, col_off, m_start + m, T.min(col * bk + c, K - 1)), T.float32(0)
                    )

    @T.macro
    def accumulate(dy, x, row_base, col_off, dyc, xc, row, col, acc, r0, c0, m_start, m):
        for rt in T.unroll(RT):
            for c in T.vectorized(CT):
                acc[rt, c] = acc[rt, c] + dy_at(dy, dyc, row, m_start, m, r0 * RT + rt) * xs_at(
                    x, row_base, col_off, xc, col, m_start, m, c0 * CT + c)

    @T.macro
    def chunk(dy, x, row_base, col_off, dyc, xc, out, b, row, col, N, K, m_start, length):
        if not in_place:
            copy_chunk(dy, x, row_base, col_off, dyc, xc, row, col, N, K, m_start, length)
        for r0 in T.serial(bn // RT):
            for c0 in T.serial(bk // CT):
                acc = T.alloc_buffer((RT, CT), "float32")
                for rt in T.unroll(RT):
                    for c in T.vectorized(CT):
                        acc[rt, c] = out[b, r0 * RT + rt, c0 * CT + c]
                for m0 in T.serial(length // UM):
                    for m1 in T.unroll(UM):
                        accumulate(dy, x, row_base, col_off, dyc, xc, row, col, acc, r0, c0, m_start, m0 * UM + m1)
                for m in T.serial(length % UM):
                    accumulate(dy, x, row_base, col_off, dyc, xc, row, col, acc, r0, c0, m_start, length - length % UM + m)
                for rt in T.unroll(RT):
                    for c in T.vectorized(CT):
                        out[b, r0 * RT + rt, c0 * CT + c] = acc[rt, c]

    @T.prim_func
    def grad_weight(dy_h: T.handle, x_h: T.handle, row_base_h: T.handle, col_off_h: T.handle,
                    rows_h: T.handle, cols_h: T.handle, out_h: T.handle, NT: T.int32):
        T.func_attr({"tir.noalias": True})
        M, N, XW, FLAT, NRB, NCO, NNZ = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (M, N), "float32")
        x = T.match_buffer(x_h, x_shape(M, XW, FLAT), "float32")
        row_base = T.match_buffer(row_base_h, (NRB,), "int32")
        col_off = T.match_buffer(col_off_h, (NCO,), "int32")
        block_row = T.match_buffer(rows_h, (NNZ,), "int32")
        block_col = T.match_buffer(cols_h, (NNZ,), "int32")
        out = T.match_buffer(out_h, (NNZ, bn, bk), "float32")
        K = x_width(XW, NCO)
        # Threads split the blocks, in NT equal runs as TVM's own parallel loop would, so
        # that the chunk buffers are allocated once per thread, not once per block
        # (8 x 8 blocks, 10% of 2048 x 2048, copying: 9.4 against 7.1 ms). Each copies
        # its blocks' chunks itself: a block row's dy slice is copied once per block of
        # the row, ~3% of the block's FMAs at 32 x 32.
        for t in T.parallel(NT):
            dyc = T.alloc_buffer((CHUNK if not in_place else 1, bn), "float32")
            xc = T.alloc_buffer((CHUNK if not in_place else 1, bk), "float32")
            for b in T.serial(t * NNZ // NT, (t + 1) * NNZ // NT):
                for r in T.serial(bn):
                    for c in T.vectorized(bk):
                        out[b, r, c] = T.float32(0)
                for mc in T.serial(M // CHUNK):
                    chunk(dy, x, row_base, col_off, dyc, xc, out, b, block_row[b], block_col[b], N, K, mc * CHUNK, CHUNK)
                chunk(dy, x, row_base, col_off, dyc, xc, out, b, block_row[b], block_col[b], N, K, M - M % CHUNK, M % CHUNK)

    return grad_weight


def _make_grad_weight_batch(bn: int, bk: int, sched: Schedule, lanes: int):
    """grad-weight vectorised along the batch, for blocks too small to fill a vector
    along their columns (a 1 x 4 block used 1 of 8 lanes: 2 GFLOP/s at 2048 x 2048).

    First both threads copy dy and x transposed into dyT [N, M] and xT [K, M] (padded
    with zeros to whole blocks and a whole number of vectors; TVM's workspace, reused
    between calls); then for each block, ``rows`` x ``cols`` vector accumulators run
    down the batch, acc[i, j] += dyT[row i] * xT[column j] one vector of the batch at a
    time, and each is summed across its lanes at the end. Each step loads rows + cols
    vectors for rows x cols FMAs, all of whole vectors. Same arguments as
    :func:`_make_grad_weight` (the gather tables unused), so the tuner times either.
    Copying the transposes in the kernel or with torch beforehand measured the same
    (8 x 4 at 10%, M = 256: 8.9 / 7.7 ms; 1 x 4: 11.8 / 14.2 ms)."""
    from tvm.script import tirx as T

    RT, CT, UM, L = sched.rows, sched.cols, sched.unroll, lanes

    def up(v, q):  # v rounded up to a multiple of q
        return (v + q - 1) // q * q

    transpose = transposing_copy(L)

    @T.macro
    def step(dyT, xT, acc, row, col, i0, j0, v):
        """The tile's FMAs for batch vector v."""
        for i in T.unroll(RT):
            for j in T.unroll(CT):
                for lane in T.vectorized(L):
                    acc[i, j, lane] = acc[i, j, lane] + dyT[row * bn + i0 * RT + i, v * L + lane] * xT[col * bk + j0 * CT + j, v * L + lane]

    @T.prim_func
    def grad_weight_batch(dy_h: T.handle, x_h: T.handle, row_base_h: T.handle, col_off_h: T.handle,
                          rows_h: T.handle, cols_h: T.handle, out_h: T.handle, NT: T.int32):
        T.func_attr({"tir.noalias": True})
        M, N, K, NNZ = T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (M, N), "float32")
        x = T.match_buffer(x_h, (M, K), "float32")
        block_row = T.match_buffer(rows_h, (NNZ,), "int32")
        block_col = T.match_buffer(cols_h, (NNZ,), "int32")
        out = T.match_buffer(out_h, (NNZ, bn, bk), "float32")
        dyT = T.alloc_buffer((up(N, bn), up(M, L)), "float32")
        xT = T.alloc_buffer((up(K, bk), up(M, L)), "float32")
        for t in T.parallel(NT):
            transpose(dy, dyT, N, M, up(M, L), t * up(N, bn) // NT, (t + 1) * up(N, bn) // NT)
            transpose(x, xT, K, M, up(M, L), t * up(K, bk) // NT, (t + 1) * up(K, bk) // NT)
        vectors = up(M, L) // L
        for t in T.parallel(NT):
            for b in T.serial(t * NNZ // NT, (t + 1) * NNZ // NT):
                for i0 in T.serial(bn // RT):
                    for j0 in T.serial(bk // CT):
                        acc = T.alloc_buffer((RT, CT, L), "float32")
                        for i in T.unroll(RT):
                            for j in T.unroll(CT):
                                for lane in T.vectorized(L):
                                    acc[i, j, lane] = T.float32(0)
                        for v0 in T.serial(vectors // UM):
                            for v1 in T.unroll(UM):
                                step(dyT, xT, acc, block_row[b], block_col[b], i0, j0, v0 * UM + v1)
                        for v in T.serial(vectors - vectors % UM, vectors):
                            step(dyT, xT, acc, block_row[b], block_col[b], i0, j0, v)
                        for i in T.unroll(RT):
                            for j in T.unroll(CT):
                                out[b, i0 * RT + i, j0 * CT + j] = acc[i, j, 0]
                                for lane in T.serial(1, L):
                                    out[b, i0 * RT + i, j0 * CT + j] = out[b, i0 * RT + i, j0 * CT + j] + acc[i, j, lane]

    return grad_weight_batch


def kernel_recipe(bn: int, bk: int, sched: Schedule, gathered: bool):
    """(prim_func maker, its arguments) of the kernel ``sched`` asks for; the wrapper
    compiles it through the cache, the tuner builds it for its measurements."""
    check_transposable(sched, gathered)
    if sched.vector == "batch":
        return _make_grad_weight_batch, (bn, bk, sched, vector_unit().lanes)
    return _make_grad_weight, (bn, bk, sched, gathered)


def bsr_linear_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, W: BSR, schedule: Schedule | None = None, gather=None
) -> torch.Tensor:
    """Values [nnz_blocks, bn, bk] of dy.T @ x on W's pattern; dy [M, N], x [M, K] contiguous.

    ``gather``: (row_base [M], col_off [K]) int32 when x is a flat padded image whose
    implicit im2col rows are read through these tables (see ``bsr_conv2d.py``)."""
    bn, bk = W.block
    gathered = gather is not None
    sched = (schedule or (not gathered and tuned("grad_weight", W, dy.shape[0]))
             or heuristic_grad_weight(W.block, dy.shape[0], transposable=not gathered))
    check_fits(sched, bk, None, "column")
    if bn % sched.rows:
        raise ValueError(f"schedule.rows={sched.rows} must divide the block's row count {bn}")
    check_transposable(sched, gathered)
    if W.nnz_blocks == 0 or dy.shape[0] == 0:
        return torch.zeros_like(W.values)
    out = torch.empty_like(W.values)
    row_base, col_off = gather if gathered else (placeholder(torch.int32), placeholder(torch.int32))
    if sched.vector == "columns" and _reads_in_place(bn, bk, sched, gathered):
        dy, x = pad_columns(dy, W.padded_shape[0]), pad_columns(x, W.padded_shape[1])
    maker, params = kernel_recipe(bn, bk, sched, gathered)
    fn = compiled(maker, *params)
    fn(kernel_arg(dy), kernel_arg(x), kernel_arg(row_base), kernel_arg(col_off), kernel_arg(W.row_indices),
       kernel_arg(W.col_indices), out, min(threads(), W.nnz_blocks))
    return out
