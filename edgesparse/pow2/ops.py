"""The products of a power-of-two weight W = C·B (:class:`~edgesparse.pow2.Pow2Weight`).

Each checks its arguments, flattens the leading dimensions to 2-D and runs the kernel of
the backend :func:`edgesparse.kernels.dispatch.select` picks: ``kernels/<backend>/<op>.py``
for tvm and triton, ``kernels/reference_pow2.py`` for the reference.

- ``pow2_linear(x, W, bias)``            y  = x @ W.to_dense().T + bias
- ``pow2_linear_grad_input(dy, W)``      dx = dy @ W.to_dense()
- ``pow2_linear_grad_weight(dy, x, W)``  (dC, dB): the gradients of C's decoded values
  (straight-through: d/dC of C·B, on the kept blocks, laid out like W.codes, [nnz_blocks, 3, group]) and of the
  basis (laid out like W.basis)
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from ..kernels import dispatch
from ..ops import _check_operand
from .format import Pow2Weight

__all__ = ["pow2_linear", "pow2_linear_grad_input", "pow2_linear_grad_weight"]


def _kernel(W: Pow2Weight, op: str):
    backend = dispatch.select(W.device, W.dtype).__name__.rsplit(".", 1)[-1]
    if backend == "reference":
        return getattr(importlib.import_module("edgesparse.kernels.reference_pow2"), op)
    return getattr(importlib.import_module(f"edgesparse.kernels.{backend}.{op}"), op)


def _check_pow2(W) -> Pow2Weight:
    if not isinstance(W, Pow2Weight):
        raise TypeError(f"W must be an edgesparse.pow2.Pow2Weight, got {type(W).__name__}; build one with edgesparse.pow2.decompose(weight)")
    return W


def pow2_linear(x: torch.Tensor, W: Pow2Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.to_dense().T + bias`` for x of shape [..., K]; returns [..., N]."""
    W = _check_pow2(W)
    n, k = W.shape
    x2 = _check_operand(x, "x", k, "in_features K", W)
    if bias is not None:
        if isinstance(bias, torch.Tensor) and bias.dim() != 1:
            raise ValueError(f"bias must have shape ({n},) (out_features N of W), got {tuple(bias.shape)}")
        bias = _check_operand(bias, "bias", n, "out_features N", W).reshape(n)
    y2 = _kernel(W, "pow2_linear")(x2, W, bias)
    return y2.reshape(*x.shape[:-1], n)


def pow2_linear_grad_input(dy: torch.Tensor, W: Pow2Weight) -> torch.Tensor:
    """``dy @ W.to_dense()`` for dy of shape [..., N]; returns [..., K]."""
    W = _check_pow2(W)
    n, k = W.shape
    dy2 = _check_operand(dy, "dy", n, "out_features N", W)
    return _kernel(W, "pow2_linear_grad_input")(dy2, W).reshape(*dy.shape[:-1], k)


def pow2_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: Pow2Weight) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dC [nnz_blocks, 3, group], dB like W.basis) for dy [..., N] and x [..., K]."""
    W = _check_pow2(W)
    n, k = W.shape
    dy2 = _check_operand(dy, "dy", n, "out_features N", W)
    x2 = _check_operand(x, "x", k, "in_features K", W)
    if dy2.shape[0] != x2.shape[0]:
        raise ValueError(f"dy and x must hold the same number of rows once flattened, got {dy2.shape[0]} and {x2.shape[0]}")
    return _kernel(W, "pow2_linear_grad_weight")(dy2, x2, W)
