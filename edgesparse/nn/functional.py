"""The autograd bridge: the three block-sparse products as ``torch.library`` custom ops.

The ops take plain tensors — the values ``[nnzb, bn, bk]``, the int32 index tensors of
:class:`~edgesparse.formats.BSRIndex` as one ``Tensor[]`` argument, and the logical
shape ``(N, K)`` as two ints — never a :class:`BSR` object, so ``torch.compile`` sees
each op as one opaque node with a fake implementation and traces a training step
without a graph break. The real implementations put a BSR view back together over the
same tensors (:meth:`BSR.from_index`: no checks, no copies, no sorting; the index was
built and validated once, by the module that owns it) and call the dispatching
products of :mod:`edgesparse.ops`, which check the operands. Eager calls run the same
implementations and formula through a plain autograd.Function instead, without the
custom-op layers (:mod:`._custom_ops`: a fifth of a training step).

The autograd formula of ``edgesparse::bsr_linear`` writes each backward as another
sparse product, and runs only those whose input asks for a gradient:

- d/dx      = ``bsr_linear_grad_input(dy, W)``
- d/dvalues = ``bsr_linear_grad_weight(dy, x, W).values`` (W's own pattern; the dense
  N x K gradient is never formed)
- d/dbias   = dy summed over every leading dimension

With a :class:`WeightGradMask` (SparCL's gradient masking), d/dvalues is computed on
the mask's blocks only — a grad-weight product over the sub-pattern of those blocks —
and is zero on the others, which cost nothing.

The backward products are not differentiable themselves (no double backward).
"""

from __future__ import annotations

import contextlib
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..formats import BSR, BSRIndex
from ..kernels import dispatch
from ._custom_ops import SparseOp

__all__ = ["WeightGradMask", "sparse_linear"]


def _weight(values: Tensor, index: Sequence[Tensor], n: int, k: int) -> BSR:
    return BSR.from_index(values, BSRIndex(*index), (n, k))


def _on(backend: Optional[str]):
    """Run on ``backend`` when the forward had one requested, else let dispatch choose."""
    return dispatch.use_backend(backend) if backend is not None else contextlib.nullcontext()


class WeightGradMask(NamedTuple):
    """Which part of the weight gradient to compute: the kept ``blocks`` (sorted int64
    positions in ``values``), their sub-pattern ``index`` (a :class:`BSRIndex` of the same
    shape and block holding just those blocks, in the same order), and optionally an
    element mask ``elements`` [len(blocks), bn, bk] (same dtype as values, 0 or 1) for
    element-granular masking inside them."""

    blocks: Tensor
    index: BSRIndex
    elements: Optional[Tensor] = None


def _bsr_linear_impl(
    x: Tensor, values: Tensor, index: List[Tensor], n: int, k: int, bias: Optional[Tensor],
    grad_blocks: Optional[Tensor], grad_index: List[Tensor], grad_elements: Optional[Tensor],
) -> Tensor:
    return ops.bsr_linear(x, _weight(values, index, n, k), bias)


def _bsr_linear_fake(x, values, index, n, k, bias, grad_blocks, grad_index, grad_elements):
    return x.new_empty((*x.shape[:-1], n))


_bsr_linear = SparseOp("edgesparse::bsr_linear", _bsr_linear_impl, _bsr_linear_fake)


# The backward products take the backend the forward was asked to run on (None: automatic
# choice). Autograd runs a CUDA graph's backward on its own device threads, which do not
# see the caller's use_backend() context, so reading it there would silently switch
# backends between forward and backward.
def _grad_input_impl(dy: Tensor, values: Tensor, index: List[Tensor], n: int, k: int, backend: Optional[str]) -> Tensor:
    with _on(backend):
        return ops.bsr_linear_grad_input(dy, _weight(values, index, n, k))


def _grad_input_fake(dy, values, index, n, k, backend):
    return dy.new_empty((*dy.shape[:-1], k))


_bsr_linear_grad_input = SparseOp("edgesparse::bsr_linear_grad_input", _grad_input_impl, _grad_input_fake)


def _grad_weight_impl(
    dy: Tensor, x: Tensor, values: Tensor, index: List[Tensor], n: int, k: int, backend: Optional[str]
) -> Tensor:
    with _on(backend):
        return ops.bsr_linear_grad_weight(dy, x, _weight(values, index, n, k)).values


def _grad_weight_fake(dy, x, values, index, n, k, backend):
    return torch.empty_like(values)


_bsr_linear_grad_weight = SparseOp("edgesparse::bsr_linear_grad_weight", _grad_weight_impl, _grad_weight_fake)


def masked_weight_grad(grad_weight, values, index, grad_blocks, grad_index, grad_elements) -> Tensor:
    """``grad_weight(values, index)`` (a grad-weight product on a pattern), or with a
    gradient mask (``grad_blocks`` not None, see :class:`WeightGradMask`) the product on
    the mask's sub-pattern only, times its element mask, scattered into zeros."""
    if grad_blocks is None:
        return grad_weight(values, index)
    kept = grad_weight(values.index_select(0, grad_blocks), grad_index)
    if grad_elements is not None:
        kept = kept * grad_elements
    return torch.zeros_like(values).index_copy_(0, grad_blocks, kept)


def _setup_context(ctx, inputs, output):
    x, values, index, n, k, _bias, grad_blocks, grad_index, grad_elements = inputs
    # x is kept only for the weight gradient: a frozen layer does not hold its input alive.
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, grad_blocks, grad_elements, *index, *grad_index)
    ctx.n, ctx.k, ctx.index_len = n, k, len(index)
    # Under torch.compile this runs once, while the graph is traced, so a compiled
    # backward keeps the backend requested at compile time.
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, dy, eager: bool):
    x, values, grad_blocks, grad_elements, *indices = ctx.saved_tensors
    index, grad_index = indices[: ctx.index_len], indices[ctx.index_len :]
    needs_x, needs_values, *_, needs_bias = ctx.needs_input_grad[:6]
    dx = dvalues = dbias = None
    if needs_x:
        dx = _bsr_linear_grad_input.run(eager, dy, values, index, ctx.n, ctx.k, ctx.backend)
    if needs_values:
        dvalues = masked_weight_grad(
            lambda v, i: _bsr_linear_grad_weight.run(eager, dy, x, v, i, ctx.n, ctx.k, ctx.backend),
            values, index, grad_blocks, grad_index, grad_elements,
        )
    if needs_bias:
        dbias = dy.reshape(-1, ctx.n).sum(0)
    # A Tensor[] argument takes a list of (no) gradients, one per tensor.
    return dx, dvalues, [None] * len(index), None, None, dbias, None, [None] * len(grad_index), None


_bsr_linear.register_autograd(_backward, _setup_context)


def sparse_linear(
    x: Tensor,
    values: Tensor,
    index: BSRIndex,
    shape: Sequence[int],
    bias: Optional[Tensor] = None,
    grad_mask: Optional[WeightGradMask] = None,
) -> Tensor:
    """``x @ W.T + bias`` for the block-sparse W with these ``values`` [nnzb, bn, bk] on the
    pattern ``index`` (a :class:`BSRIndex`, e.g. ``W.index`` of a BSR) and logical
    ``shape`` (N, K); x of shape [..., K], result [..., N].

    Differentiable in x, values and bias, with every gradient computed by a sparse
    product; ``torch.compile`` traces it without a graph break. With ``grad_mask`` the
    gradient of ``values`` is computed on its blocks (and elements) only, zero elsewhere.
    """
    if grad_mask is None:
        return _bsr_linear(x, values, list(index), int(shape[0]), int(shape[1]), bias, None, [], None)
    blocks, grad_index, elements = grad_mask
    return _bsr_linear(x, values, list(index), int(shape[0]), int(shape[1]), bias, blocks, list(grad_index), elements)
