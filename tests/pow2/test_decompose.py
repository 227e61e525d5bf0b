"""edgesparse.pow2.decompose: the structured row pattern, the reported SQNR, determinism,
edge cases, and that C·B beats plain power-of-two rounding of W at equal sparsity.

Oracles: block scores and the plain rounding are computed here, in float64, by their
definitions; the SQNR from the reconstruction and the weight."""

import math

import pytest
import torch

from edgesparse.pow2 import decompose

GROUP = 8


def trained_like(n, k, gen):
    """A weight with a decaying spectrum and a few strong input columns, as trained layers have."""
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    s = 0.5 * torch.arange(1, min(n, k) + 1, dtype=torch.float64) ** -0.7
    w = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    w[:, torch.randperm(k, generator=gen)[: k // 10]] *= 4
    return w.float()


def sqnr(w, approx):
    w, approx = w.double(), approx.double()
    return 10 * math.log10(float(w.pow(2).sum()) / float((w - approx).pow(2).sum()))


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


def kept_pairs(W):
    return set(zip(W.index.row_indices.tolist(), W.index.col_indices.tolist()))


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.7])
def test_beats_plain_power_of_two_rounding_at_equal_sparsity(sparsity, gen):
    w = trained_like(24, 60, gen)
    result = decompose(w, sparsity, group=GROUP, chunk_rows=5)
    keep = expected_keep(w, GROUP, sparsity)
    assert kept_pairs(result.weight) == keep
    assert result.sqnr_db == pytest.approx(sqnr(w, result.weight.to_dense()), abs=1e-9)
    baseline = sqnr(w, plain_pow2(w, keep, GROUP, 5))
    assert result.sqnr_db > baseline, f"C·B {result.sqnr_db:.2f} dB <= plain rounding {baseline:.2f} dB"
    assert decompose(w, sparsity, group=GROUP, chunk_rows=5, iterations=0).sqnr_db == pytest.approx(baseline, abs=1e-4)


def test_is_deterministic_and_leaves_the_weight_alone(gen):
    w = trained_like(20, 33, gen)
    before = w.clone()
    a = decompose(w, 0.4, group=GROUP, chunk_rows=4)
    b = decompose(w, 0.4, group=GROUP, chunk_rows=4)
    assert torch.equal(a.weight.codes, b.weight.codes) and torch.equal(a.weight.basis, b.weight.basis)
    assert torch.equal(w, before)


def test_conv_weight_is_3cin_by_3_per_filter_in_groups_of_64_channels(gen):
    conv = torch.randn(16, 100, 3, 3, generator=gen) * 0.1
    result = decompose(conv, 0.3, group=GROUP)
    W = result.weight
    assert W.shape == (16, 900) and W.block_cols == 300 and W.n_chunks == 2  # 192 rows = 64 channels
    assert W.to_dense().reshape(16, 100, 3, 3).shape == conv.shape
    assert result.sqnr_db == pytest.approx(sqnr(conv.reshape(16, -1), W.to_dense()), abs=1e-9)


def test_sparsity_0_and_1(gen):
    w = trained_like(9, 10, gen)  # ragged: 9 rows in groups of 8, 10 columns in rows of 3
    full = decompose(w, 0.0, group=GROUP, chunk_rows=2)
    assert full.weight.row_sparsity == 0.0 and full.sqnr_db > 15
    empty = decompose(w, 1.0, group=GROUP, chunk_rows=2)
    assert empty.weight.nnz_blocks == 0 and torch.equal(empty.weight.to_dense(), torch.zeros(9, 10))
    assert empty.sqnr_db == pytest.approx(0.0)


@pytest.mark.parametrize("weight, kwargs, error, match", [
    (torch.zeros(2, 3, 4), {}, ValueError, "weight must be a Linear weight"),
    (torch.zeros(4, 6, dtype=torch.int32), {}, TypeError, "floating point"),
    (torch.full((4, 6), float("nan")), {}, ValueError, "finite"),
    (torch.zeros(4, 6), {"sparsity": 1.5}, ValueError, "sparsity must be a number in"),
    (torch.zeros(4, 6), {"group": 0}, ValueError, "group must be a positive int"),
    (torch.zeros(4, 6), {"iterations": -1}, ValueError, "iterations"),
    (torch.zeros(4, 6), {"exp_range": (-20, 5)}, ValueError, "exp_range"),
])
def test_bad_arguments(weight, kwargs, error, match):
    with pytest.raises(error, match=match):
        decompose(weight, **kwargs)
