"""SparCL's TDM, DDR, DGM, SpFDE's freezing and sieving, RigL — each against a hand-built
or dense-torch oracle on a tiny model (a 32x32 hidden layer in 8x8 blocks: a 4x4 grid)."""

import math
from types import SimpleNamespace

import pytest
import torch

from edgesparse.cl.buffer import ReservoirBuffer
from edgesparse.cl.mechanisms import DataRemoval, DataSieving, GradientMasking, ProgressiveFreezing, RigL, TaskAwareMasking
from edgesparse.cl.model import build_mlp
from edgesparse.nn import sparse_layers


def _trainer(density=0.5, seed=0):
    torch.manual_seed(seed)
    model = build_mlp(8, 4, [32, 32], densities=[density], block=(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return SimpleNamespace(model=model, optimizer=optimizer, gen=torch.Generator().manual_seed(seed),
                           sparse=sparse_layers(model))


def _backward(tr, rows=6):
    tr.optimizer.zero_grad()
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(1))
    tr.model(x).square().sum().backward()


def _dense_blocks(t):
    """[4, 4, 8, 8] view of a 32x32 dense matrix."""
    return t.reshape(4, 8, 4, 8).permute(0, 2, 1, 3)


def test_tdm_first_update_grows_delta_at_zero_then_prunes_by_importance():
    tr = _trainer(density=0.5)
    layer = tr.sparse[0][1]
    tdm = TaskAwareMasking({"layers.1": 0.5}, delta=0.125, lam=0.5)
    _backward(tr)
    before_mask, before_w = layer.block_mask(), layer.to_dense().weight.detach().clone()
    tdm.after_backward(tr, 0.0, 0.01)  # the task's first step: prune to 50%, regrow to 62.5%
    mask = layer.block_mask()
    assert mask.sum() == 10 and (mask & before_mask).sum() == 8
    w = _dense_blocks(layer.to_dense().weight.detach())
    assert torch.equal(w[before_mask], _dense_blocks(before_w)[before_mask])
    assert (w[mask & ~before_mask] == 0).all()

    # A later phase: prune to 37.5% (6 blocks) by |w| + 0.5 |g|, regrow to 8 elsewhere.
    _backward(tr)
    dense_w = _dense_blocks(layer.to_dense().weight.detach())
    grad = torch.zeros(4, 4, 8, 8)
    grad[layer.row_indices.long(), layer.col_indices.long()] = layer.values.grad
    importance = (dense_w.abs() + 0.5 * grad.abs()).sum((2, 3))
    importance[~mask] = -1
    expected_kept = importance.flatten().topk(6).indices
    tdm.after_backward(tr, 0.1, 0.11)
    new = layer.block_mask()
    assert new.sum() == 8
    assert new.flatten()[expected_kept].all()
    pruned = mask & ~new
    assert pruned.sum() == 4  # the 4 least important of the 10 left, none regrown there
    tdm.after_backward(tr, 0.9, 0.95)  # the last phase keeps the mask
    assert torch.equal(layer.block_mask(), new)


def test_ddr_removes_the_easiest_and_never_touches_the_buffer():
    tr = _trainer()
    buf = ReservoirBuffer(4, 8, 4)
    buf.add(torch.randn(4, 8), torch.arange(4), torch.randn(4, 4), 0, tr.gen)
    tr.strategy = SimpleNamespace(buffer=buf)
    snapshot = {k: v.clone() for k, v in buf.state_dict().items()}
    ddr = DataRemoval(fraction=0.4, stages=(0.5,))
    ddr.start_task(tr, 10)
    every = torch.arange(10)
    # Presentation 1 and 2: examples 0-3 always right (0 events); 4-5 right then wrong (1 event);
    # 6-7 never right (counted as most forgotten); 8-9 wrong then right (0 events).
    ddr.after_step(tr, 0, 0.1, every, torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool), torch.zeros(10))
    ddr.after_step(tr, 0.1, 0.2, every, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool), torch.zeros(10))
    ddr.end_epoch(tr, 0.0, 0.25)  # stage 0.5 not reached
    assert ddr.active().all()
    ddr.end_epoch(tr, 0.25, 0.5)  # removes 40% of 10 = 4: the zero-event examples, lowest positions first
    assert ddr.active().tolist() == [False] * 4 + [True] * 6
    assert ddr.events.sum() == 0  # statistics restart
    for k, v in buf.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_ddr_waits_for_two_epochs_of_counts_and_removes_stages_reached_together():
    tr = _trainer()
    ddr = DataRemoval(fraction=0.4, stages=(0.1, 0.2))  # both stages fall on the first epoch end of 5
    ddr.start_task(tr, 10)
    every = torch.arange(10)
    # Epoch 1: 0-7 right, 8-9 wrong. One presentation: no event yet, so nothing leaves.
    ddr.after_step(tr, 0.0, 0.2, every, torch.tensor([1] * 8 + [0] * 2, dtype=torch.bool), torch.zeros(10))
    ddr.end_epoch(tr, 0.0, 0.2)
    assert ddr.active().all()
    # Epoch 2: 0-3 forgotten (1 event each); 4-9 right. The two stages' 2 x 20% = 4 leave
    # at once, on two epochs' counts: the zero-event 4-7, not the first positions 0-3.
    ddr.after_step(tr, 0.2, 0.4, every, torch.tensor([0] * 4 + [1] * 6, dtype=torch.bool), torch.zeros(10))
    ddr.end_epoch(tr, 0.2, 0.4)
    assert ddr.active().tolist() == [True] * 4 + [False] * 4 + [True] * 2
    ddr.end_epoch(tr, 0.4, 0.6)  # no stage left
    assert int(ddr.active().sum()) == 6


def test_dgm_keeps_the_configured_fraction():
    tr = _trainer(density=1.0)  # 16 blocks
    layer = tr.sparse[0][1]
    GradientMasking(fraction=0.25, refresh_every=5).start_epoch(tr)
    _backward(tr)  # the refresh chooses the mask from the full gradient
    full = layer.values.grad.flatten(1).norm(dim=1)
    _backward(tr)
    kept = (layer.values.grad.flatten(1).norm(dim=1) > 0).nonzero()[:, 0]
    assert kept.numel() == math.ceil(0.25 * 16)
    assert set(kept.tolist()) == set(full.topk(4).indices.tolist())


def test_dgm_fraction_is_of_the_whole_layer():
    tr = _trainer(density=0.5)
    layer = tr.sparse[0][1]
    GradientMasking(fraction=0.25, refresh_every=5).start_epoch(tr)  # half of the kept blocks
    _backward(tr)
    _backward(tr)
    kept = int((layer.values.grad.flatten(1).norm(dim=1) > 0).sum())
    assert kept == math.ceil(0.5 * layer.nnz_blocks)
    GradientMasking(fraction=0.5, refresh_every=5).start_epoch(tr)  # as many as the layer keeps: no masking
    _backward(tr)
    assert int((layer.values.grad.flatten(1).norm(dim=1) > 0).sum()) == layer.nnz_blocks


def test_freezing_stops_backward_at_the_frozen_prefix():
    tr = _trainer()
    freeze = ProgressiveFreezing(freeze_at=(0.5, 0.75))
    freeze.start_task(tr, 10)
    freeze.before_step(tr, 0.6, 0.61)
    assert tr.model.frozen == 1
    before = [p.detach().clone() for p in tr.model.layers[0].parameters()]
    _backward(tr)
    tr.optimizer.step()
    assert all(p.grad is None for p in tr.model.layers[0].parameters())
    assert all(torch.equal(p, b) for p, b in zip(tr.model.layers[0].parameters(), before))
    assert tr.model.layers[1].values.grad is not None
    freeze.before_step(tr, 0.8, 0.81)
    assert tr.model.frozen == 2 and not tr.model.layers[1].values.requires_grad
    freeze.start_task(tr, 10)
    assert tr.model.frozen == 0 and all(p.requires_grad for p in tr.model.parameters())
    with pytest.raises(ValueError, match="freeze_at"):
        ProgressiveFreezing(freeze_at=(0.8, 0.5))


def test_sieving_is_circular():
    tr = _trainer()
    sieve = DataSieving(keep=0.5, swap=0.2)
    sieve.start_task(tr, 10)
    seen = sieve.active().clone()
    for epoch in range(5):
        members = sieve.active().nonzero()[:, 0]
        # The loss of each example is its position: the lowest positions are the easiest.
        sieve.after_step(tr, 0, 0, members, None, members.float())
        easiest = members[:2]
        sieve.end_epoch(tr, epoch / 5, (epoch + 1) / 5)
        assert sieve.active().sum() == 5 and not sieve.active()[easiest].any()
        seen |= sieve.active()
    assert seen.all()  # every example came back into the partial set


def test_rigl_drops_smallest_and_grows_largest_dense_gradient():
    tr = _trainer(density=0.5)
    layer = tr.sparse[0][1]
    rigl = RigL(alpha=0.3, every=0.25, end=0.75)
    assert rigl.drop_fraction(0.0) == pytest.approx(0.3) and rigl.drop_fraction(0.75) == pytest.approx(0.0)
    mask = layer.block_mask()
    rigl.before_step(tr, 0.25, 0.26)
    # Dense oracle for the grow scores: the same step through a dense copy of the model.
    dense = [layer.to_dense()]
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    h = torch.relu(tr.model.layers[0](x))
    out = tr.model.layers[2](torch.relu(dense[0](h)))
    out.square().sum().backward()
    oracle = _dense_blocks(dense[0].weight.grad).flatten(2).norm(dim=2)
    norms = _dense_blocks(layer.to_dense().weight.detach()).flatten(2).norm(dim=2)
    _backward(tr)
    k = int(rigl.drop_fraction(0.25) * 8)
    assert k == 1
    rigl.after_backward(tr, 0.25, 0.26)
    new = layer.block_mask()
    assert new.sum() == 8
    dropped = mask & ~new
    assert dropped.sum() == 1 and norms[dropped] == norms[mask].min()
    grown = new & ~mask
    outside = ~mask
    assert oracle[grown] == pytest.approx(oracle[outside].max().item(), rel=1e-4)
    assert (_dense_blocks(layer.to_dense().weight.detach())[grown] == 0).all()
