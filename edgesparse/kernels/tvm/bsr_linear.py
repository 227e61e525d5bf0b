"""Forward: y = x @ W.T + bias on W's kept blocks (see _block_rows.py for the kernel)."""

from __future__ import annotations

import torch

from ...formats import BSR, pad_columns
from ._block_rows import block_rows_product
from ._runtime import cached_on, threads
from .schedule import Schedule, heuristic_block_rows, tuned


def transposed_values(W: BSR) -> torch.Tensor:
    """W's blocks as [nnz_blocks, bk, bn], so the kernel vectorises along the output.

    Kept between calls while the values are unchanged: the copy costs 0.4 ms for
    2048x2048 at 10% of 32x32 blocks (torch, one thread), a sixth of the 2.5 ms kernel.
    During training it is redone once per optimizer step.
    """
    return cached_on(W.values, "tvm_transposed", lambda v: v.transpose(1, 2).contiguous())


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
    sched = schedule or (gather is None and tuned("forward", W, m)) or heuristic_block_rows(m, bn, bk, W.block_rows, threads())
    # Odd shapes: x is padded to whole block columns, a padded bias and output are cut back.
    padded_bias = pad_columns(bias[None], W.padded_shape[0])[0] if bias is not None else None
    y = block_rows_product(
        x if gather is not None else pad_columns(x, W.padded_shape[1]), transposed_values(W), W.row_offsets,
        W.col_indices, None, padded_bias, W.padded_shape[0], sched, gather,
    )
    return y[:, :n] if y.shape[1] != n else y
