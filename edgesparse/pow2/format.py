"""SmartDeal's power-of-two weights, ``W = C·B``, stored the way the kernels read them.

Each output row n of a weight W [N, K] is zero-padded to 3·R columns (R = ceil(K / 3))
and seen as an R x 3 matrix; its rows are cut into chunks of ``chunk_rows`` rows, and
each chunk g has its own 3 x 3 basis B[n, g]:

    W[n, 3r : 3r + 3] = C[n, r, :] @ B[n, r // chunk_rows]            (C[n, r] a row of 3)

C's entries are 0 or ±2^e with e in ``exp_range`` (default [-7, 5]). A 3x3 conv weight
[C_out, C_in, 3, 3] flattened to [C_out, 9·C_in] is the same thing: row r of the
(3·C_in) x 3 filter matrix is (channel r // 3, ky = r % 3), its three columns kx, and
chunks of 192 rows are SmartDeal's groups of 64 input channels.

Structured sparsity: C's rows are kept or pruned for whole groups of ``group`` output
rows (32 by default), so the kept rows form a block pattern of (group x 3) blocks over
W's [N, 3R] grid — the :class:`~edgesparse.formats.BSR` index of exactly the fp32 BSR
that stores the same W (:meth:`Pow2Weight.to_bsr`), which is what the kernels are
measured against.

Stored arrays (the kernels vectorise over the ``group`` output rows of a block, so the
filter index is the fastest-varying one):

``words``  int16 [nnz_blocks, group]           words[b, p] = the 3 codes of C[row f*group + p, r, :]
                                               for block b at (block row f, block column r)
``basis``  float [NB, G, 3, 3, group]          basis[f, g, i, j, p] = B[f*group + p, g][i, j]
``index``  :class:`~edgesparse.formats.BSRIndex` of the (group, 3) block pattern

A code is 5 bits: f in bits 0-3 (0 means C = 0, else e = e_min + f - 1) and the sign in
bit 4; so 15 exponent levels at most. A C row's three codes share one 16-bit word, code
i in bits 5i..5i+4 (bit 15 is zero): 0.67 bytes per weight, where an int8 code per
weight (1 byte) alone would already be a quarter of the fp32 BSR's 4. Measured on the
issue's layer (2048 x 2048, half the rows kept, chunks of 192 rows): 0.210 of the fp32
BSR's bytes with words, 0.293 with int8 codes, the basis and index included. The word
also puts code i's sign 27 - 5i bits below bit 31 and its f 4 bits below that, so the
compiled kernels build the float32 bits with one shift left, one arithmetic shift right
and one mask (:mod:`edgesparse.kernels.tvm._pow2`): as few operations as int8 codes took.

Outside the kernels (encoding, training updates, tests) C's codes are handled one per
int8 — ``s << 7 | f``, negative exactly when the value is — and packed into words by
:func:`pack`; :attr:`Pow2Weight.codes` unpacks them. The value is built exactly,
``(-1)^s · 2^e``, by every backend (bit construction in the compiled kernels, ldexp here).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch

from ..formats import BSR, BSRIndex

__all__ = ["Pow2Weight", "DEFAULT_EXP_RANGE", "check_exp_range", "decode", "encode", "pack", "quantize", "unpack"]

DEFAULT_EXP_RANGE = (-7, 5)
MAX_LEVELS = 15  # f = 1..15 in the code's 4-bit field
SIGN_BIT = -128  # bit 7 of an int8
FIELD_MASK = 15
CODE_BITS = 5  # of a code in a word: f (4 bits) and the sign
DEFAULT_GROUP = 32
# Linear chunks as long as a conv's group of 64 input channels (64 x 3 rows).
DEFAULT_CHUNK_ROWS = 192


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_exp_range(exp_range) -> Tuple[int, int]:
    """(e_min, e_max) as ints, at most 15 levels, inside float32's normal exponents."""
    if not isinstance(exp_range, (tuple, list)) or len(exp_range) != 2 or not all(_is_int(e) for e in exp_range):
        raise TypeError(f"exp_range must be a pair of ints (e_min, e_max), got {exp_range!r}")
    e_min, e_max = int(exp_range[0]), int(exp_range[1])
    if e_min > e_max:
        raise ValueError(f"exp_range must have e_min <= e_max, got {(e_min, e_max)}")
    if e_max - e_min + 1 > MAX_LEVELS:
        raise ValueError(f"exp_range {(e_min, e_max)} spans {e_max - e_min + 1} exponents; a code holds at most {MAX_LEVELS}")
    if e_min < -126 or e_max > 127:
        raise ValueError(f"exp_range must lie in float32's normal exponents [-126, 127], got {(e_min, e_max)}")
    return e_min, e_max


def check_codes(codes: torch.Tensor, exp_range, name: str = "codes") -> torch.Tensor:
    """Raise unless ``codes`` is an int8 tensor of valid codes for ``exp_range``."""
    e_min, e_max = check_exp_range(exp_range)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{name} must be an int8 tensor of power-of-two codes, got {got}")
    field = codes & FIELD_MASK
    bad = ((codes & 0x70) != 0) | (field > e_max - e_min + 1) | (codes == SIGN_BIT)
    if bool(bad.any()):
        first = int(codes[bad].flatten()[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} invalid codes (first: {first}); a code is sign << 7 | f with "
            f"f = 0 for zero (sign 0) or 1..{e_max - e_min + 1} for the exponents {e_min}..{e_max}"
        )
    return codes


def decode(codes: torch.Tensor, exp_range=DEFAULT_EXP_RANGE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``(-1)^s · 2^e`` (0 for f = 0) of int8 codes; exact (ldexp of ±1)."""
    e_min, _ = check_exp_range(exp_range)
    field = (codes & FIELD_MASK).to(torch.int32)
    sign = 1.0 - 2.0 * (codes < 0).to(dtype)
    value = torch.ldexp(sign, (field + (e_min - 1)).to(dtype))
    return torch.where(field == 0, torch.zeros((), dtype=dtype, device=codes.device), value)


def encode(values: torch.Tensor, exp_range=DEFAULT_EXP_RANGE, threshold: Optional[float] = None) -> torch.Tensor:
    """int8 codes of the power-of-two quantization of ``values``.

    0 and |v| < threshold -> 0 (default threshold 2^(e_min - 1): half the smallest level, the
    nearer of 0 and 2^e_min; SmartDeal trains with 4e-3, about 2^-8 for e_min = -7).
    Otherwise e is the nearer of floor / ceil(log2 |v|) (|v| = 1.5·2^floor goes up),
    clamped to exp_range. Decided on frexp's exact mantissa, not on a rounded log2.
    """
    e_min, e_max = check_exp_range(exp_range)
    if threshold is None:
        threshold = math.ldexp(1.0, e_min - 1)
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite to be quantized to powers of two")
    mantissa, exponent = torch.frexp(values)  # |v| = |m|·2^exponent, |m| in [0.5, 1)
    e = exponent.to(torch.int32) - 1 + (mantissa.abs() >= 0.75).to(torch.int32)
    e = e.clamp(e_min, e_max)
    field = (e - e_min + 1).to(torch.int8)
    codes = field | (values < 0).to(torch.int8) * SIGN_BIT
    return torch.where((values.abs() < threshold) | (values == 0), torch.zeros_like(codes), codes)


def quantize(values: torch.Tensor, exp_range=DEFAULT_EXP_RANGE, threshold: Optional[float] = None) -> torch.Tensor:
    """decode(encode(values)): the nearest power of two in range, or 0, in values' dtype."""
    return decode(encode(values, exp_range, threshold), exp_range, values.dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int16 words [..., group] of int8 codes [..., 3, group]: code i of a C row in bits
    5i..5i+4 of its word, as f | sign << 4."""
    if codes.dim() < 2 or codes.shape[-2] != 3:
        raise ValueError(f"codes must have shape [..., 3, group] (a C row's 3 codes on dim -2), got {tuple(codes.shape)}")
    c = codes.to(torch.int32)
    five_bits = (c & FIELD_MASK) | (c < 0).to(torch.int32) << 4
    words = five_bits[..., 0, :] | five_bits[..., 1, :] << CODE_BITS | five_bits[..., 2, :] << (2 * CODE_BITS)
    return words.to(torch.int16)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., 3, group] of int16 words [..., group] (the inverse of :func:`pack`)."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int16:
        got = words.dtype if isinstance(words, torch.Tensor) else type(words).__name__
        raise TypeError(f"words must be an int16 tensor of packed codes, got {got}")
    w = words.to(torch.int32)
    five_bits = torch.stack([(w >> (CODE_BITS * i)) & 31 for i in range(3)], dim=-2)
    return ((five_bits & FIELD_MASK) | torch.where(five_bits >= 16, SIGN_BIT, 0)).to(torch.int8)


class Pow2Weight:
    """A weight W [N, K] = C·B with power-of-two C under a (group x 3) block pattern; see
    the module docstring for the layout. Build one with :func:`edgesparse.pow2.decompose`."""

    def __init__(
        self,
        codes: torch.Tensor,
        basis: torch.Tensor,
        row_offsets: torch.Tensor,
        col_indices: torch.Tensor,
        shape,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        exp_range=DEFAULT_EXP_RANGE,
    ):
        self.exp_range = check_exp_range(exp_range)
        if not _is_int(chunk_rows) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        check_codes(codes, self.exp_range)
        if codes.dim() != 3 or codes.shape[1] != 3:
            raise ValueError(f"codes must have shape [nnz_blocks, 3, group], got {tuple(codes.shape)}")
        group = codes.shape[2]
        if group <= 0:
            raise ValueError("codes must have a positive group size (last dimension)")
        # BSR validates the pattern and builds the transposed index; its values are the
        # blocks' shape only.
        pattern = BSR(torch.zeros(codes.shape[0], group, 3, device=codes.device), col_indices, row_offsets, shape)
        n_chunks = math.ceil(pattern.block_cols / chunk_rows)
        expected = (pattern.block_rows, n_chunks, 3, 3, group)
        if not isinstance(basis, torch.Tensor) or not basis.is_floating_point():
            raise TypeError(f"basis must be a floating tensor of shape {expected}, got {getattr(basis, 'dtype', type(basis).__name__)}")
        if tuple(basis.shape) != expected:
            raise ValueError(f"basis must have shape {expected} (block rows, chunks, 3, 3, group), got {tuple(basis.shape)}")
        if basis.device != codes.device:
            raise ValueError(f"basis is on {basis.device} but codes are on {codes.device}")
        self._set(pack(codes).contiguous(), basis.contiguous(), pattern.index, pattern.shape, int(chunk_rows))

    def _set(self, words, basis, index: BSRIndex, shape, chunk_rows: int) -> None:
        self.words, self.basis, self.index = words, basis, index
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk_rows = chunk_rows

    @classmethod
    def from_index(cls, words, basis, index: BSRIndex, shape, chunk_rows: int, exp_range) -> "Pow2Weight":
        """No checks, no copies: the per-call path of the autograd ops, over packed words
        a module built once through the validating constructor."""
        out = object.__new__(cls)
        out.exp_range = (int(exp_range[0]), int(exp_range[1]))
        out._set(words, basis, index, shape, int(chunk_rows))
        return out

    # ------------------------------------------------------------------ properties
    @property
    def codes(self) -> torch.Tensor:
        """C's kept codes unpacked, int8 [nnz_blocks, 3, group] (a new tensor)."""
        return unpack(self.words)

    @property
    def group(self) -> int:
        return self.words.shape[1]

    @property
    def block_rows(self) -> int:
        return self.index.row_offsets.numel() - 1

    @property
    def block_cols(self) -> int:
        """R = ceil(K / 3): rows of each output row's R x 3 matrix."""
        return self.index.col_offsets.numel() - 1

    @property
    def n_chunks(self) -> int:
        return self.basis.shape[1]

    @property
    def nnz_blocks(self) -> int:
        return self.words.shape[0]

    @property
    def row_sparsity(self) -> float:
        """Fraction of C's (group x 3) row blocks that are pruned."""
        total = self.block_rows * self.block_cols
        return 1.0 - self.nnz_blocks / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.basis.dtype

    @property
    def device(self) -> torch.device:
        return self.words.device

    # ------------------------------------------------------------------ values
    def coefficients(self) -> torch.Tensor:
        """C's kept blocks decoded, [nnz_blocks, 3, group], in the basis dtype."""
        return decode(self.codes, self.exp_range, self.dtype)

    def blocks(self) -> torch.Tensor:
        """W's kept blocks [nnz_blocks, group, 3] = C·B per output row, in the basis dtype."""
        rows = self.index.row_indices.long()
        chunks = self.index.col_indices.long() // self.chunk_rows
        basis = self.basis[rows, chunks]  # [nnzb, 3 (i), 3 (j), group]
        return torch.einsum("bip,bijp->bpj", self.coefficients(), basis)

    def to_bsr(self) -> BSR:
        """The fp32 (basis dtype) BSR holding the same W on the same (group x 3) pattern."""
        return BSR.from_index(self.blocks(), self.index, self.shape)

    def to_dense(self) -> torch.Tensor:
        """W [N, K] reconstructed."""
        return self.to_bsr().to_dense()

    def with_codes(self, codes: torch.Tensor) -> "Pow2Weight":
        """Same pattern and basis, new (validated) codes of the same shape."""
        expected = (self.nnz_blocks, 3, self.group)
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != expected:
            raise ValueError(f"codes must have shape {expected}, got {tuple(getattr(codes, 'shape', ()))}")
        check_codes(codes, self.exp_range)
        return Pow2Weight.from_index(pack(codes).contiguous(), self.basis, self.index, self.shape, self.chunk_rows, self.exp_range)

    # ------------------------------------------------------------------ size
    def nbytes(self) -> Dict[str, float]:
        """Bytes of what the forward product reads: code words + pattern index (row
        offsets and block columns) + basis, against fp32 dense and the fp32 BSR of this
        pattern."""
        index = self.index.row_offsets.numel() * 4 + self.index.col_indices.numel() * 4
        pow2 = self.words.numel() * self.words.element_size() + index + self.basis.numel() * self.basis.element_size()
        bsr = self.nnz_blocks * self.group * 3 * 4 + index
        dense = self.shape[0] * self.shape[1] * 4
        return {
            "pow2": pow2, "bsr_fp32": bsr, "dense_fp32": dense,
            "vs_bsr": pow2 / bsr if bsr else float("nan"), "vs_dense": pow2 / dense if dense else float("nan"),
        }

    def to(self, device) -> "Pow2Weight":
        device = torch.device(device)
        return Pow2Weight.from_index(
            self.words.to(device), self.basis.to(device), BSRIndex(*(t.to(device) for t in self.index)),
            self.shape, self.chunk_rows, self.exp_range,
        )

    def __repr__(self) -> str:
        return (
            f"Pow2Weight(shape={self.shape}, group={self.group}, chunk_rows={self.chunk_rows}, "
            f"exp_range={self.exp_range}, row_sparsity={self.row_sparsity:.3f}, dtype={self.dtype}, device={self.device})"
        )
