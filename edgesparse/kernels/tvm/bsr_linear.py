"""Forward: y = x @ W.T + bias on W's kept blocks (see _block_rows.py for the kernel)."""

from __future__ import annotations

import torch

from ...formats import BSR, pad_columns
from ._block_rows import block_rows_product
from ._runtime import cached_on, compiled, kernel_arg, threads
from .schedule import Schedule, heuristic_block_rows, tuned


def _make_transpose(bn: int, bk: int):
    """[nnz, bn, bk] -> [nnz, bk, bn]: threads over the blocks, each output row one
    vector store gathered from a column of the block."""
    from tvm.script import tirx as T

    @T.prim_func
    def transpose(values_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        NNZ = T.int32()
        values = T.match_buffer(values_h, (NNZ, bn, bk), "float32")
        out = T.match_buffer(out_h, (NNZ, bk, bn), "float32")
        for b in T.parallel(NNZ):
            for q in T.serial(bk):
                for p in T.vectorized(bn):
                    out[b, q, p] = values[b, p, q]

    return transpose


def _transpose(values: torch.Tensor) -> torch.Tensor:
    out = torch.empty(values.shape[0], values.shape[2], values.shape[1], dtype=values.dtype)
    if values.shape[0]:
        compiled(_make_transpose, values.shape[1], values.shape[2])(kernel_arg(values.detach()), out)
    return out


def transposed_values(W: BSR) -> torch.Tensor:
    """W's blocks as [nnz_blocks, bk, bn], so the kernel vectorises along the output.

    Kept between calls while the values are unchanged; during training it is redone
    once per optimizer step. Our kernel rather than torch's strided copy: 2048 x 2048
    at 10% (both threads), 120 us against 253 us for 32 x 32 blocks, 135 against 372
    for 16 x 16, 97 against 381 for 8 x 8.
    """
    return cached_on(W.values, "tvm_transposed", _transpose)


def bsr_linear(
    x: torch.Tensor, W: BSR, bias: torch.Tensor | None = None, schedule: Schedule | None = None, gather=None
) -> torch.Tensor:
    """y = x @ W.T + bias; x [M, K]. ``gather``: (row_base [M], col_off [Kp]) int32 when x
    is a flat padded image whose implicit im2col rows are read through these tables
    (a convolution, see ``bsr_conv2d.py``)."""
    n, _ = W.shape
    bn, bk = W.block
    m = x.shape[0] if gather is None else gather[0].shape[0]
    if m == 0 or W.nnz_blocks == 0:
        y = torch.zeros(m, n, dtype=x.dtype)
        return y + bias if bias is not None else y
    sched = (schedule or (gather is None and tuned("forward", W, m))
             or heuristic_block_rows(m, bn, bk, W.block_rows, threads(), transposable=gather is None))
    # Odd shapes: x is padded to whole block columns, a padded bias and output are cut back.
    padded_bias = pad_columns(bias[None], W.padded_shape[0])[0] if bias is not None else None
    y = block_rows_product(
        x if gather is not None else pad_columns(x, W.padded_shape[1]), transposed_values(W), W.row_offsets,
        W.col_indices, None, padded_bias, W.padded_shape[0], sched, gather,
    )
    return y[:, :n] if y.shape[1] != n else y
