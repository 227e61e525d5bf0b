"""The block-sparse convolution as a ``torch.library`` custom op, on the TVM kernels of
:mod:`edgesparse.kernels.tvm.bsr_conv2d` (implicit im2col: the unfolded rows are
never built).

Same conventions as :mod:`edgesparse.nn.functional`'s ``edgesparse::bsr_linear``: plain
tensors in (values, the index as one ``Tensor[]``, the logical shape as two ints, the
conv geometry as int lists), a fake implementation, and an autograd formula whose
backward products are custom ops too, so ``torch.compile`` traces a training step
without a graph break:

- d/dx      = col2im(dy @ W)       (one TVM kernel: the tiles of dy @ W added into dx)
- d/dvalues = dy.T @ rows on W's pattern, the rows gathered from x, never stored;
  with a :class:`~edgesparse.nn.functional.WeightGradMask` on its blocks only
- d/dbias   = dy summed over batch and pixels

The output is channels-last in memory (the kernel's rows [B*OH*OW, C_out] are that
layout); it has nn.Conv2d's shape and values.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..formats import BSR, BSRIndex
from ._custom_ops import SparseOp
from .functional import WeightGradMask, masked_weight_grad

__all__ = ["sparse_conv2d"]


def _kernels():
    from ..kernels.tvm import bsr_conv2d

    return bsr_conv2d


def _weight(values: Tensor, index: Sequence[Tensor], n: int, k: int) -> BSR:
    return BSR.from_index(values, BSRIndex(*index), (n, k))


def _conv_impl(
    x: Tensor, values: Tensor, index: List[Tensor], n: int, k: int, bias: Optional[Tensor],
    kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
    grad_blocks: Optional[Tensor], grad_index: List[Tensor], grad_elements: Optional[Tensor],
) -> Tensor:
    return _kernels().conv2d(x, _weight(values, index, n, k), bias, kernel_size, stride, padding, dilation)


def _conv_fake(x, values, index, n, k, bias, kernel_size, stride, padding, dilation, grad_blocks, grad_index, grad_elements):
    out_h, out_w = _kernels().output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], n, out_h, out_w)).contiguous(memory_format=torch.channels_last)


_sparse_conv2d = SparseOp("edgesparse::sparse_conv2d", _conv_impl, _conv_fake)


# The backward ops take dy [B, C_out, OH, OW] as it comes: its rows [B*OH*OW, C_out] are
# made inside, where torch.compile does not see them (a traced reshape would bake in the
# traced gradient's strides, which the real one need not have).
def _grad_input_impl(
    dy: Tensor, values: Tensor, index: List[Tensor], n: int, k: int, x_shape: List[int],
    kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int], channels_last: bool,
) -> Tensor:
    return _kernels().conv2d_grad_input(dy, _weight(values, index, n, k), x_shape, kernel_size, stride, padding, dilation,
                                        channels_last=channels_last)


def _grad_input_fake(dy, values, index, n, k, x_shape, kernel_size, stride, padding, dilation, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return dy.new_empty(x_shape).contiguous(memory_format=layout)


_sparse_conv2d_grad_input = SparseOp("edgesparse::sparse_conv2d_grad_input", _grad_input_impl, _grad_input_fake)


def _grad_weight_impl(
    dy: Tensor, x: Tensor, values: Tensor, index: List[Tensor], n: int, k: int,
    kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
) -> Tensor:
    return _kernels().conv2d_grad_weight(dy, x, _weight(values, index, n, k), kernel_size, stride, padding, dilation)


def _grad_weight_fake(dy, x, values, index, n, k, kernel_size, stride, padding, dilation):
    return torch.empty_like(values)


_sparse_conv2d_grad_weight = SparseOp("edgesparse::sparse_conv2d_grad_weight", _grad_weight_impl, _grad_weight_fake)


def _setup_context(ctx, inputs, output):
    x, values, index, n, k, _bias, kernel_size, stride, padding, dilation, grad_blocks, grad_index, grad_elements = inputs
    # x is kept only for the weight gradient: a frozen layer does not hold its input alive.
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, grad_blocks, grad_elements, *index, *grad_index)
    ctx.n, ctx.k, ctx.index_len, ctx.x_shape = n, k, len(index), list(x.shape)
    # dx takes x's layout: our conv's output, and so the activations between two sparse
    # convs, are channels-last, and an NCHW gradient against them slows every op it meets.
    ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    ctx.geometry = (kernel_size, stride, padding, dilation)


def _backward(ctx, dy, eager: bool):
    x, values, grad_blocks, grad_elements, *indices = ctx.saved_tensors
    index, grad_index = indices[: ctx.index_len], indices[ctx.index_len :]
    needs_x, needs_values, *_, needs_bias = ctx.needs_input_grad[:6]
    n, k, geometry = ctx.n, ctx.k, ctx.geometry
    dx = dvalues = dbias = None
    if needs_x:
        dx = _sparse_conv2d_grad_input.run(eager, dy, values, index, n, k, ctx.x_shape, *geometry, ctx.channels_last)
    if needs_values:  # with gradient masking, only the mask's blocks are computed
        dvalues = masked_weight_grad(
            lambda v, i: _sparse_conv2d_grad_weight.run(eager, dy, x, v, i, n, k, *geometry),
            values, index, grad_blocks, grad_index, grad_elements,
        )
    if needs_bias:
        dbias = dy.sum((0, 2, 3))
    return dx, dvalues, [None] * len(index), None, None, dbias, None, None, None, None, None, [None] * len(grad_index), None


_sparse_conv2d.register_autograd(_backward, _setup_context)


def _pair(value, name: str) -> List[int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return [int(v) for v in pair]


def sparse_conv2d(
    x: Tensor,
    values: Tensor,
    index: BSRIndex,
    shape: Sequence[int],
    bias: Optional[Tensor],
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    grad_mask: Optional[WeightGradMask] = None,
) -> Tensor:
    """``nn.functional.conv2d(x, weight, bias, stride, padding, dilation)`` (groups=1) for
    the block-sparse weight whose matrix ``weight.reshape(C_out, -1)`` of logical
    ``shape`` (C_out, C_in*kh*kw) has these ``values`` [nnzb, bn, bk] on the pattern
    ``index``; x [B, C_in, H, W] float32 on the CPU (the TVM kernels).

    Differentiable in x, values and bias, every gradient computed by a sparse kernel;
    with ``grad_mask`` the gradient of ``values`` is computed on its blocks (and
    elements) only, zero elsewhere. The result is channels-last in memory.
    """
    kernel_size, stride, padding, dilation = (
        _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    )
    n, k = int(shape[0]), int(shape[1])
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] * kernel_size[0] * kernel_size[1] != k:
        raise ValueError(
            f"x must have shape [B, C, H, W] with C*kh*kw = {k} (the weight matrix's columns, "
            f"kernel_size={tuple(kernel_size)}), got {tuple(x.shape)}"
        )
    if x.dtype != torch.float32 or values.dtype != torch.float32 or x.device.type != "cpu" or values.device.type != "cpu":
        raise TypeError(
            f"sparse_conv2d runs the TVM kernels: x and values must be float32 CPU tensors, got x {x.dtype} on "
            f"{x.device} and values {values.dtype} on {values.device}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {stride}, {dilation}, {padding}")
    padded = tuple(size + 2 * p for size, p in zip(x.shape[2:], padding))
    span = tuple(d * (kk - 1) + 1 for kk, d in zip(kernel_size, dilation))
    if padded[0] < span[0] or padded[1] < span[1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} is smaller, padded to {padded}, than the dilated kernel {span}: "
            "the convolution has no output"
        )
    blocks, grad_index, elements = grad_mask if grad_mask is not None else (None, [], None)
    return _sparse_conv2d(
        x, values, list(index), n, k, bias, kernel_size, stride, padding, dilation, blocks, list(grad_index), elements
    )
