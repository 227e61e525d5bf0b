"""Trainable power-of-two layers (SmartDeal): ``Pow2Linear`` and ``Pow2Conv2d``.

A layer holds W = C·B as :class:`~edgesparse.pow2.Pow2Weight` does — C's codes packed
three to an int16 ``words`` entry on a fixed (group x 3) row pattern, and the ``basis``
B — and its forward and both gradients run on the pow2 products, which read the packed
codes, never a dense W. They are ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` traces them as single nodes (eager calls skip the
custom-op layers, see ``_custom_ops.py``).

Parameters: ``basis`` [NB, G, 3, 3, group] and ``bias`` train by ordinary SGD; ``coef``
[nnz_blocks, 3, group] holds C's decoded values, the straight-through handle of C: the
forward reads the codes, and the gradient of C·B with respect to C lands in
``coef.grad``. C is then updated in one of SmartDeal's two ways:

- re-quantize: let the optimizer step ``coef`` too, then call :meth:`requantize_` (or
  :func:`requantize_` on a model): coef becomes pow2(coef) and the codes follow;
- bucket switch: leave ``coef`` out of the optimizer and call :meth:`bucket_switch_` after
  each backward: every entry counts the sign of its descent direction, ``rate`` a step,
  and moves its exponent by one (up: away from zero) when the count reaches ±1.

Either way the pattern (which C rows exist) never changes; single entries may become
zero (below 2^e_min) and grow back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..formats import BSRIndex
from ..kernels import dispatch
from ..pow2 import ops as pow2_ops
from ..pow2.decompose import decompose
from ..pow2.format import DEFAULT_CHUNK_ROWS, DEFAULT_EXP_RANGE, DEFAULT_GROUP, Pow2Weight, check_exp_range, decode, encode, pack, unpack
from ._custom_ops import SparseOp
from .modules import _im2col, _supported_conv

__all__ = ["Pow2Conv2d", "Pow2Linear", "Pow2Scheme", "bucket_switch_", "pow2_linear", "requantize_"]


def _weight(words, basis, index, n, k, chunk_rows, e_min, e_max) -> Pow2Weight:
    return Pow2Weight.from_index(words, basis, BSRIndex(*index), (n, k), chunk_rows, (e_min, e_max))


def _on(backend: Optional[str]):
    return dispatch.use_backend(backend) if backend is not None else contextlib.nullcontext()


def _pow2_linear_impl(
    x: Tensor, coef: Tensor, words: Tensor, basis: Tensor, index: List[Tensor],
    n: int, k: int, chunk_rows: int, e_min: int, e_max: int, bias: Optional[Tensor],
) -> Tensor:
    # coef is not read: it is the straight-through handle that receives C's gradient.
    return pow2_ops.pow2_linear(x, _weight(words, basis, index, n, k, chunk_rows, e_min, e_max), bias)


def _pow2_linear_fake(x, coef, words, basis, index, n, k, chunk_rows, e_min, e_max, bias):
    return x.new_empty((*x.shape[:-1], n))


_pow2_linear = SparseOp("edgesparse::pow2_linear", _pow2_linear_impl, _pow2_linear_fake)


# As in functional.py, the backward products run on the backend the forward was asked for.
def _grad_input_impl(
    dy: Tensor, words: Tensor, basis: Tensor, index: List[Tensor],
    n: int, k: int, chunk_rows: int, e_min: int, e_max: int, backend: Optional[str],
) -> Tensor:
    with _on(backend):
        return pow2_ops.pow2_linear_grad_input(dy, _weight(words, basis, index, n, k, chunk_rows, e_min, e_max))


def _grad_input_fake(dy, words, basis, index, n, k, chunk_rows, e_min, e_max, backend):
    return dy.new_empty((*dy.shape[:-1], k))


_pow2_linear_grad_input = SparseOp("edgesparse::pow2_linear_grad_input", _grad_input_impl, _grad_input_fake)


def _grad_weight_impl(
    dy: Tensor, x: Tensor, words: Tensor, basis: Tensor, index: List[Tensor],
    n: int, k: int, chunk_rows: int, e_min: int, e_max: int, backend: Optional[str],
) -> Tuple[Tensor, Tensor]:
    with _on(backend):
        dC, dB = pow2_ops.pow2_linear_grad_weight(dy, x, _weight(words, basis, index, n, k, chunk_rows, e_min, e_max))
    return dC, dB


def _grad_weight_fake(dy, x, words, basis, index, n, k, chunk_rows, e_min, e_max, backend):
    return dy.new_empty(words.shape[0], 3, words.shape[1]), torch.empty_like(basis)


_pow2_linear_grad_weight = SparseOp("edgesparse::pow2_linear_grad_weight", _grad_weight_impl, _grad_weight_fake)


def _setup_context(ctx, inputs, output):
    x, _coef, words, basis, index, n, k, chunk_rows, e_min, e_max, _bias = inputs
    needs_weight = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    ctx.save_for_backward(x if needs_weight else None, words, basis, *index)
    ctx.args = (n, k, chunk_rows, e_min, e_max)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, dy, eager: bool):
    x, words, basis, *index = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx = dcoef = dbasis = dbias = None
    if needs[0]:
        dx = _pow2_linear_grad_input.run(eager, dy, words, basis, index, *ctx.args, ctx.backend)
    if needs[1] or needs[3]:
        dC, dB = _pow2_linear_grad_weight.run(eager, dy, x, words, basis, index, *ctx.args, ctx.backend)
        dcoef = dC if needs[1] else None
        dbasis = dB if needs[3] else None
    if needs[10]:
        dbias = dy.reshape(-1, ctx.args[0]).sum(0)
    return dx, dcoef, None, dbasis, [None] * len(index), None, None, None, None, None, dbias


_pow2_linear.register_autograd(_backward, _setup_context)


def pow2_linear(x: Tensor, coef: Tensor, W: Pow2Weight, basis: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W.T + bias`` for W = C·B with C read from ``W.words`` and B = ``basis``;
    differentiable in x, basis, bias, and (straight-through) in ``coef``, C's decoded values."""
    e_min, e_max = W.exp_range
    return _pow2_linear(x, coef, W.words, basis, list(W.index), W.shape[0], W.shape[1], W.chunk_rows, e_min, e_max, bias)


class _Pow2Layer(nn.Module):
    """What Pow2Linear and Pow2Conv2d share: parameters, buffers, C's two update rules."""

    def _adopt(self, weight: Tensor, bias: Optional[Tensor], sparsity, group, chunk_rows, exp_range, iterations) -> None:
        result = decompose(weight, sparsity, group=group, chunk_rows=chunk_rows,
                           exp_range=check_exp_range(exp_range), iterations=iterations)
        W = result.weight
        self.sqnr_db: float = result.sqnr_db
        self.shape: Tuple[int, int] = W.shape
        self.chunk_rows, self.exp_range, self.sparsity = W.chunk_rows, W.exp_range, float(sparsity)
        self.coef = nn.Parameter(W.coefficients(), requires_grad=weight.requires_grad)
        self.basis = nn.Parameter(W.basis, requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.register_buffer("words", W.words)
        self.register_buffer("switch_count", torch.zeros_like(self.coef, dtype=torch.float32))
        for name, tensor in W.index._asdict().items():
            self.register_buffer(name, tensor)

    @property
    def index(self) -> BSRIndex:
        return BSRIndex(*[getattr(self, name) for name in BSRIndex._fields])

    @property
    def codes(self) -> Tensor:
        """C's codes unpacked, int8 [nnz_blocks, 3, group] (a new tensor: write ``words``)."""
        return unpack(self.words)

    def weight_pow2(self) -> Pow2Weight:
        """The layer's weight (codes, basis and pattern shared, not copied)."""
        return Pow2Weight.from_index(self.words, self.basis, self.index, self.shape, self.chunk_rows, self.exp_range)

    def _product(self, x: Tensor) -> Tensor:
        return pow2_linear(x, self.coef, self.weight_pow2(), self.basis, self.bias)

    @torch.no_grad()
    def requantize_(self) -> None:
        """C = pow2(coef) (after an optimizer step on coef): codes and coef follow."""
        codes = encode(self.coef.float(), self.exp_range)
        self.words.copy_(pack(codes))
        self.coef.copy_(decode(codes, self.exp_range, self.coef.dtype))

    @torch.no_grad()
    def bucket_switch_(self, rate: float = 0.1) -> None:
        """One bucket-switch update of C from ``coef.grad`` (see the module docstring)."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must lie in (0, 1], got {rate}")
        grad = self.coef.grad
        if grad is None:
            raise RuntimeError("bucket_switch_ needs coef.grad: run a backward through the layer first")
        e_min, e_max = self.exp_range
        codes = unpack(self.words).to(torch.int32)
        field, negative = codes & 15, codes < 0
        sign = torch.where(negative, -1.0, 1.0)
        descent = -torch.sign(grad.float())
        # Nonzero entries count "grow the magnitude"; zero entries the sign to appear with.
        self.switch_count += rate * torch.where(field > 0, descent * sign, descent)
        up, down = self.switch_count >= 1.0 - 1e-6, self.switch_count <= -1.0 + 1e-6
        born = (field == 0) & (up | down)
        field = torch.where((field > 0) & up, (field + 1).clamp(max=e_max - e_min + 1), field)
        field = torch.where((field > 0) & down, field - 1, field)  # f = 0: the entry becomes zero
        field = torch.where(born, torch.ones_like(field), field)
        negative = torch.where(born, down, negative) & (field > 0)
        self.switch_count[up | down] = 0.0
        codes = (field | torch.where(negative, -128, 0)).to(torch.int8)
        self.words.copy_(pack(codes))
        self.coef.copy_(decode(codes, self.exp_range, self.coef.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints saved before the codes were packed hold them one per int8 ("codes").
        old = state_dict.pop(prefix + "codes", None)
        if old is not None and prefix + "words" not in state_dict:
            state_dict[prefix + "words"] = pack(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pow2_repr(self) -> str:
        return (
            f"row_sparsity={self.sparsity:.2f}, chunk_rows={self.chunk_rows}, exp_range={self.exp_range}, "
            f"sqnr={self.sqnr_db:.1f} dB, bias={self.bias is not None}"
        )


class Pow2Linear(_Pow2Layer):
    """``nn.Linear`` with W = C·B, C power-of-two on a structured row pattern (see
    :mod:`edgesparse.pow2.format`); build one with :meth:`from_dense`."""

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, sparsity: float = 0.4, *, group: int = DEFAULT_GROUP,
        chunk_rows: int = DEFAULT_CHUNK_ROWS, exp_range=DEFAULT_EXP_RANGE, iterations: int = 50,
    ) -> "Pow2Linear":
        """Decompose ``linear``'s weight (:func:`edgesparse.pow2.decompose`, pruning the
        ``sparsity`` fraction of C's row blocks); the bias is copied, ``linear`` untouched."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls()
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module._adopt(linear.weight, linear.bias, sparsity, group, chunk_rows, exp_range, iterations)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self._product(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._pow2_repr()}"


class Pow2Conv2d(_Pow2Layer):
    """``nn.Conv2d`` (groups=1, zero padding) with its weight [C_out, C_in·kh·kw] as
    W = C·B; for 3x3 kernels each filter is SmartDeal's (3·C_in) x 3 matrix and the
    default chunks of 192 rows are its groups of 64 input channels. Forward unfolds the
    input (im2col) and runs the pow2 product, as SparseConv2d does."""

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, sparsity: float = 0.4, *, group: int = DEFAULT_GROUP,
        chunk_rows: int = DEFAULT_CHUNK_ROWS, exp_range=DEFAULT_EXP_RANGE, iterations: int = 50,
    ) -> "Pow2Conv2d":
        conv = _supported_conv(conv)
        module = cls()
        module.in_channels, module.out_channels = conv.in_channels, conv.out_channels
        module.kernel_size, module.stride, module.dilation = conv.kernel_size, conv.stride, conv.dilation
        module.padding = (0, 0) if conv.padding == "valid" else conv.padding
        module._adopt(conv.weight, conv.bias, sparsity, group, chunk_rows, exp_range, iterations)
        return module

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [B, {self.in_channels}, H, W] (in_channels={self.in_channels}), got {tuple(x.shape)}")
        rows, (out_h, out_w) = _im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self._product(rows)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self._pow2_repr()}"
        )


def requantize_(model: nn.Module) -> None:
    """:meth:`~_Pow2Layer.requantize_` on every pow2 layer of ``model``."""
    for module in model.modules():
        if isinstance(module, _Pow2Layer):
            module.requantize_()


def bucket_switch_(model: nn.Module, rate: float = 0.1) -> None:
    """:meth:`~_Pow2Layer.bucket_switch_` on every pow2 layer of ``model`` that has a coef gradient."""
    for module in model.modules():
        if isinstance(module, _Pow2Layer) and module.coef.grad is not None:
            module.bucket_switch_(rate)


@dataclass(frozen=True)
class Pow2Scheme:
    """A ``sparsify`` scheme: replace the layer by Pow2Linear / Pow2Conv2d.from_dense(...)."""

    sparsity: float = 0.4
    exp_range: Tuple[int, int] = DEFAULT_EXP_RANGE
    group: int = DEFAULT_GROUP
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    iterations: int = 50

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity <= 1:
            raise ValueError(f"Pow2Scheme.sparsity must be a number in [0, 1], got {self.sparsity!r}")
        object.__setattr__(self, "exp_range", check_exp_range(self.exp_range))
        for name, least in (("group", 1), ("chunk_rows", 1), ("iterations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Pow2Scheme.{name} must be an int >= {least}, got {value!r}")

    def build(self, module: nn.Module) -> nn.Module:
        layer = Pow2Conv2d if isinstance(module, nn.Conv2d) else Pow2Linear
        return layer.from_dense(module, self.sparsity, group=self.group, chunk_rows=self.chunk_rows,
                                exp_range=self.exp_range, iterations=self.iterations)
