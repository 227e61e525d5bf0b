"""grad-input: dx = dy @ W, walking W's block columns through the transposed index
(see _block_rows.py for the kernel). The stored blocks [bn, bk] are read as they are."""

from __future__ import annotations

import torch

from ...formats import BSR, pad_columns
from ._block_rows import block_rows_product
from ._runtime import threads
from .schedule import Schedule, heuristic_block_rows, tuned


def bsr_linear_grad_input(dy: torch.Tensor, W: BSR, schedule: Schedule | None = None) -> torch.Tensor:
    bn, bk = W.block
    _, k = W.shape
    if dy.shape[0] == 0 or W.nnz_blocks == 0:
        return torch.zeros(dy.shape[0], k, dtype=dy.dtype)
    sched = schedule or tuned("grad_input", W, dy.shape[0]) or heuristic_block_rows(dy.shape[0], bk, bn, W.block_cols, threads())
    dx = block_rows_product(
        pad_columns(dy, W.padded_shape[0]), W.values, W.col_offsets, W.col_order_rows, W.col_order, None,
        W.padded_shape[1], sched,
    )
    return dx[:, :k] if dx.shape[1] != k else dx
