"""Drop-in block-sparse layers."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..formats import BSR, BSRIndex, _check_block
from .functional import sparse_linear

__all__ = ["SparseLinear"]

# The pattern's canonical form, saved in the state_dict. The other index tensors are
# derived from it (and from the shape), so they are rebuilt on load rather than trusted.
_SAVED_INDEX = ("row_offsets", "col_indices")


class SparseLinear(nn.Module):
    """``nn.Linear`` with a block-sparse weight: y = x @ W.T + bias, where W [out_features,
    in_features] keeps ``density`` of its (bn, bk) blocks. Forward and backward both run
    on the sparse products, and the weight gradient lives on the kept blocks only.

    The kept blocks are one parameter, ``values`` [nnz_blocks, bn, bk], so any torch
    optimizer keeps its state (momentum, Adam's moments) for the nonzeros only. The
    pattern lives in int32 buffers (those of :class:`~edgesparse.formats.BSRIndex`):
    it moves with ``.to()``, and ``row_offsets`` / ``col_indices`` are saved in the
    state_dict, so loading one restores the pattern too (resizing ``values`` when the
    saved pattern keeps a different number of blocks).

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
        self._adopt(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), block, density)

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
        module._adopt(linear, block, density)
        return module

    def _adopt(self, linear: nn.Linear, block, density: Optional[float]) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bn, bk = _check_block(block)
        if bn > self.out_features or bk > self.in_features:
            raise ValueError(
                f"block={(bn, bk)} is larger than the layer: a block must fit in the weight "
                f"[out_features={self.out_features}, in_features={self.in_features}]"
            )
        self.block: Tuple[int, int] = (bn, bk)
        W = BSR.from_dense(linear.weight.detach(), self.block, density)
        self.values = nn.Parameter(W.values, requires_grad=linear.weight.requires_grad)
        self._set_index(W.index)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _set_index(self, index: BSRIndex) -> None:
        for name, tensor in index._asdict().items():
            self.register_buffer(name, tensor, persistent=name in _SAVED_INDEX)

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> Tuple[int, int]:
        """The weight's logical shape (out_features, in_features)."""
        return (self.out_features, self.in_features)

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
        """The weight as a BSR whose values are this layer's ``values`` parameter (shared, not copied)."""
        return BSR.from_index(self.values, self.index, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.values, self.index, self.shape, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (pruned blocks as zeros); a copy."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight_bsr().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
            f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [prefix + name for name in ("values", *_SAVED_INDEX)]
        if all(key in state_dict for key in keys):
            self._load_pattern(*(state_dict[key] for key in keys), where=prefix.rstrip(".") or "SparseLinear")
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
                f"(out_features={self.out_features}, in_features={self.in_features}, block={self.block}): {err}"
            ) from err
        W = W.to(self.values.device)
        if self.values.shape != values.shape:
            # Resized in place, so that the Parameter object (and references to it) survive;
            # a gradient of the old size would no longer match.
            self.values.data = self.values.new_empty(values.shape)
            self.values.grad = None
        self._set_index(W.index)
