"""edgesparse.ops.bsr_linear_grad_weight — the weight gradient on W's own pattern — on every backend.

The result is a BSR with exactly W's block pattern whose blocks are those of dy^T x.
Oracle: dense torch in float64, G = dy^T x, cut into blocks by a Python loop over the
test's own block mask (see tests/_oracle.py).
"""

import pytest
import torch

import edgesparse
from edgesparse import BSR, BackendUnavailableError, ops
from tests._oracle import (
    LOW_PRECISION_CASES,
    LAYOUTS,
    RAGGED_SHAPE,
    SHAPE_KINDS,
    assert_close,
    block_params,
    blocks_in_mask_order,
    device_for,
    expand_mask,
    expected_indices,
    grid,
    logical_shape,
    make_operand,
    mask_with_empty_lines,
    padding_mask,
    random_mask,
    randn,
    to64,
)


def grad_weight(backend, dy, x, W):
    with edgesparse.use_backend(backend):
        return ops.bsr_linear_grad_weight(dy, x, W)


def dense_grad(dy, x):
    """G = dy^T x over all leading dimensions, float64 [N, K]."""
    return to64(dy).reshape(-1, dy.shape[-1]).T @ to64(x).reshape(-1, x.shape[-1])


def check(backend, device, gen, block, shape, mask, dtype=torch.float32, layout="contiguous", rows=None):
    n, k = shape
    W = BSR.from_mask(randn(shape, gen, dtype, device), mask, block)
    kwargs = {} if rows is None else {"rows": rows}
    dy = make_operand(layout, n, gen, dtype, device, **kwargs)
    x = make_operand(layout, k, gen, dtype, device, **kwargs)
    before = dy.clone(), x.clone(), W.values.clone()

    g = grad_weight(backend, dy, x, W)

    assert isinstance(g, BSR)
    assert g.shape == W.shape and g.block == block and g.dtype == dtype and g.device == W.device
    # Exactly W's pattern, which is exactly the test's mask.
    row_offsets, col_indices, row_indices = expected_indices(mask)
    assert torch.equal(g.row_offsets.cpu(), row_offsets) and torch.equal(g.col_indices.cpu(), col_indices)
    assert torch.equal(g.row_offsets, W.row_offsets) and torch.equal(g.col_indices, W.col_indices)
    assert tuple(g.values.shape) == tuple(W.values.shape)
    G = dense_grad(dy, x)
    assert_close(g.values, blocks_in_mask_order(G, mask, block), dtype, "grad values")
    pad = padding_mask(row_indices, col_indices, block, shape)
    assert torch.all(g.values.cpu()[pad] == 0), "padded entries of the gradient's blocks must be exactly 0"
    assert_close(g.to_dense(), G * expand_mask(mask, block, shape), dtype, "grad to_dense")
    assert all(torch.equal(a, b) for a, b in zip((dy, x, W.values), before)), "inputs were modified"
    return g


@pytest.mark.parametrize("shape_kind", SHAPE_KINDS)
@pytest.mark.parametrize("block", block_params())
def test_block_shapes(backend, device, gen, block, shape_kind):
    shape = logical_shape(shape_kind, block)
    check(backend, device, gen, block, shape, random_mask(*grid(shape, block), 0.3, gen))


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape_kind", SHAPE_KINDS)
@pytest.mark.parametrize("block", block_params([(16, 16), (3, 5)]))
def test_densities(backend, device, gen, block, shape_kind, density):
    shape = logical_shape(shape_kind, block)
    check(backend, device, gen, block, shape, random_mask(*grid(shape, block), density, gen))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", block_params([(8, 4), (3, 5)]))
def test_input_layouts(backend, device, gen, block, layout):
    """2-D and batched dy, x, contiguous or not (transposed and sliced views)."""
    check(backend, device, gen, block, RAGGED_SHAPE, random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen), layout=layout)


@pytest.mark.parametrize("block", block_params([(8, 4), (3, 5), (64, 64)]))
def test_empty_block_rows_and_columns(backend, device, gen, block):
    mask, _, _ = mask_with_empty_lines(*grid(RAGGED_SHAPE, block), gen)
    check(backend, device, gen, block, RAGGED_SHAPE, mask)


# 600 rows: the TVM kernel walks the batch in chunks of 256 rows (32 for blocks of 2048
# entries or more), so whole chunks and a tail.
@pytest.mark.parametrize("rows", [0, 1, 2, 600])
@pytest.mark.parametrize("block", block_params([(8, 4), (32, 64)]))
def test_row_counts(backend, device, gen, rows, block):
    check(backend, device, gen, block, RAGGED_SHAPE, random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen), rows=rows)


@pytest.mark.parametrize("block", block_params([(16, 16), (3, 5)]))
@pytest.mark.parametrize(("backend", "dtype"), LOW_PRECISION_CASES)
def test_other_dtypes(backend, dtype, gen, block):
    mask = random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen)
    check(backend, device_for(backend), gen, block, RAGGED_SHAPE, mask, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_tvm_rejects_dtypes_other_than_fp32(dtype, gen):
    W = BSR.from_dense(randn((16, 16), gen, dtype), (8, 8))
    dy, x = randn((4, 16), gen, dtype), randn((4, 16), gen, dtype)
    with pytest.raises(BackendUnavailableError, match="tvm"):
        grad_weight("tvm", dy, x, W)


def test_nan_in_x_gives_nan_in_the_affected_gradients(backend, device, gen):
    block, shape = (8, 4), RAGGED_SHAPE
    mask = random_mask(*grid(shape, block), 0.5, gen)
    j0, m0 = 3, 5
    mask[0, j0], mask[1, j0] = True, False  # some block rows see the NaN column, some do not
    mask[-1, j0] = True  # the last block row, whose padded rows must stay zero
    W = BSR.from_mask(randn(shape, gen, torch.float32, device), mask, block)
    dy = randn((12, shape[0]), gen, torch.float32, device)
    x = randn((12, shape[1]), gen, torch.float32, device)
    k0 = j0 * block[1] + 1
    x[m0, k0] = 0.0
    ref = dense_grad(dy, x) * expand_mask(mask, block, shape)  # the finite part of the answer
    x[m0, k0] = float("nan")

    g = grad_weight(backend, dy, x, W)

    nan_at = torch.zeros(shape, dtype=torch.bool)
    nan_at[:, k0] = expand_mask(mask, block, shape)[:, k0]  # column k0 of every kept block in block column j0
    assert nan_at.any()
    dense = to64(g.to_dense())
    assert torch.isnan(dense[nan_at]).all(), "every gradient entry that reads the NaN must be NaN"
    assert_close(g.to_dense()[~nan_at], ref[~nan_at], torch.float32, "gradient entries away from the NaN")
    # Padding stays exactly zero: a padded dy row (0) times the NaN must not leak into it.
    last_row = g.row_indices.cpu() == g.block_rows - 1
    tail = shape[0] % block[0]
    assert tail and last_row.any()
    assert (g.values.cpu()[last_row][:, tail:, :] == 0).all()


# ------------------------------------------------------------------ bad input (checked before dispatch)
@pytest.fixture
def small():
    return BSR.from_dense(torch.randn(13, 7), (4, 4)), torch.randn(5, 13), torch.randn(5, 7)


def test_rejects_mismatched_widths(small):
    W, dy, x = small
    with edgesparse.use_backend("reference"):
        with pytest.raises(ValueError, match=r"dy must have shape \[\.\.\., 13\]"):
            ops.bsr_linear_grad_weight(torch.randn(5, 12), x, W)
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 7\]"):
            ops.bsr_linear_grad_weight(dy, torch.randn(5, 8), W)


def test_rejects_row_counts_that_differ(small):
    W, dy, _ = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match="same number of rows"):
        ops.bsr_linear_grad_weight(dy, torch.randn(6, 7), W)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_rejects_dtype_different_from_w(small, which):
    W, dy, x = small
    args = (dy.double(), x) if which == "dy" else (dy, x.double())
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=rf"^{which} has dtype"):
        ops.bsr_linear_grad_weight(*args, W)


def test_rejects_w_not_a_bsr(small):
    _, dy, x = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^W must be an edgesparse.BSR"):
        ops.bsr_linear_grad_weight(dy, x, torch.randn(13, 7))


def test_rejects_w_on_another_device(small):
    W, dy, x = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match="W is on meta"):
        ops.bsr_linear_grad_weight(dy, x, W.to("meta"))
