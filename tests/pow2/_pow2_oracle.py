"""Independent helpers of the pow2 tests: random valid weights built by hand and their
float64 dense reconstruction by loops over blocks (never Pow2Weight.to_dense); the rows
that pruning keeps and plain power-of-two rounding, by their definitions."""

from __future__ import annotations

import math

import torch

from edgesparse.pow2 import Pow2Weight


def code_value(code: int, e_min: int) -> float:
    """A code's value by its definition: bits 0-3 f, bit 7 the sign."""
    f = code & 15
    if f == 0:
        return 0.0
    return (-1.0 if code < 0 else 1.0) * math.ldexp(1.0, e_min + f - 1)


def word_code_value(word: int, i: int, e_min: int) -> float:
    """Code i of a packed int16 word by its definition: bits 5i..5i+3 f, bit 5i+4 the sign."""
    five_bits = (word >> (5 * i)) & 31
    f = five_bits & 15
    if f == 0:
        return 0.0
    return (-1.0 if five_bits & 16 else 1.0) * math.ldexp(1.0, e_min + f - 1)


def random_codes(shape, levels: int, gen: torch.Generator, zero_fraction: float = 0.2) -> torch.Tensor:
    f = torch.randint(1, levels + 1, shape, generator=gen)
    f[torch.rand(shape, generator=gen) < zero_fraction] = 0
    negative = (torch.rand(shape, generator=gen) < 0.5) & (f > 0)
    return (f - 128 * negative).to(torch.int8)


def random_pow2_weight(shape, group, chunk_rows, mask, gen, exp_range=(-7, 5), basis_scale=0.5, device="cpu"):
    """A Pow2Weight on block mask [NB, R] with random codes and basis."""
    n, k = shape
    nb, r = mask.shape
    assert nb == math.ceil(n / group) and r == math.ceil(k / 3)
    nnz = int(mask.sum())
    codes = random_codes((nnz, 3, group), exp_range[1] - exp_range[0] + 1, gen)
    basis = torch.randn(nb, math.ceil(r / chunk_rows), 3, 3, group, generator=gen) * basis_scale
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    col_indices = mask.nonzero()[:, 1]
    W = Pow2Weight(codes, basis, row_offsets, col_indices, shape, chunk_rows, exp_range)
    return W.to(device)


def dense_oracle(W: Pow2Weight, requires_grad: bool = False):
    """(W64 [N, K], C64 [NB*group, R, 3], B64 [NB*group, G, 3, 3]): W rebuilt in float64 by a
    loop over the kept blocks; C64 and B64 are leaves when ``requires_grad`` (autograd then
    gives the oracle's dC and dB)."""
    n, k = W.shape
    group, e_min = W.group, W.exp_range[0]
    nb, r = W.block_rows, W.block_cols
    rows = W.index.row_indices.cpu().tolist()
    cols = W.index.col_indices.cpu().tolist()
    words = W.words.cpu()
    C = torch.zeros(nb * group, r, 3, dtype=torch.float64)
    for b, (f, rr) in enumerate(zip(rows, cols)):
        for i in range(3):
            for p in range(group):
                C[f * group + p, rr, i] = word_code_value(int(words[b, p]), i, e_min)
    B = W.basis.detach().cpu().double().permute(0, 4, 1, 2, 3).reshape(nb * group, -1, 3, 3).clone()
    if requires_grad:
        C.requires_grad_()
        B.requires_grad_()
    chunk = torch.arange(r) // W.chunk_rows
    dense = torch.einsum("nri,nrij->nrj", C, B[:, chunk]).reshape(nb * group, 3 * r)
    return dense[:n, :k], C, B


def blocks_of_C(C_grad: torch.Tensor, W: Pow2Weight) -> torch.Tensor:
    """[nnzb, 3, group] laid out like the unpacked codes, from a [NB*group, R, 3] tensor."""
    group = W.group
    out = []
    for f, rr in zip(W.index.row_indices.tolist(), W.index.col_indices.tolist()):
        out.append(C_grad[f * group : (f + 1) * group, rr, :].T)
    return torch.stack(out) if out else torch.zeros(0, 3, group, dtype=C_grad.dtype)


def basis_layout(B: torch.Tensor, W: Pow2Weight) -> torch.Tensor:
    """[NB, G, 3, 3, group] from [NB*group, G, 3, 3]."""
    return B.reshape(W.block_rows, W.group, *B.shape[1:]).permute(0, 2, 3, 4, 1)


def expected_keep(w, group, sparsity):
    """Kept (block row, C row) pairs: L1 of W's rows of 3 summed over `group` output rows."""
    n, k = w.shape
    r = math.ceil(k / 3)
    p = torch.zeros(math.ceil(n / group) * group, 3 * r, dtype=torch.float64)
    p[:n, :k] = w.double()
    scores = [(float(p[f * group:(f + 1) * group, 3 * j:3 * j + 3].abs().sum()), f * r + j)
              for f in range(p.shape[0] // group) for j in range(r)]
    pruned = math.floor(sparsity * len(scores) + 0.5)
    dropped = {i for _, i in sorted(scores)[:pruned]}
    return {(i // r, i % r) for i in range(len(scores)) if i not in dropped}


def plain_pow2(w, keep, group, chunk_rows, exp_range=(-7, 5)):
    """s·pow2(W / s) per (output row, chunk), s = the chunk's max |w|, on the same pattern."""
    n, k = w.shape
    out = torch.zeros(n, k, dtype=torch.float64)
    for row in range(n):
        for start in range(0, math.ceil(k / 3), chunk_rows):
            cols = slice(3 * start, min(k, 3 * (start + chunk_rows)))
            chunk = w[row, cols].double()
            s = float(chunk.abs().max()) or 1.0
            for c in range(cols.start, cols.stop):
                if (row // group, c // 3) not in keep:
                    continue
                v = float(w[row, c]) / s
                if abs(v) < 2.0 ** (exp_range[0] - 1) or v == 0:
                    continue
                lo = math.floor(math.log2(abs(v)))
                e = lo + 1 if abs(v) >= 1.5 * 2.0**lo else lo
                out[row, c] = math.copysign(2.0 ** min(max(e, exp_range[0]), exp_range[1]), v) * s
    return out
