"""Block-mask edits and layer densities against hand-built cases."""

import pytest
import torch

from edgesparse.cl.masks import erk_densities, grow_blocks, keep_top_blocks, layer_densities, n_blocks_for


def test_keep_top_blocks_picks_the_highest_scores_inside_the_mask():
    mask = torch.tensor([[True, True, False], [True, False, True]])
    score = torch.tensor([[5.0, 1.0, 99.0], [3.0, 7.0, 2.0]])  # 99 and 7 lie outside the mask
    assert keep_top_blocks(mask, score, 2).tolist() == [[True, False, False], [True, False, False]]
    assert keep_top_blocks(mask, score, 10).tolist() == mask.tolist()


def test_grow_by_score_skips_mask_and_excluded():
    mask = torch.tensor([[True, False, False, False]])
    exclude = torch.tensor([[False, True, False, False]])
    score = torch.tensor([[9.0, 8.0, 1.0, 2.0]])
    assert grow_blocks(mask, exclude, 1, score=score).tolist() == [[True, False, False, True]]
    assert grow_blocks(mask, exclude, 5, score=score).sum() == 3  # only two candidates


def test_random_growth_is_seeded_and_outside():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0] = True
    exclude = torch.zeros_like(mask)
    exclude[1] = True
    a = grow_blocks(mask, exclude, 10, gen=torch.Generator().manual_seed(0))
    b = grow_blocks(mask, exclude, 10, gen=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.sum() == 18 and a[0].all() and not a[1].any()


def test_erk_by_hand():
    # Raw ERK scores (n_in + n_out) / (n_in * n_out): 200/10^4 = 0.02 and 1010/10^4 = 0.101.
    shapes = [(100, 100), (10, 1000)]
    d = erk_densities(shapes, 0.05)
    eps = 0.05 * 20000 / (0.02 * 10000 + 0.101 * 10000)
    assert d == pytest.approx([eps * 0.02, eps * 0.101])
    assert sum(di * 10000 for di in d) == pytest.approx(0.05 * 20000)


def test_erk_makes_a_layer_dense_when_it_would_exceed_one():
    shapes = [(1000, 1000), (4, 4)]  # raw 0.002 and 0.5
    d = erk_densities(shapes, 0.1)
    assert d[1] == 1.0
    assert d[0] == pytest.approx((0.1 * 1_000_016 - 16) / 1_000_000)


def test_layer_densities_and_block_counts():
    assert layer_densities("uniform", [(4, 4), (8, 8)], 0.3) == [0.3, 0.3]
    with pytest.raises(ValueError, match="method"):
        layer_densities("random", [(4, 4)], 0.3)
    with pytest.raises(ValueError, match="density"):
        erk_densities([(4, 4)], 0.0)
    assert n_blocks_for(0.1, 4096) == 410 and n_blocks_for(0.0, 10) == 1 and n_blocks_for(1.0, 10) == 10
