"""``decompose(weight)``: SmartDeal's post-hoc W ≈ C·B with power-of-two C.

For each output row n and chunk g (see :mod:`edgesparse.pow2.format`), with W[n, g] the
chunk's rows as a [chunk_rows, 3] matrix:

1. Structured pruning: C's row r is scored by the L1 norm of W's row r (C = W when
   B = I), summed over the ``group`` output rows of a block; the ``sparsity`` fraction
   of (group x 3) blocks with the lowest scores is pruned (on ties, the earlier block).
2. Start: B = s·I with s = max|W[n, g]|, so that C = pow2(W / s) has its largest entry
   at 1 = 2^0. That balances C and B (B's entries near the weights', C's near 1), which
   training needs: with C's largest entry at 2^4 instead, B was 16x smaller and its
   gradient (C·dW) 16x larger, so its relative SGD step grew 256x; a small MLP trained
   at lr 0.05 went non-finite within its first steps.
   Levels 2^-7..2^0 then cover 2.5 decades below the chunk's largest weight; the
   levels above are headroom for the refits below and for training.
   ``iterations=0`` stops here: plain power-of-two rounding of W with a per-(row, chunk)
   scale, the baseline the decomposition is measured against.
3. Alternate, up to ``iterations`` times: B = argmin ||C·B - W|| (least squares, pinv for
   rank-deficient C), C = pow2(W·B⁺) on the kept rows (thresholded: |c| below
   2^(e_min - 1) becomes 0), until C stops changing. The pair with the smallest error
   seen is returned, so the result is never worse than the first least-squares B.

Everything runs in float64 on the CPU and is deterministic; the SQNR returned is that
of the stored result (basis rounded to the weight's dtype) against the weight:
10·log10(||W||² / ||W - C·B||²), pruned entries counting as error.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional, Tuple

import torch

from .format import DEFAULT_CHUNK_ROWS, DEFAULT_EXP_RANGE, DEFAULT_GROUP, Pow2Weight, check_exp_range, encode, quantize

__all__ = ["Decomposition", "decompose", "rounding_kept_energy", "sqnr_db"]


class Decomposition(NamedTuple):
    weight: Pow2Weight
    sqnr_db: float
    iterations: int  # ALS rounds run (0 for plain rounding)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(||reference||² / ||reference - approx||²) in float64 (inf when equal)."""
    ref, err = reference.double(), reference.double() - approx.double()
    signal, noise = float(ref.pow(2).sum()), float(err.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _as_matrix(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise ValueError(f"weight must be a Linear weight [N, K] or a conv weight [C_out, C_in, kh, kw], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite")
    return weight.detach().reshape(weight.shape[0], -1)


def _check_layout(group, chunk_rows) -> None:
    for name, value in (("group", group), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _layout(w: torch.Tensor, group: int, chunk_rows: int) -> Tuple[torch.Tensor, int]:
    """(W as float64 [NB·group, G, chunk_rows, 3], zero-padded to whole blocks and
    chunks; R, the rows of 3 that hold weights)."""
    n, k = w.shape
    r = math.ceil(k / 3)
    nb, g = math.ceil(n / group), math.ceil(r / chunk_rows)
    padded = torch.zeros(nb * group, g * chunk_rows * 3, dtype=torch.float64)
    padded[:n, :k] = w.cpu().double()
    return padded.reshape(nb * group, g, chunk_rows, 3), r


def _rounding_scale(W: torch.Tensor) -> torch.Tensor:
    """[.., 1, 1]: each (row, chunk)'s largest |weight| (1 where all are 0), so that
    plain rounding's C = pow2(W / scale) has its largest entry at 2^0 (see step 2)."""
    peak = W.abs().amax(dim=(-1, -2), keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def _pruning_order(W: torch.Tensor, group: int, r: int) -> torch.Tensor:
    """C's (group x 3) row blocks, as indices into [NB·R], in the order pruning removes
    them: by the L1 norm of W's rows, smallest first (on ties, the earlier block)."""
    rows = W.reshape(W.shape[0], -1, 3)[:, :r]
    scores = rows.abs().sum(-1).reshape(-1, group, r).sum(1).flatten()
    return torch.sort(scores, stable=True).indices


def _prune_mask(W: torch.Tensor, group: int, r: int, sparsity: float) -> torch.Tensor:
    """[NB, R] bool, True where a (group x 3) block of C is kept."""
    order = _pruning_order(W, group, r)
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[order[:math.floor(sparsity * order.numel() + 0.5)]] = False
    return keep.reshape(-1, r)


def _fit_basis(C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Least-squares B [.., 3, 3] for C·B ≈ W, batched over the leading dims.

    C⁺ = (CᵀC)⁺Cᵀ for any rank, and the 3x3 pseudo-inverse is cheap: pinv of the
    [rows, 3] chunks themselves made a 2048x2048 layer take 82 s instead of 9 s.
    """
    Ct = C.transpose(-1, -2)
    return torch.linalg.pinv(Ct @ C, hermitian=True) @ (Ct @ W)


def decompose(
    weight: torch.Tensor,
    sparsity: float = 0.4,
    *,
    group: int = DEFAULT_GROUP,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    exp_range=DEFAULT_EXP_RANGE,
    iterations: int = 50,
    threshold: Optional[float] = None,
    progress: bool = False,
) -> Decomposition:
    """W ≈ C·B for a Linear weight [N, K] or a conv weight [C_out, C_in, kh, kw] (seen as
    [C_out, C_in·kh·kw]); returns (Pow2Weight, SQNR in dB, ALS rounds run).

    ``sparsity``: fraction of C's (group x 3) row blocks to prune; ``iterations``: ALS
    rounds at most (0: plain power-of-two rounding); ``threshold``: |c| below it becomes 0
    (default 2^(e_min - 1)); ``progress`` prints one line per round to stderr.
    """
    w = _as_matrix(weight)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1] (the fraction of C's row blocks to prune), got {sparsity!r}")
    sparsity = float(sparsity)
    exp_range = check_exp_range(exp_range)
    _check_layout(group, chunk_rows)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    n, k = w.shape
    W, r = _layout(w, group, chunk_rows)
    nb, g = W.shape[0] // group, W.shape[1]
    keep = _prune_mask(W, group, r, sparsity)  # [NB, R]
    row_mask = torch.zeros(nb, g * chunk_rows, dtype=torch.bool)
    row_mask[:, :r] = keep
    row_mask = row_mask.repeat_interleave(group, 0).reshape(nb * group, g, chunk_rows, 1).double()

    def pow2(c):
        return quantize(c, exp_range, threshold) * row_mask

    def error(C, B):
        return float((C @ B - W).pow(2).sum())

    scale = _rounding_scale(W)
    B = scale * torch.eye(3, dtype=torch.float64)
    C = pow2(W / scale)
    best = (error(C, B), C, B)
    done = 0
    for done in range(1, iterations + 1):
        B = _fit_basis(C, W)
        err = error(C, B)
        if err < best[0]:
            best = (err, C, B)
        if progress:
            print(f"decompose: round {done}/{iterations}, SQNR {sqnr_db(W, C @ B):.2f} dB", file=sys.stderr, flush=True)
        C_next = pow2(W @ torch.linalg.pinv(B))
        if torch.equal(C_next, C):
            break
        C = C_next
    _, C, B = best

    # Kernel layout: codes [nnzb, 3, group] of the kept blocks in row-major block order,
    # basis [NB, G, 3, 3, group].
    C_blocks = C.reshape(nb, group, g * chunk_rows, 3)[:, :, :r].permute(0, 2, 3, 1)  # [NB, R, 3, group]
    codes = encode(C_blocks[keep], exp_range, threshold=0.0).contiguous()  # C is already quantized
    basis = B.reshape(nb, group, g, 3, 3).permute(0, 2, 3, 4, 1).to(weight.dtype).contiguous()
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    col_indices = keep.nonzero()[:, 1]
    result = Pow2Weight(codes, basis, row_offsets, col_indices, (n, k), chunk_rows, exp_range).to(weight.device)
    return Decomposition(result, sqnr_db(w, result.to_dense()), done)


def rounding_kept_energy(
    weight: torch.Tensor, *, group: int = DEFAULT_GROUP, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    exp_range=DEFAULT_EXP_RANGE, importance: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float64 [blocks + 1]: entry j is ||W||² - ||W - Ŵ||² for plain power-of-two
    rounding (``decompose(..., iterations=0)``) keeping j of C's (group x 3) row blocks,
    the j that ``decompose`` keeps; blocks = ceil(N / group)·ceil(K / 3). With
    ``importance`` (>= 0, the weight's shape) every square is weighted by it:
    sum(importance·(W² - (W - Ŵ)²)).

    One rounding serves every sparsity: the scale of a (row, chunk) is read before
    pruning, so each block's error does not depend on which others are kept.

    It is a lower bound on what ``decompose`` keeps at any ``iterations`` (up to B's
    rounding to the weight's dtype): the alternation returns the best (C, B) it saw,
    and plain rounding is the first it sees. The mapper uses it as power-of-two's
    retained energy (``edgesparse.pruning_maps``).
    """
    w = _as_matrix(weight)
    _check_layout(group, chunk_rows)
    W, r = _layout(w, group, chunk_rows)
    approx = _rounding_scale(W) * quantize(W / _rounding_scale(W), check_exp_range(exp_range))
    gain = W.square() - (W - approx).square()
    if importance is not None:
        if importance.shape != weight.shape:
            raise ValueError(f"importance must have the weight's shape {tuple(weight.shape)}, got {tuple(importance.shape)}")
        gain = gain * _layout(importance.detach().reshape(w.shape), group, chunk_rows)[0]
    gain = gain.reshape(W.shape[0], -1, 3)[:, :r].sum(-1)  # [NB·group, R]
    gain = gain.reshape(-1, group, r).sum(1).flatten()
    kept_last_first = gain[_pruning_order(W, group, r)].flip(0)
    return torch.cat([torch.zeros(1, dtype=torch.float64), kept_last_first.cumsum(0)])
