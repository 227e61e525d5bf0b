"""edgesparse.ops.bsr_linear_grad_input — dx = dy @ W, the input gradient — on every backend.

Oracle: dense torch in float64, dy @ w_masked, where w_masked is the dense weight with
the blocks outside the test's own block mask zeroed (see tests/_oracle.py).
"""

import pytest
import torch

import edgesparse
from edgesparse import BSR, BackendUnavailableError, ops
from tests._oracle import (
    LOW_PRECISION_CASES,
    build_weight,
    LAYOUTS,
    RAGGED_SHAPE,
    SHAPE_KINDS,
    assert_close,
    block_params,
    device_for,
    expand_mask,
    grid,
    logical_shape,
    make_operand,
    mask_with_empty_lines,
    random_mask,
    randn,
    to64,
)


def grad_input(backend, dy, W):
    with edgesparse.use_backend(backend):
        return ops.bsr_linear_grad_input(dy, W)


def oracle(dy, w_masked):
    return to64(dy) @ w_masked


def check(backend, device, gen, block, shape, mask, dtype=torch.float32, layout="contiguous", rows=None):
    W, w_masked = build_weight(shape, block, mask, gen, dtype, device)
    kwargs = {} if rows is None else {"rows": rows}
    dy = make_operand(layout, shape[0], gen, dtype, device, **kwargs)
    dy_before, values_before = dy.clone(), W.values.clone()

    dx = grad_input(backend, dy, W)

    assert dx.device == dy.device
    assert tuple(dx.shape) == (*dy.shape[:-1], shape[1])
    assert_close(dx, oracle(dy, w_masked), dtype, "dx")
    assert torch.equal(dy, dy_before) and torch.equal(W.values, values_before), "inputs were modified"
    return dx


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
    """2-D and batched [B, T, N] dy, contiguous or not (transposed and sliced views)."""
    check(backend, device, gen, block, RAGGED_SHAPE, random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen), layout=layout)


@pytest.mark.parametrize("block", block_params([(8, 4), (3, 5), (64, 64)]))
def test_empty_block_rows_and_columns(backend, device, gen, block):
    bk = block[1]
    mask, _, empty_cols = mask_with_empty_lines(*grid(RAGGED_SHAPE, block), gen)
    dx = check(backend, device, gen, block, RAGGED_SHAPE, mask)
    # Inputs of an empty block column get exactly zero gradient: nothing was added.
    cols = [k for j in empty_cols for k in range(j * bk, min((j + 1) * bk, RAGGED_SHAPE[1]))]
    assert torch.equal(dx[:, cols], torch.zeros_like(dx[:, cols]))


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_few_rows(backend, device, gen, rows):
    block = (8, 4)
    check(backend, device, gen, block, RAGGED_SHAPE, random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen), rows=rows)


@pytest.mark.parametrize("block", block_params([(16, 16), (3, 5)]))
@pytest.mark.parametrize(("backend", "dtype"), LOW_PRECISION_CASES)
def test_other_dtypes(backend, dtype, gen, block):
    mask = random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen)
    check(backend, device_for(backend), gen, block, RAGGED_SHAPE, mask, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_tvm_rejects_dtypes_other_than_fp32(dtype, gen):
    W = BSR.from_dense(randn((16, 16), gen, dtype), (8, 8))
    dy = randn((4, 16), gen, dtype)
    with pytest.raises(BackendUnavailableError, match="tvm"):
        grad_input("tvm", dy, W)


def test_nan_in_dy_gives_nan_in_the_affected_outputs(backend, device, gen):
    block, shape = (8, 4), RAGGED_SHAPE
    mask = random_mask(*grid(shape, block), 0.5, gen)
    i0, m0 = 2, 5
    mask[i0, 0], mask[i0, 1] = True, False  # some block columns see the NaN row, some do not
    W, w_masked = build_weight(shape, block, mask, gen, torch.float32, device)
    dy = randn((12, shape[0]), gen, torch.float32, device)
    n0 = i0 * block[0] + 3
    ref = oracle(dy, w_masked)  # computed before the NaN goes in: the finite part of the answer
    ref[m0] -= to64(dy[m0, n0]) * w_masked[n0]
    dy[m0, n0] = float("nan")

    dx = grad_input(backend, dy, W)

    affected = expand_mask(mask, block, shape)[n0]  # inputs k whose block (i0, k // bk) is kept
    assert affected.any() and not affected.all()
    assert torch.isnan(to64(dx)[m0, affected]).all(), "every gradient that reads the NaN must be NaN"
    assert_close(dx[m0, ~affected], ref[m0, ~affected], torch.float32, "dx[m0, unaffected]")
    others = [m for m in range(dy.shape[0]) if m != m0]
    assert_close(dx[others], ref[others], torch.float32, "dx[other rows]")


# ------------------------------------------------------------------ bad input (checked before dispatch)
@pytest.fixture
def small():
    return BSR.from_dense(torch.randn(13, 7), (4, 4)), torch.randn(5, 13)


def test_rejects_mismatched_n(small):
    W, _ = small
    with edgesparse.use_backend("reference"):
        with pytest.raises(ValueError, match=r"dy must have shape \[\.\.\., 13\]"):
            ops.bsr_linear_grad_input(torch.randn(5, 7), W)
        with pytest.raises(ValueError, match=r"^dy"):
            ops.bsr_linear_grad_input(torch.tensor(1.0), W)


def test_rejects_dy_not_a_tensor(small):
    W, dy = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^dy"):
        ops.bsr_linear_grad_input(dy.tolist(), W)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_rejects_dy_dtype_different_from_w(small, dtype):
    W, dy = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^dy has dtype"):
        ops.bsr_linear_grad_input(dy.to(dtype), W)


def test_rejects_w_not_a_bsr(small):
    _, dy = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^W must be an edgesparse.BSR"):
        ops.bsr_linear_grad_input(dy, torch.randn(13, 7))


def test_rejects_w_on_another_device(small):
    W, dy = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match="W is on meta"):
        ops.bsr_linear_grad_input(dy, W.to("meta"))
