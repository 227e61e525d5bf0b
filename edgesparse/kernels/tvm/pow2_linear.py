"""Forward of a power-of-two weight: y = x @ W.T + bias with W = C·B read as packed 5-bit codes.

Which order to evaluate in. For output row n, chunk g and kept C row r (one block b at
block row f = n // group, block column r):

    y[m, n] += sum_j x[m, 3r + j] · W[n, 3r + j],   W[n, 3r + j] = sum_i C[n, r, i]·B[n, g][i, j]

B belongs to the output row, so it cannot be applied to x once and shared by all rows
(that would cost 9 products per row and per n). Two orders remain, per kept C row of
one output row, for M rows of x:
  (a) partial sums first: S[m, i, j] += C[n, r, i]·x[m, 3r + j], contracted with B once
      per chunk: 9·M multiply-adds, plus 9·M per chunk;
  (b) rebuild W's 3 entries in registers, then use them: 9 multiply-adds (and 3
      decodes) once, plus 3·M for the product.
(b) is cheaper for every M >= 2 (M = 8: 33 against 72) and reads the same bytes, so the
kernel does (b): for each kept block it decodes the block's 3 x group codes into
registers (integer ops only: the codes' bits read as float32, see _pow2.py), mixes them
with the chunk's B — stored [NB, G, 3, 3, group] so a vector over the group's output rows
is contiguous, and read pre-scaled by the 2^(e_min + 126) the decode leaves out
(``scaled_basis``) — and feeds the 3 rebuilt W vectors to a register tile of ``rows`` x
``cols`` accumulators, as the fp32 BSR kernel (_block_rows.py) does with W read from
memory. Per kept element it reads 2/3 of a byte of code (a 16-bit word per C row of 3,
plus 36 bytes of B per output row and chunk) where the fp32 BSR of the same pattern
reads 4: the saving that matters when M is small and W dominates the traffic.

A block row's blocks are walked chunk by chunk (``chunk_offsets``: where each chunk's
blocks start), so the chunk's 9 B vectors stay fixed through the block loop (LLVM loads
them once per chunk) and no block divides its column index by chunk_rows. Against the
kernel before (a division per block, a multiply in the decode), the two in one process,
alternating, x 8 x 2048, W 2048 x 2048 with half of C's rows kept: 0.684 against 0.829 ms
on 2 threads with W in cache, 0.726 against 0.855 ms cycling through 45 copies of W (from
DRAM), 0.836 against 0.948 ms on one thread (medians of 50-75 timings). Dropping the
multiply alone was worth 4% of that; prefetching the code words 8-32 blocks ahead did
not help (the hardware prefetcher already follows the sequential words).

Threads split the block rows (filter groups): each owns its outputs, no atomics.

Measured (``edgesparse bench`` pow2 rows, 2 Zen 3 cores, the case above; twelve runs,
medians): against our fp32 BSR kernel on the same pattern 1.53x (1.20-1.75x) when every
call reads its weight from DRAM (the bench's "cold" rows), 0.87x (0.70-1.10x) when the
weight stays in the 32 MB L3; 4.0x torch dense (cold); 25x rebuilding W from C and B
before F.linear. At M = 8 this kernel is compute-bound (0.75-0.89 ms, warm or cold): it
reads 0.21 of the fp32 kernel's bytes, but every weight also costs a decode and 3 mixing
multiply-adds, so its gain is what DRAM costs the fp32 kernel (1.0-1.5 ms cold against
0.6-0.9 ms warm), not the byte ratio.

With more rows the product is compute-bound, and per element the in-register path does
about twice the fp32 kernel's work (decode and mix, then the same FMAs): 0.61x the fp32
BSR at M = 256. So from DECODE_ONCE_ROWS rows on, the kept blocks are decoded once per call instead
(``decoded_blocks``) and the fp32 BSR kernel runs on them: W's packed codes are still all
that is stored, and the extra pass costs what one fp32 BSR read of W does (M = 256:
0.88-0.97x the fp32 BSR in the runs above).
"""

from __future__ import annotations

import torch

from ...formats import pad_columns
from ...pow2.format import Pow2Weight
from ._pow2 import code_bits_expr, decode_expr, heuristic_pow2, scaled_basis
from ._block_rows import block_rows_product
from ._runtime import cached_on, compiled, kernel_arg, placeholder, threads
from .schedule import Schedule, check_fits, heuristic_block_rows

# From this many rows of x on, the kept blocks are decoded once per call into fp32 (one
# parallel pass writing the fp32 BSR's transposed values) for the fp32 BSR kernel,
# instead of once per row tile in registers. Measured at 2048 x 2048, half the rows kept
# (ms, in registers / decoded once / fp32 BSR): M = 32: 44 / 44 / 42; M = 64: 53 / 48 /
# 46; M = 256: 106 / 69 / 71. At M = 8 the registers win by 2.5x (1.1 / 2.9 / 1.3).
# Re-measured after the chunk walk made the registers' path faster (medians of 7, on a
# busier machine): M = 32: 3.50 / 3.68 / 3.26; M = 64: 7.91 / 6.33 / 5.26; M = 128:
# 18.3 / 10.8 / 9.7. The crossing is still between 32 and 64 rows.
DECODE_ONCE_ROWS = 64


def _make_forward(P: int, sched: Schedule, has_bias: bool):
    from tvm.script import tirx as T

    MT, PT = sched.rows, sched.cols

    @T.macro
    def tile(x, words, basis, chunk_off, idx, bias, out_scale, out, f, m_start, rows, G):
        for p0 in T.serial(P // PT):
            acc = T.alloc_buffer((rows, PT), "float32")
            c = T.alloc_buffer((3, PT), "float32")
            w = T.alloc_buffer((3, PT), "float32")
            for mt in T.unroll(rows):
                for p in T.vectorized(PT):
                    acc[mt, p] = T.float32(0)
            for g in T.serial(G):
                for b in T.serial(chunk_off[f * G + g], chunk_off[f * G + g + 1]):
                    for i in T.unroll(3):
                        for p in T.vectorized(PT):
                            c[i, p] = code_bits_expr(words[b, p0 * PT + p], i)
                    for j in T.unroll(3):
                        for p in T.vectorized(PT):
                            w[j, p] = (c[0, p] * basis[f, g, 0, j, p0 * PT + p]
                                       + c[1, p] * basis[f, g, 1, j, p0 * PT + p]
                                       + c[2, p] * basis[f, g, 2, j, p0 * PT + p])
                    for j in T.unroll(3):
                        for mt in T.unroll(rows):
                            for p in T.vectorized(PT):
                                acc[mt, p] = acc[mt, p] + x[m_start + mt, idx[b] * 3 + j] * w[j, p]
            for mt in T.unroll(rows):
                for p in T.vectorized(PT):
                    if has_bias:
                        out[m_start + mt, f * P + p0 * PT + p] = acc[mt, p] * out_scale + bias[f * P + p0 * PT + p]
                    else:
                        out[m_start + mt, f * P + p0 * PT + p] = acc[mt, p] * out_scale

    @T.prim_func
    def forward(x_h: T.handle, words_h: T.handle, basis_h: T.handle, chunk_off_h: T.handle, idx_h: T.handle, bias_h: T.handle,
                out_scale: T.float32, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, IN_W, NNZ, NB, G, NOFF, NBIAS, OUT_W = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        x = T.match_buffer(x_h, (M, IN_W), "float32")
        words = T.match_buffer(words_h, (NNZ, P), "int16")
        basis = T.match_buffer(basis_h, (NB, G, 3, 3, P), "float32")
        chunk_off = T.match_buffer(chunk_off_h, (NOFF,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        bias = T.match_buffer(bias_h, (NBIAS,), "float32")
        out = T.match_buffer(out_h, (M, OUT_W), "float32")
        for f in T.parallel(NB):
            for m0 in T.serial(M // MT):
                tile(x, words, basis, chunk_off, idx, bias, out_scale, out, f, m0 * MT, MT, G)
            for m in T.serial(M % MT):
                tile(x, words, basis, chunk_off, idx, bias, out_scale, out, f, M - M % MT + m, 1, G)

    return forward


def chunk_offsets(W: Pow2Weight) -> torch.Tensor:
    """int32 [block_rows * n_chunks + 1]: the kept blocks of block row f in chunk g are
    b in [off[f * n_chunks + g], off[f * n_chunks + g + 1]) (blocks are sorted by block
    row, then column). Cached with the pattern's column indices."""
    def derive(col_indices: torch.Tensor) -> torch.Tensor:
        chunk_of_block = W.index.row_indices.long() * W.n_chunks + col_indices.long() // W.chunk_rows
        counts = torch.bincount(chunk_of_block, minlength=W.block_rows * W.n_chunks)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

    return cached_on(W.index.col_indices, f"pow2_chunk_offsets_{W.chunk_rows}_{W.n_chunks}", derive)


def _make_decode_blocks(P: int, chunk_rows: int, e_min: int):
    """W's kept blocks, transposed [nnz_blocks, 3, group], rebuilt from codes and B."""
    from tvm.script import tirx as T

    @T.prim_func
    def decode_blocks(words_h: T.handle, basis_h: T.handle, rows_h: T.handle, idx_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        NNZ, NB, G = T.int32(), T.int32(), T.int32()
        words = T.match_buffer(words_h, (NNZ, P), "int16")
        basis = T.match_buffer(basis_h, (NB, G, 3, 3, P), "float32")
        rows = T.match_buffer(rows_h, (NNZ,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        out = T.match_buffer(out_h, (NNZ, 3, P), "float32")
        for b in T.parallel(NNZ):
            for j in T.unroll(3):
                for p in T.vectorized(P):
                    out[b, j, p] = (decode_expr(words[b, p], 0, e_min) * basis[rows[b], idx[b] // chunk_rows, 0, j, p]
                                    + decode_expr(words[b, p], 1, e_min) * basis[rows[b], idx[b] // chunk_rows, 1, j, p]
                                    + decode_expr(words[b, p], 2, e_min) * basis[rows[b], idx[b] // chunk_rows, 2, j, p])

    return decode_blocks


def decoded_blocks(W: Pow2Weight) -> torch.Tensor:
    """W's kept blocks as fp32 [nnz_blocks, 3, group] (the fp32 BSR kernel's transposed
    values), decoded by one parallel pass over the codes."""
    out = torch.empty(W.nnz_blocks, 3, W.group, dtype=W.basis.dtype)
    compiled(_make_decode_blocks, W.group, W.chunk_rows, W.exp_range[0])(
        kernel_arg(W.words), kernel_arg(W.basis), kernel_arg(W.index.row_indices), kernel_arg(W.index.col_indices), out,
    )
    return out


def pow2_linear(x: torch.Tensor, W: Pow2Weight, bias: torch.Tensor | None = None, schedule: Schedule | None = None) -> torch.Tensor:
    n, _ = W.shape
    P, nb = W.group, W.block_rows
    if x.shape[0] == 0 or W.nnz_blocks == 0:
        y = torch.zeros(x.shape[0], n, dtype=x.dtype)
        return y + bias if bias is not None else y
    padded_bias = pad_columns(bias[None], nb * P)[0] if bias is not None else None
    if schedule is None and x.shape[0] >= DECODE_ONCE_ROWS:
        sched = heuristic_block_rows(x.shape[0], P, 3, nb, threads())
        y = block_rows_product(
            pad_columns(x, W.block_cols * 3), decoded_blocks(W), W.index.row_offsets, W.index.col_indices, None,
            padded_bias, nb * P, sched,
        )
        return y[:, :n] if y.shape[1] != n else y
    sched = schedule or heuristic_pow2(x.shape[0], P)
    check_fits(sched, P, None, "output")
    fn = compiled(_make_forward, P, sched, bias is not None)
    basis, out_scale = scaled_basis(W.basis, W.exp_range[0])
    y = torch.empty(x.shape[0], nb * P, dtype=x.dtype)
    fn(
        kernel_arg(pad_columns(x, W.block_cols * 3)), kernel_arg(W.words), kernel_arg(basis),
        kernel_arg(chunk_offsets(W)), kernel_arg(W.index.col_indices),
        kernel_arg(padded_bias) if bias is not None else placeholder(torch.float32), out_scale, y,
    )
    return y[:, :n] if y.shape[1] != n else y
