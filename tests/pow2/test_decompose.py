"""edgesparse.pow2.decompose: the structured row pattern, the reported SQNR, determinism,
edge cases, and that C·B beats plain power-of-two rounding of W at equal sparsity.

Oracles: block scores and the plain rounding are computed here, in float64, by their
definitions; the SQNR from the reconstruction and the weight."""

import math

import pytest
import torch

from edgesparse.pow2 import decompose, rounding_kept_energy
from tests.pow2._pow2_oracle import expected_keep, plain_pow2

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


def test_rounding_kept_energy_against_plain_rounding_by_definition(gen):
    """Entry j: the energy kept by plain rounding on the pattern that keeps j blocks."""
    w = trained_like(20, 50, gen)  # ragged: 3 groups of 8 rows, 17 rows of 3 in chunks of 5
    curve = rounding_kept_energy(w, group=GROUP, chunk_rows=5)
    blocks = 3 * 17
    assert curve.shape == (blocks + 1,) and curve.dtype == torch.float64
    total = float(w.double().pow(2).sum())
    for kept in (0, 1, 10, 26, 50, blocks):
        sparsity = (blocks - kept) / blocks
        approx = plain_pow2(w, expected_keep(w, GROUP, sparsity), GROUP, 5)
        assert float(curve[kept]) == pytest.approx(total - float((w.double() - approx).pow(2).sum()), rel=1e-12, abs=1e-12)
        # A lower bound on what the alternation keeps (float32 B: a relative 1e-6 of slack).
        als = decompose(w, sparsity, group=GROUP, chunk_rows=5, iterations=20).weight.to_dense().double()
        assert float(curve[kept]) <= (total - float((w.double() - als).pow(2).sum())) + 1e-6 * total


def test_rounding_kept_energy_by_hand():
    # Group 1, one row of 3 per chunk (its own scale, the row's largest |w|). Kept in
    # the order of their L1 norms: [1 1 1] (3, exact: 3 kept), [1 .75 0] (1.75; .75
    # rounds to 1, an error of .0625: 1 + .5625 - .0625 kept), [.5 .5 .5] (1.5, exact).
    w = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 0.75, 0.0]])
    curve = rounding_kept_energy(w, group=1, chunk_rows=1)
    assert curve.tolist() == pytest.approx([0.0, 3.0, 4.5, 5.25])
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        rounding_kept_energy(w, chunk_rows=0)
