"""The TensorIR kernel behind both forward and grad-input: a walk over output block rows.

    out[m, i*P + p] = bias[i*P + p] + sum over blocks b of row i, sum over q < Q of
                      inp[m, idx[b]*Q + q] * V[blk(b), q, p]

forward:     inp = x,  rows = W's block rows,    V = W's blocks transposed [bk, bn],
             blk(b) = b                                   (P = bn, Q = bk)
grad-input:  inp = dy, rows = W's block columns, V = W's blocks as stored  [bn, bk],
             blk(b) = col_order[b]                        (P = bk, Q = bn)
conv forward: as forward, with inp[m, k] the implicit im2col rows of a padded image,
             read at ``row_base[m] + col_off[k]`` (the build flag ``gather``; see
             ``bsr_conv2d.py``): the input element is a scalar broadcast, so the
             gather costs one table load per reduction step, shared by the tile.

Each output block row is a sum over that row's blocks only: no atomics, no dense W.
The register tile is ``rows`` batch rows by ``cols`` output columns, vectorised over
the columns: one broadcast of an input element feeds ``rows * cols / lanes`` FMAs.

Tried and dropped: packing the input into [M / rows, width, rows] panels first, so the
values a tile broadcasts share a cache line (as BLIS packs A). On one thread the kernel
ran at 39 / 39 / 63 GFLOP/s (10% of 32x32, 10% of 16x16, 50% of 32x32) against 42 / 39 /
60 without packing, and small batches lost to the extra pass (M = 8: 27 against 36).
"""

from __future__ import annotations

import torch

from .schedule import Schedule, check_fits, check_transposable
from ._runtime import compiled, kernel_arg, placeholder, rows_operand, transposing_copy


def make_accumulate(P: int, Q: int, sched: Schedule, indirect: bool, has_bias: bool, gather: bool):
    """The register tile's work, shared by every kernel built on this walk: ``acc[mt, p]``
    (``rows`` x ``cols``) for batch rows m_start.. and output columns i*P + p0*cols + p,
    summed over output block row i's blocks. The caller stores it."""
    from tvm.script import tirx as T

    PT, UQ = sched.cols, sched.unroll
    _, inp_at = rows_operand(gather)

    def blk(ids, b):
        return ids[b] if indirect else b

    @T.macro
    def accumulate(acc, inp, row_base, col_off, V, off, idx, ids, bias, i, p0, m_start, rows):
        for mt in T.unroll(rows):
            for p in T.vectorized(PT):
                if has_bias:
                    acc[mt, p] = bias[i * P + p0 * PT + p]
                else:
                    acc[mt, p] = T.float32(0)
        for b in T.serial(off[i], off[i + 1]):
            for q0 in T.serial(Q // UQ):
                for q1 in T.unroll(UQ):
                    for mt in T.unroll(rows):
                        for p in T.vectorized(PT):
                            acc[mt, p] = acc[mt, p] + inp_at(inp, row_base, col_off, m_start + mt, idx[b] * Q + q0 * UQ + q1) * V[blk(ids, b), q0 * UQ + q1, p0 * PT + p]

    return accumulate


def _make_block_rows(P: int, Q: int, sched: Schedule, indirect: bool, has_bias: bool, gather: bool):
    from tvm.script import tirx as T

    MT, PT = sched.rows, sched.cols
    inp_shape, _ = rows_operand(gather)
    accumulate = make_accumulate(P, Q, sched, indirect, has_bias, gather)

    @T.macro
    def tile(inp, row_base, col_off, V, off, idx, ids, bias, out, i, m_start, rows):
        for p0 in T.serial(P // PT):
            acc = T.alloc_buffer((rows, PT), "float32")  # 'global' scope: below 1 KiB TVM puts it on the stack
            accumulate(acc, inp, row_base, col_off, V, off, idx, ids, bias, i, p0, m_start, rows)
            for mt in T.unroll(rows):
                for p in T.vectorized(PT):
                    out[m_start + mt, i * P + p0 * PT + p] = acc[mt, p]

    parallel_over_blocks = sched.parallel == "blocks"

    @T.prim_func
    def block_rows(inp_h: T.handle, row_base_h: T.handle, col_off_h: T.handle, V_h: T.handle, off_h: T.handle, idx_h: T.handle,
                   ids_h: T.handle, bias_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, IN_W, FLAT, NRB, NCO = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        NNZ, NOFF, NIDS, NBIAS, OUT_W = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        out = T.match_buffer(out_h, (M, OUT_W), "float32")
        inp = T.match_buffer(inp_h, inp_shape(M, IN_W, FLAT), "float32")
        row_base = T.match_buffer(row_base_h, (NRB,), "int32")
        col_off = T.match_buffer(col_off_h, (NCO,), "int32")
        V = T.match_buffer(V_h, (NNZ, Q, P), "float32")
        off = T.match_buffer(off_h, (NOFF,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        ids = T.match_buffer(ids_h, (NIDS,), "int32")
        bias = T.match_buffer(bias_h, (NBIAS,), "float32")
        # The last M % rows batch rows take a one-row tile.
        if parallel_over_blocks:
            for i in T.parallel(NOFF - 1):
                for m0 in T.serial(M // MT):
                    tile(inp, row_base, col_off, V, off, idx, ids, bias, out, i, m0 * MT, MT)
                for m in T.serial(M % MT):
                    tile(inp, row_base, col_off, V, off, idx, ids, bias, out, i, M - M % MT + m, 1)
        else:
            for m0 in T.parallel(M // MT):
                for i in T.serial(NOFF - 1):
                    tile(inp, row_base, col_off, V, off, idx, ids, bias, out, i, m0 * MT, MT)
            for m in T.parallel(M % MT):
                for i in T.serial(NOFF - 1):
                    tile(inp, row_base, col_off, V, off, idx, ids, bias, out, i, M - M % MT + m, 1)

    return block_rows


def _make_block_rows_batch(P: int, Q: int, sched: Schedule, indirect: bool, has_bias: bool, lanes: int):
    """The same walk vectorised along the batch, for output blocks narrower than a vector
    (P = 4 on AVX2 filled half of each; P = 1, a 1 x 4 forward, one lane of eight).

    First inp is copied transposed into inpT [width, M] (zero-padded to a whole number
    of vectors; TVM's workspace). The register tile is ``cols`` output columns by
    ``rows`` vectors of batch rows: each reduction step loads ``rows`` vectors of inpT
    and broadcasts ``cols`` entries of the block, ``rows * cols`` FMAs. The tile is
    stored one element at a time (a column of out is strided), once per block row.
    Same arguments as :func:`_make_block_rows` (the gather tables unused)."""
    from tvm.script import tirx as T

    RV, PT, UQ, L = sched.rows, sched.cols, sched.unroll, lanes

    def up(v, q):  # v rounded up to a multiple of q
        return (v + q - 1) // q * q

    def blk(ids, b):
        return ids[b] if indirect else b

    transpose = transposing_copy(L)

    @T.macro
    def tile(inpT, V, off, idx, ids, bias, out, n_rows, i, v_start, nv):
        for p0 in T.serial(P // PT):
            acc = T.alloc_buffer((PT, nv, L), "float32")
            for pt in T.unroll(PT):
                for vt in T.unroll(nv):
                    for ln in T.vectorized(L):
                        if has_bias:
                            acc[pt, vt, ln] = bias[i * P + p0 * PT + pt]
                        else:
                            acc[pt, vt, ln] = T.float32(0)
            for b in T.serial(off[i], off[i + 1]):
                for q0 in T.serial(Q // UQ):
                    for q1 in T.unroll(UQ):
                        for pt in T.unroll(PT):
                            for vt in T.unroll(nv):
                                for ln in T.vectorized(L):
                                    acc[pt, vt, ln] = acc[pt, vt, ln] + V[blk(ids, b), q0 * UQ + q1, p0 * PT + pt] * inpT[idx[b] * Q + q0 * UQ + q1, (v_start + vt) * L + ln]
            for vt in T.serial(nv):
                for ln in T.serial(L):
                    if (v_start + vt) * L + ln < n_rows:
                        for pt in T.unroll(PT):
                            out[(v_start + vt) * L + ln, i * P + p0 * PT + pt] = acc[pt, vt, ln]

    parallel_over_blocks = sched.parallel == "blocks"

    @T.prim_func
    def block_rows_batch(inp_h: T.handle, row_base_h: T.handle, col_off_h: T.handle, V_h: T.handle, off_h: T.handle,
                         idx_h: T.handle, ids_h: T.handle, bias_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, IN_W, NNZ, NOFF, NIDS, NBIAS, OUT_W = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        out = T.match_buffer(out_h, (M, OUT_W), "float32")
        inp = T.match_buffer(inp_h, (M, IN_W), "float32")
        V = T.match_buffer(V_h, (NNZ, Q, P), "float32")
        off = T.match_buffer(off_h, (NOFF,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        ids = T.match_buffer(ids_h, (NIDS,), "int32")
        bias = T.match_buffer(bias_h, (NBIAS,), "float32")
        inpT = T.alloc_buffer((IN_W, up(M, L)), "float32")
        for k in T.parallel(IN_W):
            transpose(inp, inpT, IN_W, M, up(M, L), k, k + 1)
        # The last (vectors % rows) batch vectors take a one-vector tile.
        vectors = up(M, L) // L
        if parallel_over_blocks:
            for i in T.parallel(NOFF - 1):
                for v0 in T.serial(vectors // RV):
                    tile(inpT, V, off, idx, ids, bias, out, M, i, v0 * RV, RV)
                for vr in T.serial(vectors % RV):
                    tile(inpT, V, off, idx, ids, bias, out, M, i, vectors - vectors % RV + vr, 1)
        else:
            for v0 in T.parallel(vectors // RV):
                for i in T.serial(NOFF - 1):
                    tile(inpT, V, off, idx, ids, bias, out, M, i, v0 * RV, RV)
            for vr in T.parallel(vectors % RV):
                for i in T.serial(NOFF - 1):
                    tile(inpT, V, off, idx, ids, bias, out, M, i, vectors - vectors % RV + vr, 1)

    return block_rows_batch


def kernel_recipe(P: int, Q: int, sched: Schedule, indirect: bool, has_bias: bool, gather: bool):
    """(prim_func maker, its arguments) of the kernel ``sched`` asks for; the wrapper
    compiles it through the cache, the tuner builds it for its measurements."""
    from ...compiler.target import vector_unit

    check_transposable(sched, gather)
    if sched.vector == "batch":
        return _make_block_rows_batch, (P, Q, sched, indirect, has_bias, vector_unit().lanes)
    return _make_block_rows, (P, Q, sched, indirect, has_bias, gather)


def block_rows_product(inp, V, offsets, idx, ids, bias, out_width: int, sched: Schedule, gather=None) -> torch.Tensor:
    """Run the kernel; ``inp`` [M, n_in_blocks * Q], returns out [M, out_width] where
    out_width = (len(offsets) - 1) * P. ``ids`` None means blk(b) = b; ``bias`` may be None.

    ``gather``: (row_base [M], col_off [n_in_blocks * Q]) int32, when ``inp`` is a flat
    image whose unfolded rows are read through these tables (``rows_operand``)."""
    _, Q, P = V.shape
    check_fits(sched, P, Q, "output")
    maker, params = kernel_recipe(P, Q, sched, ids is not None, bias is not None, gather is not None)
    fn = compiled(maker, *params)
    row_base, col_off = gather if gather is not None else (placeholder(torch.int32), placeholder(torch.int32))
    out = torch.empty(inp.shape[0] if gather is None else row_base.shape[0], out_width, dtype=inp.dtype)
    fn(
        kernel_arg(inp),
        kernel_arg(row_base),
        kernel_arg(col_off),
        kernel_arg(V),
        kernel_arg(offsets),
        kernel_arg(idx),
        kernel_arg(ids) if ids is not None else placeholder(torch.int32),
        kernel_arg(bias) if bias is not None else placeholder(torch.float32),
        out,
    )
    return out
