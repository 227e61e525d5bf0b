"""The three block-sparse products of a linear layer's training step.

Each checks its arguments, flattens the leading dimensions to 2-D and hands the
work to the backend :func:`edgesparse.kernels.dispatch.select` picks.

- ``bsr_linear(x, W, bias)``            y  = x @ W.to_dense().T + bias      (forward)
- ``bsr_linear_grad_input(dy, W)``      dx = dy @ W.to_dense()               (backward, input)
- ``bsr_linear_grad_weight(dy, x, W)``  the blocks of dy.T @ x on W's pattern (backward, weight)
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import BSR
from .kernels import dispatch

__all__ = ["bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight"]


def _check_bsr(W) -> BSR:
    if not isinstance(W, BSR):
        raise TypeError(f"W must be an edgesparse.BSR, got {type(W).__name__}; build one with BSR.from_dense(w, block)")
    return W


def _check_operand(t, name: str, width: int, width_name: str, W: BSR) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] != width:
        raise ValueError(f"{name} must have shape [..., {width}] ({width_name} of W with shape {W.shape}), got {tuple(t.shape)}")
    if t.dtype != W.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but W has {W.dtype}; convert one (W.to({t.dtype}) or {name}.to({W.dtype}))")
    if t.device != W.device:
        raise ValueError(f"{name} is on {t.device} but W is on {W.device}; move one (W.to({str(t.device)!r}))")
    return t.reshape(-1, width).contiguous()


def bsr_linear(x: torch.Tensor, W: BSR, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.to_dense().T + bias`` for x of shape [..., K]; returns [..., N]."""
    W = _check_bsr(W)
    n, k = W.shape
    x2 = _check_operand(x, "x", k, "in_features K", W)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor of shape ({n},) or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) (out_features N of W), got {tuple(bias.shape)}")
        if bias.dtype != W.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but W has {W.dtype}; convert it with bias.to({W.dtype})")
        if bias.device != W.device:
            raise ValueError(f"bias is on {bias.device} but W is on {W.device}; move it with bias.to({str(W.device)!r})")
        bias = bias.contiguous()
    y2 = dispatch.select(W.device, W.dtype).bsr_linear(x2, W, bias)
    return y2.reshape(*x.shape[:-1], n)


def bsr_linear_grad_input(dy: torch.Tensor, W: BSR) -> torch.Tensor:
    """``dy @ W.to_dense()`` for dy of shape [..., N]; returns [..., K]."""
    W = _check_bsr(W)
    n, k = W.shape
    dy2 = _check_operand(dy, "dy", n, "out_features N", W)
    dx2 = dispatch.select(W.device, W.dtype).bsr_linear_grad_input(dy2, W)
    return dx2.reshape(*dy.shape[:-1], k)


def bsr_linear_grad_weight(dy: torch.Tensor, x: torch.Tensor, W: BSR) -> BSR:
    """The gradient of W on its own pattern: a BSR with W's blocks holding those of dy.T @ x.

    dy [..., N] and x [..., K] are flattened to 2-D; the dense N x K gradient is never built.
    """
    W = _check_bsr(W)
    n, k = W.shape
    dy2 = _check_operand(dy, "dy", n, "out_features N", W)
    x2 = _check_operand(x, "x", k, "in_features K", W)
    if dy2.shape[0] != x2.shape[0]:
        raise ValueError(f"dy and x must hold the same number of rows once flattened, got {dy2.shape[0]} and {x2.shape[0]}")
    values = dispatch.select(W.device, W.dtype).bsr_linear_grad_weight(dy2, x2, W)
    # A NaN or inf in dy or x would otherwise land in the blocks' padding (0 * inf),
    # and from there in every forward output after an optimizer step.
    return W.with_values(W.zero_padding_(values))
