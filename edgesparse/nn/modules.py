"""Drop-in block-sparse layers."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..formats import BSR, BSRIndex, _check_block, pad_columns
from ..kernels import dispatch
from .conv_functional import sparse_conv2d
from .functional import WeightGradMask, sparse_linear

__all__ = ["SparseConv2d", "SparseLinear", "sparse_layers"]

_GRAD_MASK_GRANULARITIES = ("block", "element")
# The dense weight gradient is scored a slab of block rows at a time, each slab at most
# this many floats (16 MiB), so its peak stays far below the dense N x K gradient.
_DENSE_GRAD_SLAB_FLOATS = 1 << 22

# The pattern's canonical form, saved in the state_dict. The other index tensors are
# derived from it (and from the shape), so they are rebuilt on load rather than trusted.
_SAVED_INDEX = ("row_offsets", "col_indices")


class _BlockSparseLayer(nn.Module):
    """What the sparse layers share: a weight matrix of logical ``shape`` (N, K) whose kept
    (bn, bk) blocks are one parameter, ``values`` [nnz_blocks, bn, bk], so any torch
    optimizer keeps its state (momentum, Adam's moments) for the nonzeros only; the
    pattern in the int32 buffers of :class:`~edgesparse.formats.BSRIndex`, which move with
    ``.to()``; and a dense ``bias`` [N] or None.

    ``row_offsets`` / ``col_indices`` are saved in the state_dict, so loading one restores
    the pattern too (resizing ``values`` when the saved pattern keeps a different number
    of blocks). A subclass defines ``shape`` and ``_weight_desc`` (N and K in the layer's
    own terms, for error messages) and calls :meth:`_adopt` with a dense layer's weight,
    and its forward runs the product through :meth:`_sparse_product`.

    Dynamic sparsity: :meth:`set_pattern` swaps the pattern (RigL, SparCL's task-aware
    masking), :meth:`request_dense_grad_scores` scores the blocks of the dense weight
    gradient once (RigL's grow step), :meth:`mask_gradients` keeps only the largest
    weight gradients (SparCL's gradient masking).
    """

    @property
    def shape(self) -> Tuple[int, int]:
        raise NotImplementedError

    @property
    def _weight_desc(self) -> str:
        raise NotImplementedError

    def _adopt(self, weight: torch.Tensor, bias: Optional[torch.Tensor], block, density: Optional[float]) -> None:
        """Keep ``density`` of the blocks of ``weight`` (reshaped to ``shape``) with the largest
        L2 norm (None: every block holding a nonzero); values and bias are copies."""
        bn, bk = _check_block(block)
        n, k = self.shape
        if bn > n or bk > k:
            raise ValueError(
                f"block={(bn, bk)} is larger than the layer: a block must fit in the weight [{self._weight_desc}]"
            )
        self.block: Tuple[int, int] = (bn, bk)
        W = BSR.from_dense(weight.detach().reshape(self.shape), self.block, density)
        self.values = nn.Parameter(W.values, requires_grad=weight.requires_grad)
        self._set_index(W.index)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.dense_grad_scores: Optional[torch.Tensor] = None
        self._score_next_backward = False
        self._grad_masking: Optional[Tuple[float, int, str]] = None  # (fraction, refresh_every, granularity)
        self._grad_mask: Optional[WeightGradMask] = None  # cached between refreshes
        self._grad_mask_age = 0  # backward passes since the cached mask was chosen
        self._grad_mask_hook = None
        self._hooked_values: Optional[int] = None  # id() of the values tensor holding the hook

    def _set_index(self, index: BSRIndex) -> None:
        for name, tensor in index._asdict().items():
            self.register_buffer(name, tensor, persistent=name in _SAVED_INDEX)

    def _fill_dense(self, dense: nn.Module) -> nn.Module:
        """Copy the weight (pruned blocks as zeros) and bias into ``dense``, a new dense layer
        of the same shapes; returns it."""
        with torch.no_grad():
            dense.weight.copy_(self.weight_bsr().to_dense().reshape(dense.weight.shape))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    # ------------------------------------------------------------------ views
    @property
    def index(self) -> BSRIndex:
        return BSRIndex(*[getattr(self, name) for name in BSRIndex._fields])

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that are kept."""
        total = (self.row_offsets.numel() - 1) * (self.col_offsets.numel() - 1)
        return self.nnz_blocks / total

    def weight_bsr(self) -> BSR:
        """The weight matrix as a BSR whose values are this layer's ``values`` parameter (shared, not copied)."""
        return BSR.from_index(self.values, self.index, self.shape)

    def _sparse_repr(self) -> str:
        return f"block={self.block}, nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, bias={self.bias is not None}"

    @property
    def block_grid(self) -> Tuple[int, int]:
        """(block rows, block columns) of the weight's padded grid."""
        return (self.row_offsets.numel() - 1, self.col_offsets.numel() - 1)

    def block_mask(self) -> torch.Tensor:
        """bool [block rows, block columns]: True where a block is kept."""
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=self.values.device)
        mask[self.row_indices.long(), self.col_indices.long()] = True
        return mask

    # ------------------------------------------------------------------ forward
    def _sparse_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [..., K] -> rows @ W.T + bias [..., N], with the requested gradient masking
        and dense-gradient scoring wired into its backward."""
        y = sparse_linear(rows, self.values, self.index, self.shape, self.bias, self._forward_grad_mask())
        if self._score_next_backward and y.requires_grad:
            self._score_next_backward = False
            saved_rows = rows.detach()
            y.register_hook(lambda dy: self._score_dense_grad(dy, saved_rows))
        return y

    def _forward_grad_mask(self) -> Optional[WeightGradMask]:
        """The gradient mask this forward's backward applies (None: the full gradient,
        which is also what a mask refresh starts from); hooks the values on first use."""
        if self._grad_masking is None or not (torch.is_grad_enabled() and self.values.requires_grad):
            return None
        if self._hooked_values != id(self.values):  # first use, or a copy of the module
            self._grad_mask_hook = self.values.register_hook(self._on_values_grad)
            self._hooked_values = id(self.values)
        return self._grad_mask

    # ------------------------------------------------------------------ dynamic sparsity
    @torch.no_grad()
    def set_pattern(self, block_mask: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Keep the blocks where ``block_mask`` (bool [block rows, block columns], see
        :attr:`block_grid`) is True. Blocks kept before keep their values; grown blocks
        start at zero; dropped blocks are gone.

        ``optimizer``: one holding this layer's ``values``; its per-block state (momentum,
        Adam's moments) follows the surviving blocks and starts at zero for grown ones, so
        a grown block does not inherit a dropped block's momentum. The ``values``
        Parameter object stays the same (resized in place), so the optimizer keeps it.
        A cached gradient mask refers to the old blocks and is dropped.
        """
        grid = self.block_grid
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            got = block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise TypeError(f"block_mask must be a bool tensor of shape {grid} (block rows, block columns), got {got}")
        if tuple(block_mask.shape) != grid:
            raise ValueError(
                f"block_mask must have shape {grid} (this layer's block grid for {self._weight_desc}, "
                f"block={self.block}), got {tuple(block_mask.shape)}"
            )
        optimizer_state = self._optimizer_state(optimizer)
        block_mask = block_mask.to(self.values.device)
        # Where each new block was in the old values (-1: grown). Both orders are row-major.
        old_position = torch.full(grid, -1, dtype=torch.long, device=block_mask.device)
        old_position[self.block_mask()] = torch.arange(self.nnz_blocks, device=block_mask.device)
        source = old_position[block_mask]
        survives = source >= 0

        def carried_over(tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.new_zeros((source.numel(), *tensor.shape[1:]))
            out[survives] = tensor[source[survives]]
            return out

        for key, state in optimizer_state.items():
            if isinstance(state, torch.Tensor) and state.shape == self.values.shape:
                optimizer_state[key] = carried_over(state)
        grad = None if self.values.grad is None else carried_over(self.values.grad)
        self.values.data = carried_over(self.values.data)
        self.values.grad = grad
        self._set_index(BSRIndex.from_block_mask(block_mask))
        self._grad_mask = None

    def _optimizer_state(self, optimizer) -> dict:
        if optimizer is None:
            return {}
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if not any(p is self.values for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer does not hold this layer's values parameter; pass the optimizer that trains it")
        return optimizer.state[self.values]

    def request_dense_grad_scores(self) -> None:
        """Make the next backward pass through this layer also set :attr:`dense_grad_scores`:
        float [block rows, block columns], the L2 norm of every block of the *dense* weight
        gradient dL/dW, pruned blocks included (RigL grows the blocks scoring highest).

        One-shot: later backward passes do not pay for it. The dense gradient is formed a
        slab of block rows at a time and never kept whole.
        """
        self._score_next_backward = True
        self.dense_grad_scores = None

    @torch.no_grad()
    def _score_dense_grad(self, dy: torch.Tensor, rows: torch.Tensor) -> None:
        (n, k), (bn, bk) = self.shape, self.block
        nb, kb = self.block_grid
        dy2 = pad_columns(dy.reshape(-1, n), nb * bn)
        x2 = pad_columns(rows.reshape(-1, k), kb * bk)
        slab = max(1, _DENSE_GRAD_SLAB_FLOATS // (bn * kb * bk))
        scores = []
        for first in range(0, nb, slab):
            grad = dy2[:, first * bn : (first + slab) * bn].T @ x2  # [slab·bn, kb·bk]
            scores.append(grad.reshape(-1, bn, kb, bk).square().sum((1, 3)).sqrt())
        self.dense_grad_scores = torch.cat(scores) if scores else dy2.new_zeros(nb, kb)

    def mask_gradients(self, fraction: Optional[float], refresh_every: int = 30, granularity: str = "block") -> None:
        """SparCL's dynamic gradient masking: keep only the ``fraction`` of the weight
        gradient that is largest in magnitude — whole blocks by L2 norm
        (``granularity="block"``) or single entries (``"element"``) — and zero the rest.

        The mask is chosen from a full weight gradient every ``refresh_every`` backward
        passes and reused in between, when the gradient is computed only on the blocks
        the mask keeps: the others cost nothing. ``fraction=None`` turns masking off.
        """
        if fraction is None:
            self._grad_masking, self._grad_mask = None, None
            if self._grad_mask_hook is not None:
                self._grad_mask_hook.remove()
                self._grad_mask_hook, self._hooked_values = None, None
            return
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1] (the share of the weight gradient kept) or None, got {fraction!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int (backward passes between mask refreshes), got {refresh_every!r}")
        if granularity not in _GRAD_MASK_GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRAD_MASK_GRANULARITIES}, got {granularity!r}")
        self._grad_masking, self._grad_mask, self._grad_mask_age = (float(fraction), refresh_every, granularity), None, 0

    @property
    def gradient_mask(self) -> Optional[WeightGradMask]:
        """The cached gradient mask (None before the first refresh or when masking is off)."""
        return self._grad_mask

    @torch.no_grad()
    def _on_values_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._grad_masking is None:
            return grad
        fraction, refresh_every, granularity = self._grad_masking
        if self._grad_mask is None:  # a refresh: this gradient was computed on every block
            self._grad_mask = self._choose_grad_mask(grad, fraction, granularity)
            self._grad_mask_age = 0
            blocks, _, elements = self._grad_mask
            kept = torch.zeros_like(grad)
            kept[blocks] = grad[blocks] if elements is None else grad[blocks] * elements
            grad = kept
        self._grad_mask_age += 1
        if self._grad_mask_age >= refresh_every:
            self._grad_mask = None
        return grad

    def _choose_grad_mask(self, grad: torch.Tensor, fraction: float, granularity: str) -> WeightGradMask:
        nnzb = grad.shape[0]
        if granularity == "block":
            keep = torch.zeros(nnzb, dtype=torch.bool, device=grad.device)
            keep[grad.flatten(1).norm(dim=1).topk(min(nnzb, math.ceil(fraction * nnzb))).indices] = True
            elements = None
        else:
            # Padding entries hold zero gradient and rank last; the fraction is of the real entries.
            real = int(self.weight_bsr().zero_padding_(torch.ones_like(grad)).sum())
            chosen = grad.abs().flatten().topk(min(grad.numel(), math.ceil(fraction * real))).indices
            element_mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
            element_mask[chosen] = True
            element_mask = element_mask.view(grad.shape)
            keep = element_mask.flatten(1).any(1)
            elements = element_mask[keep].to(grad.dtype)
        sub_mask = torch.zeros(self.block_grid, dtype=torch.bool, device=grad.device)
        sub_mask[self.row_indices[keep].long(), self.col_indices[keep].long()] = True
        return WeightGradMask(keep.nonzero()[:, 0], BSRIndex.from_block_mask(sub_mask), elements)

    # ------------------------------------------------------------------ state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [prefix + name for name in ("values", *_SAVED_INDEX)]
        if all(key in state_dict for key in keys):
            self._load_pattern(*(state_dict[key] for key in keys), where=prefix.rstrip(".") or type(self).__name__)
        # The default loader then copies values, the saved index and bias into the
        # tensors that now have the saved shapes.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _load_pattern(self, values, row_offsets, col_indices, where: str) -> None:
        """Validate a saved pattern against this layer, then resize ``values`` and rebuild the
        index buffers for it. A pattern is state: a different one (other positions, other
        number of blocks) is adopted; one that contradicts this layer's shape or block raises."""
        bn, bk = self.block
        if not isinstance(values, torch.Tensor) or values.dim() != 3 or tuple(values.shape[1:]) != self.block:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(
                f"state_dict for {where}: values must have shape [nnz_blocks, {bn}, {bk}] "
                f"(this layer's block={self.block}), got {got}"
            )
        try:
            W = BSR(values.detach(), col_indices, row_offsets, self.shape)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"state_dict for {where} holds a pattern inconsistent with this layer "
                f"({self._weight_desc}, block={self.block}): {err}"
            ) from err
        W = W.to(self.values.device)
        if self.values.shape != values.shape:
            # Resized in place, so that the Parameter object (and references to it) survive;
            # a gradient of the old size would no longer match.
            self.values.data = self.values.new_empty(values.shape)
            self.values.grad = None
        self._set_index(W.index)
        self._grad_mask = None


class SparseLinear(_BlockSparseLayer):
    """``nn.Linear`` with a block-sparse weight: y = x @ W.T + bias, where W [out_features,
    in_features] keeps ``density`` of its (bn, bk) blocks. Forward and backward both run
    on the sparse products, and the weight gradient lives on the kept blocks only.

    Parameters, pattern buffers and state_dict are those of every sparse layer (see
    ``_BlockSparseLayer``): ``values`` [nnz_blocks, bn, bk], a dense bias, and the
    pattern saved as ``row_offsets`` / ``col_indices``.

    A new layer starts from ``nn.Linear``'s initialisation and keeps the blocks of
    largest L2 norm; :meth:`from_dense` does the same with an existing layer's weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block,
        density: float,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._adopt_linear(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), block, density)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block, density: Optional[float] = None) -> "SparseLinear":
        """A SparseLinear holding ``linear``'s weights on the ``density`` fraction of its
        blocks with the largest L2 norm (``density=None``: every block holding a nonzero).

        Values and bias are copies: ``linear`` itself is left untouched.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt_linear(linear, block, density)
        return module

    def _adopt_linear(self, linear: nn.Linear, block, density: Optional[float]) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._adopt(linear.weight, linear.bias, block, density)

    @property
    def shape(self) -> Tuple[int, int]:
        """The weight's logical shape (out_features, in_features)."""
        return (self.out_features, self.in_features)

    @property
    def _weight_desc(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sparse_product(x)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (pruned blocks as zeros); a copy."""
        return self._fill_dense(nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        ))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._sparse_repr()}"


class SparseConv2d(_BlockSparseLayer):
    """``nn.Conv2d`` (groups=1, zero padding) with a block-sparse weight. The weight
    [out_channels, in_channels, kh, kw] is seen as the matrix [out_channels,
    in_channels·kh·kw] (``weight.reshape(out_channels, -1)``) and blocked like
    SparseLinear's, with the same parameters, buffers and state_dict.

    On the TVM backend (float32 CPU tensors) forward and backward run the implicit-GEMM
    op :func:`~edgesparse.nn.conv_functional.sparse_conv2d`: the kernels read the rows
    of the unfolded input [B·L, in_channels·kh·kw] straight from the padded image
    through two index tables and never build them; the output is channels-last in
    memory. On the other backends forward unfolds the input (im2col) and runs
    :func:`~edgesparse.nn.sparse_linear` on the rows, the input gradient folded back by
    the im2col's own backward; so does the one forward whose backward scores the dense
    weight gradient (:meth:`request_dense_grad_scores`, which reads the rows). Either
    way the weight gradient is computed on the kept blocks only.

    Why the direct path on TVM (bench/conv_paths.py: 3x3 s1 p1, batch 32, 90% of the
    blocks pruned, forward + backward with the input gradient, speed-up over torch's
    dense conv in the same run, medians of 7; 2 cores shared with other jobs, load 6-9):
    256 ch 8x8, 32x32 blocks: im2col 0.74x, direct 2.00x; block-punched (8, 36): 0.73x,
    1.50x; 512 ch 4x4, 32x32: 1.63x, 3.55x; (8, 36): 1.16x, 2.47x (one thread: 0.76 /
    2.48, 0.61 / 1.60, 2.47 / 5.86, 2.10 / 3.68). The im2col copy and its as_strided
    backward cost as much as the three sparse products together.

    The matrix's columns run over (in_channel, ky, kx), kernel positions fastest, so the
    block ``(f, c·kh·kw)`` covers f filters × c whole input channels at every kernel
    position: the block-punched scheme (:meth:`block_punched`, f=8, c=4 by default).
    Any other block fits too, straddling channels when bk is not a multiple of kh·kw.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        block,
        density: float,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, device=device, dtype=dtype,
        )
        self._adopt_conv(_supported_conv(conv), block, density)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block, density: Optional[float] = None) -> "SparseConv2d":
        """A SparseConv2d holding ``conv``'s weights on the ``density`` fraction of the blocks
        of its weight matrix with the largest L2 norm (``density=None``: every block holding
        a nonzero). Values and bias are copies: ``conv`` itself is left untouched.
        """
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt_conv(_supported_conv(conv), block, density)
        return module

    @classmethod
    def block_punched(
        cls, conv: nn.Conv2d, filters: int = 8, channels: int = 4, density: Optional[float] = None
    ) -> "SparseConv2d":
        """:meth:`from_dense` with blocks of ``filters`` output channels × ``channels`` input
        channels over all kernel positions, i.e. ``block=(filters, channels·kh·kw)``."""
        kh, kw = _supported_conv(conv).kernel_size
        return cls.from_dense(conv, (filters, channels * kh * kw), density)

    def _adopt_conv(self, conv: nn.Conv2d, block, density: Optional[float]) -> None:
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding: Tuple[int, int] = (0, 0) if conv.padding == "valid" else conv.padding
        self._adopt(conv.weight, conv.bias, block, density)

    @property
    def shape(self) -> Tuple[int, int]:
        """The weight matrix's logical shape (out_channels, in_channels·kh·kw)."""
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels * kh * kw)

    @property
    def _weight_desc(self) -> str:
        kh, kw = self.kernel_size
        return f"out_channels={self.out_channels}, in_channels*kh*kw={self.in_channels}*{kh}*{kw}={self.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"x must have shape [B, C, H, W] (a batch of images, C = in_channels={self.in_channels}), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W] (in_channels={self.in_channels}), got {tuple(x.shape)}"
            )
        if self._runs_direct(x):
            return self._direct_product(x)
        rows, (out_h, out_w) = _im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self._sparse_product(rows)  # [B, L, out_channels]
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, out_h, out_w)

    def _runs_direct(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the implicit-GEMM op (:func:`sparse_conv2d`): when the
        TVM backend runs these tensors, except on the forward whose backward scores the
        dense weight gradient (:meth:`request_dense_grad_scores`), which reads the rows."""
        if self._score_next_backward or x.dtype != self.values.dtype or x.device != self.values.device:
            return False
        return _tvm_runs(self.values.device, self.values.dtype)

    def _direct_product(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(
            x, self.values, self.index, self.shape, self.bias, self.kernel_size, self.stride, self.padding,
            self.dilation, self._forward_grad_mask(),
        )

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (pruned blocks as zeros); a copy."""
        return self._fill_dense(nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, device=self.values.device, dtype=self.values.dtype,
        ))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self._sparse_repr()}"
        )


def sparse_layers(model: nn.Module) -> List[Tuple[str, _BlockSparseLayer]]:
    """(qualified name, layer) for every block-sparse layer in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _BlockSparseLayer)]


def _im2col(x: torch.Tensor, kernel_size, stride, padding, dilation) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """x [B, C, H, W] -> (rows [B, L, C·kh·kw], (out_h, out_w)): one row per output pixel,
    its columns in the order (C, ky, kx) of ``weight.reshape(out_channels, -1)``.

    Built as a strided view of the padded input (Tensor.unfold, then a step of
    ``dilation`` within each window) and copied once into row-major rows. It equals
    ``F.unfold(...).transpose(1, 2)`` exactly, and measured 2-3x faster forward + backward
    on 2 CPU cores (e.g. 32x256x8x8, 3x3: 150 ms against 290 ms): aten's im2col was the
    largest cost of a SparseConv2d step, and the rows it returns need a transposed copy too.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    height, width = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
    if height < span_h or width < span_w:
        raise ValueError(
            f"x of shape {tuple(x.shape)} is smaller, padded to {(height, width)}, than the dilated "
            f"kernel {(span_h, span_w)}: the convolution has no output"
        )
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, span_h, sh).unfold(3, span_w, sw)[..., ::dh, ::dw]
    batch, channels, out_h, out_w = windows.shape[:4]  # windows [B, C, out_h, out_w, kh, kw]
    rows = windows.permute(0, 2, 3, 1, 4, 5).reshape(batch, out_h * out_w, channels * kh * kw)
    return rows, (out_h, out_w)


def _tvm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the TVM backend runs the sparse products on tensors of this device and dtype."""
    return dispatch.select(device, dtype).__name__ == "edgesparse.kernels.tvm"


# torch.compile cannot trace the backend choice (a ContextVar): it is made once, when the
# graph is traced, as the backward's backend is (functional.py). This is what
# torch.compiler.assume_constant_result(_tvm_runs) does in torch 2.13, without the import
# of torch._dynamo that decorator makes: that loads triton, which `import edgesparse` must
# not (tests/test_lean_import.py); test_conv_direct's compiled step checks it still holds.
_tvm_runs._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _conv_unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why SparseConv2d cannot hold ``conv`` (an nn.Conv2d), or None when it can."""
    if conv.groups != 1:
        return f"groups={conv.groups}: SparseConv2d supports groups=1 only"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: SparseConv2d supports zero padding only"
    if conv.padding == "same":
        return "padding='same': SparseConv2d takes explicit padding (ints) or 'valid'"
    return None


def _supported_conv(conv) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    reason = _conv_unsupported(conv)
    if reason is not None:
        raise NotImplementedError(reason)
    return conv
