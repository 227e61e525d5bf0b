"""edgesparse.nn.SparseLinear: construction, equivalence with the masked dense layer,
training with torch optimizers, state_dict round trips and bad inputs.

Oracles: the test's own block masks (random_mask, or top blocks by an L2 norm computed
here by a loop over blocks) and dense torch layers holding the masked weights.
"""

import io

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse.nn import SparseLinear
from tests._oracle import (
    forward_and_input_grad,
    assert_close,
    assert_pattern,
    blocks_in_mask_order,
    expand_mask,
    grid,
    masked_dense,
    random_mask,
    randn,
    to64,
    top_blocks_mask,
)

BLOCK = (4, 4)
IN, OUT = 19, 13  # ragged for 4x4 blocks


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_from_dense_keeps_the_top_blocks_and_their_weights(density):
    linear = nn.Linear(IN, OUT)
    before = linear.weight.detach().clone()
    layer = SparseLinear.from_dense(linear, block=BLOCK, density=density)
    mask = top_blocks_mask(linear.weight.detach(), BLOCK, density)
    assert_pattern(layer, mask)
    assert torch.equal(to64(layer.values), blocks_in_mask_order(to64(linear.weight), mask, BLOCK))
    assert torch.equal(layer.bias, linear.bias) and layer.bias is not linear.bias
    assert torch.equal(linear.weight, before), "from_dense must leave the dense layer untouched"
    assert layer.shape == (OUT, IN) and layer.block == BLOCK


def test_new_layer_keeps_the_top_blocks_of_a_linear_init():
    torch.manual_seed(3)
    expected = nn.Linear(IN, OUT, bias=False)
    torch.manual_seed(3)
    layer = SparseLinear(IN, OUT, BLOCK, 0.5, bias=False)
    assert_pattern(layer, top_blocks_mask(expected.weight.detach(), BLOCK, 0.5))
    assert layer.bias is None and layer.values.requires_grad


def test_to_dense_is_the_equivalent_linear(gen):
    linear = nn.Linear(IN, OUT)
    layer = SparseLinear.from_dense(linear, BLOCK, 0.5)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and (dense.in_features, dense.out_features) == (IN, OUT)
    assert torch.equal(to64(dense.weight), masked_dense(linear.weight, top_blocks_mask(linear.weight.detach(), BLOCK, 0.5), BLOCK))
    assert torch.equal(dense.bias, layer.bias) and dense.bias is not layer.bias
    x = randn((5, IN), gen)
    with edgesparse.use_backend("reference"):
        assert_close(layer(x), to64(dense(x)), torch.float32, "forward")


def test_extra_repr_names_the_block_and_kept_blocks():
    layer = SparseLinear(IN, OUT, BLOCK, 0.5)
    assert repr(layer) == (
        "SparseLinear(in_features=19, out_features=13, block=(4, 4), nnz_blocks=10, density=0.500, bias=True)"
    )


def test_moves_dtype_with_the_values_and_keeps_int32_indices(gen):
    layer = SparseLinear(IN, OUT, BLOCK, 0.5).double()
    assert layer.values.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert all(t.dtype == torch.int32 for t in layer.index)
    x = randn((5, IN), gen, torch.float64)
    assert_close(layer(x), layer.to_dense()(x), torch.float64, "fp64 forward")  # dispatch: reference


# ------------------------------------------------------------------ training
@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), id="sgd-momentum"),
        pytest.param(lambda params: torch.optim.Adam(params, lr=0.01), id="adam"),
    ],
)
def test_optimizer_state_is_sized_to_the_nonzeros(optimizer, gen):
    layer = SparseLinear(IN, OUT, BLOCK, 0.3)
    opt = optimizer(layer.parameters())
    before = layer.values.detach().clone()
    with edgesparse.use_backend("reference"):
        layer(randn((8, IN), gen)).square().sum().backward()
    grad = layer.values.grad.clone()
    opt.step()
    state = opt.state[layer.values]
    tensors = {name: t for name, t in state.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
    assert tensors, f"no per-element state in {sorted(state)}"
    for name, t in tensors.items():
        assert t.shape == layer.values.shape, f"{name}: {tuple(t.shape)}, values {tuple(layer.values.shape)}"
    # The first step of both is known in closed form: SGD's momentum buffer starts as the
    # gradient, and Adam's bias-corrected moments give g / (|g| + eps).
    if isinstance(opt, torch.optim.SGD):
        expected = before - 0.1 * grad
    else:
        expected = before - 0.01 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(layer.values.detach(), expected)


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_sgd_training_tracks_the_masked_dense_model(backend, gen):
    sizes = [IN, OUT, 6]
    dense = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    linears = [dense[0], dense[2]]
    masks = [random_mask(*grid((linear.out_features, linear.in_features), BLOCK), 0.5, gen) for linear in linears]
    elementwise = [expand_mask(m, BLOCK, tuple(linear.weight.shape)) for m, linear in zip(masks, linears)]

    def remask():
        with torch.no_grad():
            for linear, m in zip(linears, elementwise):
                linear.weight.mul_(m)

    remask()
    # density=None keeps exactly the blocks holding a nonzero: the test's masks.
    sparse = nn.Sequential(*[SparseLinear.from_dense(m, BLOCK) if isinstance(m, nn.Linear) else m for m in dense])
    for layer, mask in zip([sparse[0], sparse[2]], masks):
        assert_pattern(layer, mask)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    opt_dense, opt_sparse = sgd(dense), sgd(sparse)
    losses_dense, losses_sparse = [], []
    x, target = randn((16, IN), gen), randn((16, sizes[2]), gen)
    for _ in range(5):
        for model, opt, losses in ((dense, opt_dense, losses_dense), (sparse, opt_sparse, losses_sparse)):
            opt.zero_grad()
            with edgesparse.use_backend(backend):
                loss = nn.functional.mse_loss(model(x), target)
                loss.backward()
            opt.step()
            losses.append(loss.item())
        remask()  # the masked-dense model's pruned weights received gradient; drop it again

    # Both sum in fp32 but in different orders (ours per block, the dense GEMM over all
    # of K), so the losses may part in their last bits, a little more with each step
    # (at these sizes they came out identical); 1e-5 is ~100 fp32 ulps.
    torch.testing.assert_close(torch.tensor(losses_sparse), torch.tensor(losses_dense), rtol=1e-5, atol=0)
    assert losses_dense[-1] < losses_dense[0], "the step size must make training visible"
    for layer, linear, mask in zip([sparse[0], sparse[2]], linears, masks):
        assert_close(layer.values, blocks_in_mask_order(to64(linear.weight), mask, BLOCK), torch.float32, "trained values")


# ------------------------------------------------------------------ state_dict
def test_state_dict_holds_values_bias_and_the_canonical_pattern():
    assert set(SparseLinear(IN, OUT, BLOCK, 0.5).state_dict()) == {"values", "bias", "row_offsets", "col_indices"}


@pytest.mark.parametrize("density", [0.25, 0.5, 0.8], ids=lambda d: f"into-density-{d}")
def test_state_dict_round_trip_restores_the_pattern(density, gen):
    torch.manual_seed(1)
    saved = SparseLinear(IN, OUT, BLOCK, 0.5)
    torch.manual_seed(2)
    fresh = SparseLinear(IN, OUT, BLOCK, density)
    assert not torch.equal(fresh.to_dense().weight != 0, saved.to_dense().weight != 0), "the test needs two patterns"
    param = fresh.values
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)

    fresh.load_state_dict(torch.load(buffer))

    assert fresh.values is param, "the Parameter object survives, so references to it stay valid"
    assert fresh.values.shape == saved.values.shape and fresh.nnz_blocks == saved.nnz_blocks
    for mine, theirs in zip(fresh.index, saved.index):
        assert torch.equal(mine, theirs)
    assert torch.equal(fresh.values, saved.values) and torch.equal(fresh.bias, saved.bias)
    x = randn((5, IN), gen)
    for got, expected in zip(forward_and_input_grad(fresh, x), forward_and_input_grad(saved, x)):
        assert torch.equal(got, expected)


def _without_last_block(sd):
    sd["values"], sd["col_indices"] = sd["values"][:-1], sd["col_indices"][:-1]


def _column_out_of_range(sd):
    sd["col_indices"][0] = 99


@pytest.mark.parametrize(
    "corrupt, message",
    [
        pytest.param(_without_last_block, "row_offsets must .* end at the number of blocks", id="values-count"),
        pytest.param(_column_out_of_range, r"col_indices must lie in \[0, 5\)", id="column-range"),
        pytest.param(lambda sd: sd.update(SparseLinear(IN, OUT, (2, 4), 0.5).state_dict()), r"block=\(4, 4\)", id="block-shape"),
        pytest.param(lambda sd: sd.update(SparseLinear(IN, 17, BLOCK, 0.5).state_dict()), "row_offsets must have 5 entries", id="out-features"),
    ],
)
def test_load_rejects_an_inconsistent_pattern(corrupt, message):
    layer = SparseLinear(IN, OUT, BLOCK, 0.5)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    sd = {name: t.clone() for name, t in SparseLinear(IN, OUT, BLOCK, 0.3).state_dict().items()}
    corrupt(sd)
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items()), "a rejected load must change nothing"


# ------------------------------------------------------------------ bad inputs
def test_wrong_in_features_at_forward():
    layer = SparseLinear(IN, OUT, BLOCK, 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 19\] \(in_features"):
        layer(torch.randn(3, IN - 1))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: SparseLinear(IN, 3, BLOCK, 0.5), id="block-rows-over-out_features"),
        pytest.param(lambda: SparseLinear.from_dense(nn.Linear(3, OUT), block=(2, 4), density=0.5), id="block-cols-over-in_features"),
    ],
)
def test_block_larger_than_the_layer(build):
    with pytest.raises(ValueError, match=r"block=\(\d+, \d+\) is larger than the layer"):
        build()


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_density_outside_zero_one(density):
    with pytest.raises(ValueError, match="density must lie in \\[0, 1\\]"):
        SparseLinear(IN, OUT, BLOCK, density)


def test_bad_block_and_source_types():
    with pytest.raises(ValueError, match="block sizes must be positive"):
        SparseLinear(IN, OUT, (0, 4), 0.5)
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(3, 8, 3), BLOCK, 0.5)
