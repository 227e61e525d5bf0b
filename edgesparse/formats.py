"""Block-sparse (BSR) weight container.

A :class:`BSR` is a matrix of logical shape ``(N, K)`` cut into blocks of shape
``(bn, bk)``. Any N and K are allowed: the grid is padded up to whole blocks
internally (``padded_shape``), the padding is kept at zero, and every public
method speaks in the logical shape.

Stored arrays (all on the same device; indices are int32, which every kernel
backend indexes with directly):

``values``        [nnzb, bn, bk]  the kept blocks, in row-major block order
``row_offsets``   [NB + 1]        blocks of block-row i are values[row_offsets[i]:row_offsets[i+1]]
``col_indices``   [nnzb]          block-column of each block
``row_indices``   [nnzb]          block-row of each block (for kernels that walk blocks, not rows)
``col_offsets``   [KB + 1]        the transposed index: blocks of block-column j are
``col_order``     [nnzb]            values[col_order[col_offsets[j]:col_offsets[j+1]]]
``col_order_rows``[nnzb]          block-row of those blocks, i.e. row_indices[col_order]

The transposed index is what grad-input (``dy @ W``) walks: one output tile per
block-column, with no atomics and no transposed copy of the values.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["BSR", "BSRIndex", "pad_columns"]

_INDEX_DTYPE = torch.int32
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_block(block) -> Tuple[int, int]:
    if _is_int(block):
        block = (block, block)
    if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(_is_int(b) for b in block):
        raise TypeError(f"block must be an int or a pair of ints (bn, bk), got {block!r}")
    bn, bk = block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got block={tuple(block)}")
    return int(bn), int(bk)


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float in [0, 1], got {density!r}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return float(density)


def _check_weight(w, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, _FLOAT_DTYPES))}), got {w.dtype}")
    if w.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {w.layout}")
    return w


def _pad_to_blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = -n % bn, -k % bk
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [M, w] zero-padded on the right to [M, width] (t itself when w == width)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] != width else t


def _blocks_of(w_padded: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """View a padded (Np, Kp) matrix as [NB, KB, bn, bk] blocks."""
    np_, kp = w_padded.shape
    return w_padded.reshape(np_ // bn, bn, kp // bk, bk).permute(0, 2, 1, 3)


def _row_indices(row_offsets: torch.Tensor) -> torch.Tensor:
    nb = row_offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(nb, device=row_offsets.device, dtype=_INDEX_DTYPE), row_offsets.diff())


def _complete_index(row_offsets, col_indices, row_indices, kb: int) -> "BSRIndex":
    """The full index of a validated (row_offsets, col_indices) pattern: adds the
    transposed index that grad-input walks."""
    nb, nnzb, device = row_offsets.numel() - 1, col_indices.numel(), col_indices.device
    # Transposed index: stable sort by column keeps rows ascending inside a column.
    order = torch.sort(col_indices.long() * max(nb, 1) + row_indices.long(), stable=True).indices
    col_counts = torch.bincount(col_indices.long(), minlength=kb) if nnzb else torch.zeros(kb, dtype=torch.long, device=device)
    col_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), col_counts.cumsum(0)])
    return BSRIndex(
        row_offsets, col_indices, row_indices, col_offsets.to(_INDEX_DTYPE),
        order.to(_INDEX_DTYPE), row_indices[order].contiguous(),
    )


class BSRIndex(NamedTuple):
    """The int32 index tensors of a BSR (see the module docstring), without its values.

    Lets a pattern travel as plain tensors — module buffers, custom-op arguments — and
    be put back together with :meth:`BSR.from_index` without re-validating or re-sorting.
    """

    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    col_offsets: torch.Tensor
    col_order: torch.Tensor
    col_order_rows: torch.Tensor

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor) -> "BSRIndex":
        """The index of the blocks where ``block_mask`` [NB, KB] (bool) is True, in the
        row-major order that :meth:`BSR.from_mask` stores their values in."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 2:
            got = f"{block_mask.dtype} of shape {tuple(block_mask.shape)}" if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise TypeError(f"block_mask must be a 2-D bool tensor [block rows, block columns], got {got}")
        row_offsets = torch.cat([block_mask.new_zeros(1, dtype=torch.long), block_mask.sum(1).cumsum(0)]).to(_INDEX_DTYPE)
        col_indices = block_mask.nonzero()[:, 1].to(_INDEX_DTYPE).contiguous()
        return _complete_index(row_offsets, col_indices, _row_indices(row_offsets), block_mask.shape[1])


class BSR:
    """A block-sparse matrix; see the module docstring for the stored arrays."""

    def __init__(
        self,
        values: torch.Tensor,
        col_indices: torch.Tensor,
        row_offsets: torch.Tensor,
        shape: Sequence[int],
    ):
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(
                f"values must be a 3-D tensor [nnz_blocks, bn, bk], got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be floating point, got {values.dtype}")
        if len(shape) != 2 or any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must be two non-negative ints (N, K), got {tuple(shape)}")
        n, k = int(shape[0]), int(shape[1])
        bn, bk = int(values.shape[1]), int(values.shape[2])
        if bn <= 0 or bk <= 0:
            raise ValueError(f"block sizes must be positive, got block=({bn}, {bk})")
        nb, kb = math.ceil(n / bn), math.ceil(k / bk)
        device = values.device
        row_offsets = torch.as_tensor(row_offsets, device=device).to(_INDEX_DTYPE).contiguous()
        col_indices = torch.as_tensor(col_indices, device=device).to(_INDEX_DTYPE).contiguous()
        nnzb = values.shape[0]
        if row_offsets.shape != (nb + 1,):
            raise ValueError(f"row_offsets must have {nb + 1} entries (block rows + 1), got {tuple(row_offsets.shape)}")
        if col_indices.shape != (nnzb,):
            raise ValueError(f"col_indices must have one entry per block ({nnzb}), got {tuple(col_indices.shape)}")
        counts = row_offsets.diff()
        if int(row_offsets[0]) != 0 or int(row_offsets[-1]) != nnzb or bool((counts < 0).any()):
            raise ValueError("row_offsets must start at 0, be non-decreasing and end at the number of blocks")
        if nnzb and (int(col_indices.min()) < 0 or int(col_indices.max()) >= kb):
            raise ValueError(f"col_indices must lie in [0, {kb}) for K={k} and bk={bk}")
        row_indices = _row_indices(row_offsets)
        if nnzb > 1:
            # Within a row, columns must be strictly increasing (sorted, no duplicates).
            same_row = row_indices[1:] == row_indices[:-1]
            if bool((same_row & (col_indices[1:] <= col_indices[:-1])).any()):
                raise ValueError("col_indices must be strictly increasing within each block row")

        self.values = values.contiguous()
        self.shape = (n, k)
        self.block = (bn, bk)
        self.__dict__.update(_complete_index(row_offsets, col_indices, row_indices, kb)._asdict())

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mask(cls, w: torch.Tensor, block_mask: torch.Tensor, block=None) -> "BSR":
        """Keep the blocks of ``w`` where ``block_mask`` [NB, KB] is True.

        ``block`` may be omitted when it follows from the shapes: bn = ceil(N / NB).
        """
        w = _check_weight(w)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(
                f"block_mask must be a bool tensor [N/bn, K/bk], got "
                f"{block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__}"
            )
        if block_mask.dim() != 2:
            raise ValueError(f"block_mask must be 2-D [N/bn, K/bk] (block rows, block columns), got shape {tuple(block_mask.shape)}")
        if block is None:
            n, k = w.shape
            nb, kb = block_mask.shape
            if nb == 0 or kb == 0:
                raise ValueError("block cannot be inferred from an empty block_mask; pass block=(bn, bk)")
            block = (math.ceil(n / nb), math.ceil(k / kb))
        bn, bk = _check_block(block)
        wp = _pad_to_blocks(w, bn, bk)
        nb, kb = wp.shape[0] // bn, wp.shape[1] // bk
        if tuple(block_mask.shape) != (nb, kb):
            raise ValueError(
                f"block_mask must have shape {(nb, kb)} for w of shape {tuple(w.shape)} and block {(bn, bk)}, "
                f"got {tuple(block_mask.shape)}"
            )
        mask = block_mask.to(device=w.device)
        blocks = _blocks_of(wp, bn, bk)
        values = blocks[mask].contiguous()  # boolean indexing walks row-major: sorted rows, then columns
        row_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=w.device), mask.sum(1).cumsum(0)])
        col_indices = mask.nonzero()[:, 1]
        return cls(values, col_indices, row_offsets, w.shape)

    @classmethod
    def from_dense(cls, w: torch.Tensor, block, density: Optional[float] = None) -> "BSR":
        """Build from a dense matrix.

        Without ``density`` every block holding a nonzero (or a NaN) is kept. With
        ``density=d`` the d * blocks (halves rounded up) blocks of largest L2 norm are kept
        (ties go to the earlier block in row-major order, so the result is deterministic).
        """
        w = _check_weight(w)
        bn, bk = _check_block(block)
        blocks = _blocks_of(_pad_to_blocks(w, bn, bk), bn, bk)
        if density is None:
            mask = (blocks != 0).any(dim=-1).any(dim=-1)
        else:
            density = _check_density(density)
            norms = blocks.float().pow(2).sum(dim=(-1, -2)).flatten()
            keep = math.floor(density * norms.numel() + 0.5)  # halves round up
            mask = torch.zeros_like(norms, dtype=torch.bool)
            if keep:
                # Stable descending sort: equal norms keep row-major order.
                order = torch.sort(norms.nan_to_num(nan=float("inf")), descending=True, stable=True).indices
                mask[order[:keep]] = True
            mask = mask.reshape(blocks.shape[:2])
        return cls.from_mask(w, mask, (bn, bk))

    @classmethod
    def from_index(cls, values: torch.Tensor, index: BSRIndex, shape: Sequence[int]) -> "BSR":
        """A BSR over ``index`` (taken from a validated BSR's ``.index``) with these ``values``.

        Nothing is checked or copied: this is the per-call path of the autograd ops, which
        get the pattern back as tensors a module built once through the validating
        constructors.
        """
        out = object.__new__(cls)
        out.__dict__.update(index._asdict())
        out.values = values.contiguous()
        out.shape = (int(shape[0]), int(shape[1]))
        out.block = (int(values.shape[1]), int(values.shape[2]))
        return out

    @property
    def index(self) -> BSRIndex:
        return BSRIndex(*(getattr(self, name) for name in BSRIndex._fields))

    def with_values(self, values: torch.Tensor) -> "BSR":
        """A BSR with this pattern and new ``values`` (same shape); indices are shared, not copied."""
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"values must have shape {tuple(self.values.shape)}, got {tuple(getattr(values, 'shape', ()))}")
        if values.device != self.values.device:
            raise ValueError(f"values must be on {self.values.device}, got {values.device}")
        out = object.__new__(BSR)
        out.__dict__.update(self.__dict__)
        out.values = values.contiguous()
        return out

    def zero_padding_(self, values: torch.Tensor) -> torch.Tensor:
        """Zero, in place, the entries of ``values`` (laid out like self.values) that lie
        past the logical shape, in the last block row and the last block column."""
        (n, k), (bn, bk) = self.shape, self.block
        if n % bn:
            values[self.row_indices == self.block_rows - 1, n % bn :, :] = 0
        if k % bk:
            values[self.col_indices == self.block_cols - 1, :, k % bk :] = 0
        return values

    # ------------------------------------------------------------------ properties
    @property
    def padded_shape(self) -> Tuple[int, int]:
        return (self.block_rows * self.block[0], self.block_cols * self.block[1])

    @property
    def block_rows(self) -> int:
        return self.row_offsets.numel() - 1

    @property
    def block_cols(self) -> int:
        return self.col_offsets.numel() - 1

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        total = self.block_rows * self.block_cols
        return self.nnz_blocks / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def block_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.block_rows, self.block_cols, dtype=torch.bool, device=self.device)
        mask[self.row_indices.long(), self.col_indices.long()] = True
        return mask

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        nb, kb = self.block_rows, self.block_cols
        bn, bk = self.block
        blocks = torch.zeros(nb, kb, bn, bk, dtype=self.dtype, device=self.device)
        blocks[self.row_indices.long(), self.col_indices.long()] = self.values
        dense = blocks.permute(0, 2, 1, 3).reshape(nb * bn, kb * bk)
        return dense[: self.shape[0], : self.shape[1]].contiguous()

    def to(self, *args, **kwargs) -> "BSR":
        """Like ``Tensor.to``: moves the values (dtype and/or device) and the indices (device only)."""
        values = self.values.to(*args, **kwargs)
        if values is self.values:
            return self
        out = object.__new__(BSR)
        out.__dict__.update(self.__dict__)
        out.values = values.contiguous()
        if values.device != self.values.device:
            for name in BSRIndex._fields:
                setattr(out, name, getattr(self, name).to(values.device))
        return out

    def __repr__(self) -> str:
        return (
            f"BSR(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz_blocks}, "
            f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})"
        )
