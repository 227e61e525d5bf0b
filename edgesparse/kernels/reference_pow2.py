"""Pure-torch products of a power-of-two weight W = C·B (:class:`edgesparse.pow2.Pow2Weight`):
the oracle the compiled pow2 kernels are read against, and their fallback.

They decode the kept (group x 3) blocks of W — C's codes by ldexp, times each row's
chunk basis — and run the block-sparse reference products on them (no dense W).
"""

from __future__ import annotations

import torch

from ..formats import BSR
from ..pow2.format import Pow2Weight
from .reference import _accumulator_dtype, _block_rows_product, bsr_linear_grad_weight


def _blocks(W: Pow2Weight, dtype: torch.dtype) -> torch.Tensor:
    return W.blocks().to(_accumulator_dtype(dtype))


def pow2_linear(x: torch.Tensor, W: Pow2Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [M, K]."""
    ix = W.index
    y = _block_rows_product(x, _blocks(W, x.dtype).transpose(1, 2), ix.col_indices, ix.row_indices, W.block_cols, W.block_rows, W.shape[0])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).contiguous()


def pow2_linear_grad_input(dy: torch.Tensor, W: Pow2Weight) -> torch.Tensor:
    """dx = dy @ W for dy [M, N]."""
    ix = W.index
    dx = _block_rows_product(dy, _blocks(W, dy.dtype), ix.row_indices, ix.col_indices, W.block_rows, W.block_cols, W.shape[1])
    return dx.to(dy.dtype).contiguous()


def pow2_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: Pow2Weight):
    """(dC [nnz_blocks, 3, group], dB [NB, G, 3, 3, group]) for the loss gradient dy.

    dW on the pattern is dy.T @ x at the kept blocks; then, per output row n of block b
    (chunk g): dC[b, i] = sum_j dW[b, j]·B[n, g][i, j] (the straight-through gradient of
    C's decoded values) and dB[n, g][i, j] = sum over the chunk's blocks of C[b, i]·dW[b, j].
    """
    acc = _accumulator_dtype(dy.dtype)
    ix = W.index
    pattern = BSR.from_index(torch.empty(W.nnz_blocks, W.group, 3, dtype=acc), ix, W.shape)
    dW = bsr_linear_grad_weight(dy.to(acc), x.to(acc), pattern)  # [nnzb, group, 3]
    rows, chunks = ix.row_indices.long(), ix.col_indices.long() // W.chunk_rows
    basis = W.basis[rows, chunks].to(acc)  # [nnzb, 3 (i), 3 (j), group]
    dC = torch.einsum("bpj,bijp->bip", dW, basis)
    dB = torch.zeros(W.block_rows * W.n_chunks, 3, 3, W.group, dtype=acc, device=dy.device)
    dB.index_add_(0, rows * W.n_chunks + chunks, torch.einsum("bip,bpj->bijp", W.coefficients().to(acc), dW))
    return dC.to(dy.dtype).contiguous(), dB.reshape(W.basis.shape).to(dy.dtype).contiguous()
