"""Dynamic sparsity on the sparse layers: pattern replacement (set_pattern, with the
optimizer state following the blocks), block scores of the dense weight gradient
(request_dense_grad_scores) and SparCL's gradient masking (mask_gradients).

Oracles: dense float64 torch layers holding the masked weights, the dense gradient
dy.T @ x cut into blocks by a Python loop (blocks_in_mask_order), and top-k choices
made here with torch.topk on those oracle gradients.
"""

import math

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse import ops
from edgesparse.nn import SparseConv2d, SparseLinear, sparse_layers
from tests._oracle import (
    assert_close,
    assert_pattern,
    blocks_in_mask_order,
    expand_mask,
    grid,
    masked_dense,
    padded,
    random_mask,
    randn,
    to64,
)

BLOCK = (4, 4)
IN, OUT = 19, 13  # ragged for 4x4 blocks: a 4 x 5 block grid
ROWS = 6


def make_layer(gen, density=0.5):
    layer = SparseLinear(IN, OUT, BLOCK, density)
    with torch.no_grad():  # values that are not nn.Linear's tiny init, padding kept zero
        dense = randn((OUT, IN), gen)
        layer.values.copy_(blocks_in_mask_order(dense, layer.block_mask(), BLOCK))
    return layer


def dense_weight_grad(layer, x, dy):
    """float64 dL/dW = dy.T @ x of the whole (unmasked) weight, logical shape."""
    return to64(dy).reshape(-1, layer.shape[0]).T @ to64(x).reshape(-1, layer.shape[1])


def block_norms(dense, block):
    """[NB, KB] L2 norms of the blocks of ``dense`` (logical shape), by a loop."""
    bn, bk = block
    p = padded(dense, block)
    nb, kb = grid(tuple(dense.shape), block)
    return torch.tensor([[float(p[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].norm()) for j in range(kb)] for i in range(nb)],
                        dtype=torch.float64)


# ------------------------------------------------------------------ set_pattern
def test_set_pattern_keeps_survivors_zeroes_grown_blocks_and_drops_the_rest(gen):
    layer = make_layer(gen)
    old_mask, old_dense = layer.block_mask(), to64(layer.to_dense().weight)
    new_mask = random_mask(*layer.block_grid, 0.5, gen)
    new_mask[old_mask.nonzero()[0].tolist()] = True  # at least one survivor
    new_mask[(~old_mask).nonzero()[0].tolist()] = True  # at least one grown block

    layer.set_pattern(new_mask)

    assert_pattern(layer, new_mask)
    expected = masked_dense(old_dense, new_mask & old_mask, BLOCK)  # grown blocks are zero
    assert_close(layer.to_dense().weight, expected, torch.float32, "weight after set_pattern")
    x = randn((ROWS, IN), gen)
    with edgesparse.use_backend("tvm"):
        y = layer(x)
    assert_close(y, to64(x) @ expected.T + to64(layer.bias), torch.float32, "forward on the new pattern")


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_set_pattern_moves_optimizer_state_with_the_blocks(optimizer_class, gen):
    layer = make_layer(gen)
    kwargs = {"lr": 0.1, "momentum": 0.9} if optimizer_class is torch.optim.SGD else {"lr": 0.1}
    optimizer = optimizer_class(layer.parameters(), **kwargs)
    x = randn((ROWS, IN), gen)
    layer(x).square().sum().backward()
    optimizer.step()
    old_mask = layer.block_mask()
    state_names = [name for name, t in optimizer.state[layer.values].items() if t.shape == layer.values.shape]
    assert state_names, "the optimizer must hold per-block state for this test to mean anything"
    # Each per-block state as a dense [N, K] matrix on the old pattern.
    old_state = {name: layer.weight_bsr().with_values(optimizer.state[layer.values][name]).to_dense() for name in state_names}
    new_mask = ~old_mask
    new_mask[old_mask.nonzero()[0].tolist()] = True  # one survivor, the rest grown

    layer.set_pattern(new_mask, optimizer)

    for name in state_names:
        expected = blocks_in_mask_order(masked_dense(old_state[name], new_mask & old_mask, BLOCK), new_mask, BLOCK)
        assert_close(optimizer.state[layer.values][name], expected, torch.float32, f"optimizer state {name!r}")
    # The optimizer still trains the same (resized) parameter.
    layer.values.grad = None
    layer(x).square().sum().backward()
    before = layer.values.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.values, before)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_set_pattern_to_empty_and_full(density, gen):
    layer = make_layer(gen)
    x = randn((ROWS, IN), gen)
    layer.set_pattern(torch.full(layer.block_grid, bool(density)))
    assert layer.density == density
    x_ = x.clone().requires_grad_()
    layer(x_).sum().backward()
    expected = to64(layer.to_dense().weight)
    assert_close(x_.grad, torch.ones(ROWS, OUT, dtype=torch.float64) @ expected, torch.float32, "grad-input")


def test_set_pattern_rejects_bad_masks_and_optimizers(gen):
    layer = make_layer(gen)
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        layer.set_pattern(layer.block_mask().float())
    with pytest.raises(ValueError, match=r"block_mask must have shape \(4, 5\)"):
        layer.set_pattern(torch.ones(5, 4, dtype=torch.bool))
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold this layer's values"):
        layer.set_pattern(layer.block_mask(), other)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        layer.set_pattern(layer.block_mask(), "sgd")


# ------------------------------------------------------------------ dense gradient scores
@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_dense_grad_scores_are_the_block_norms_of_the_dense_gradient(backend, gen):
    layer = make_layer(gen, density=0.3)
    x, dy = randn((2, ROWS, IN), gen), randn((2, ROWS, OUT), gen)
    layer.request_dense_grad_scores()
    with edgesparse.use_backend(backend):
        layer(x).backward(dy)
    expected = block_norms(dense_weight_grad(layer, x, dy), BLOCK)
    assert_close(layer.dense_grad_scores, expected, torch.float32, "dense_grad_scores")
    assert bool((layer.dense_grad_scores[~layer.block_mask()] > 0).all()), "pruned blocks are scored too"

    # One-shot: the next backward does not score again.
    scores = layer.dense_grad_scores
    layer(x).backward(2 * dy)
    assert layer.dense_grad_scores is scores


def test_dense_grad_scores_of_a_conv_are_those_of_its_weight_matrix(gen):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, block=(4, 9), density=0.5)
    dense = layer.to_dense().double()
    x = randn((2, 3, 5, 5), gen)
    x64 = to64(x)
    layer.request_dense_grad_scores()
    layer(x).square().sum().backward()
    dense(x64).square().sum().backward()
    expected = block_norms(dense.weight.grad.reshape(8, -1), (4, 9))
    assert_close(layer.dense_grad_scores, expected, torch.float32, "conv dense_grad_scores")


# ------------------------------------------------------------------ gradient masking
def kept_blocks_oracle(layer, full_grad_blocks, fraction):
    """Positions (in values order) of the ceil(fraction * nnzb) blocks of largest L2 norm."""
    norms = full_grad_blocks.flatten(1).norm(dim=1)
    return set(norms.topk(math.ceil(fraction * layer.nnz_blocks)).indices.tolist())


def test_block_gradient_masking_keeps_the_top_blocks_and_refreshes_on_schedule(gen):
    layer = make_layer(gen, density=0.6)
    x, dy = randn((ROWS, IN), gen), randn((ROWS, OUT), gen)
    full = blocks_in_mask_order(dense_weight_grad(layer, x, dy), layer.block_mask(), BLOCK)
    layer.mask_gradients(0.3, refresh_every=3)

    kept_per_pass = []
    for step in range(4):
        layer.values.grad = None
        scale = 1.0 if step < 3 else -1.0  # the same magnitudes: the refreshed mask must agree
        layer(x).backward(scale * dy)
        grad = layer.values.grad
        kept = {i for i in range(layer.nnz_blocks) if bool(grad[i].any())}
        kept_per_pass.append(kept)
        assert kept == kept_blocks_oracle(layer, full, 0.3), f"pass {step}: kept blocks"
        expected = torch.zeros_like(full)
        expected[sorted(kept)] = scale * full[sorted(kept)]
        assert_close(grad, expected, torch.float32, f"masked gradient at pass {step}")
    assert layer.gradient_mask is not None


def test_gradient_mask_is_reused_until_the_refresh(gen):
    layer = make_layer(gen, density=0.6)
    x = randn((ROWS, IN), gen)
    dy_a, dy_b = randn((ROWS, OUT), gen), randn((ROWS, OUT), gen)
    layer.mask_gradients(0.25, refresh_every=2)
    grads = []
    for dy in (dy_a, dy_b, dy_b):  # passes 0 (refresh), 1 (cached mask), 2 (refresh)
        layer.values.grad = None
        layer(x).backward(dy)
        grads.append(layer.values.grad.clone())
    mask = layer.block_mask()
    full_a = blocks_in_mask_order(dense_weight_grad(layer, x, dy_a), mask, BLOCK)
    full_b = blocks_in_mask_order(dense_weight_grad(layer, x, dy_b), mask, BLOCK)
    chosen_a = sorted(kept_blocks_oracle(layer, full_a, 0.25))
    chosen_b = sorted(kept_blocks_oracle(layer, full_b, 0.25))
    assert chosen_a != chosen_b, "the two upstream gradients must rank blocks differently for this test"
    for grad, full, chosen, what in ((grads[1], full_b, chosen_a, "cached"), (grads[2], full_b, chosen_b, "refreshed")):
        expected = torch.zeros_like(full)
        expected[chosen] = full[chosen]
        assert_close(grad, expected, torch.float32, f"{what} mask")


def test_element_gradient_masking_keeps_the_configured_fraction(gen):
    layer = make_layer(gen, density=0.6)
    x, dy = randn((ROWS, IN), gen), randn((ROWS, OUT), gen)
    mask = layer.block_mask()
    full = blocks_in_mask_order(dense_weight_grad(layer, x, dy), mask, BLOCK)
    real = int(expand_mask(mask, BLOCK, (OUT, IN)).sum())  # entries of the kept blocks, padding excluded
    layer.mask_gradients(0.1, refresh_every=5, granularity="element")
    for step in range(2):
        layer.values.grad = None
        layer(x).backward(dy)
        keep = math.ceil(0.1 * real)
        chosen = full.abs().flatten().topk(keep).indices
        expected = torch.zeros(full.numel(), dtype=torch.float64)
        expected[chosen] = full.flatten()[chosen]
        assert int((layer.values.grad != 0).sum()) == keep
        assert_close(layer.values.grad, expected.view_as(full), torch.float32, f"element-masked gradient, pass {step}")


def test_skipped_blocks_are_not_computed(gen, monkeypatch):
    layer = make_layer(gen, density=0.6)
    x = randn((ROWS, IN), gen)
    computed = []
    real = ops.bsr_linear_grad_weight
    monkeypatch.setattr(ops, "bsr_linear_grad_weight", lambda dy, x, W: computed.append(W.nnz_blocks) or real(dy, x, W))
    layer.mask_gradients(0.25, refresh_every=10)
    for _ in range(3):
        layer(x).sum().backward()
    kept = math.ceil(0.25 * layer.nnz_blocks)
    assert computed == [layer.nnz_blocks, kept, kept]


def test_gradient_masking_off_and_bad_arguments(gen):
    layer = make_layer(gen)
    x, dy = randn((ROWS, IN), gen), randn((ROWS, OUT), gen)
    layer.mask_gradients(0.2)
    layer.mask_gradients(None)
    layer(x).backward(dy)
    expected = blocks_in_mask_order(dense_weight_grad(layer, x, dy), layer.block_mask(), BLOCK)
    assert_close(layer.values.grad, expected, torch.float32, "unmasked gradient")
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            layer.mask_gradients(bad)
    with pytest.raises(ValueError, match="refresh_every must be a positive int"):
        layer.mask_gradients(0.2, refresh_every=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        layer.mask_gradients(0.2, granularity="row")


def test_set_pattern_drops_a_cached_gradient_mask(gen):
    layer = make_layer(gen)
    x = randn((ROWS, IN), gen)
    layer.mask_gradients(0.5, refresh_every=10)
    layer(x).sum().backward()
    assert layer.gradient_mask is not None
    layer.set_pattern(torch.ones(layer.block_grid, dtype=torch.bool))
    assert layer.gradient_mask is None
    layer.values.grad = None
    layer(x).sum().backward()  # a refresh on the new pattern, not a stale block list
    assert int(layer.values.grad.flatten(1).any(1).sum()) == math.ceil(0.5 * layer.nnz_blocks)


def test_sparse_layers_lists_every_sparse_layer_by_name():
    model = nn.Sequential(nn.Linear(8, 8), SparseLinear(8, 8, (4, 4), 0.5), nn.Sequential(SparseLinear(8, 4, (4, 4), 1.0)))
    assert [name for name, _ in sparse_layers(model)] == ["1", "2.0"]
