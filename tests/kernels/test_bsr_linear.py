"""edgesparse.ops.bsr_linear — the forward product y = x @ W^T + bias — on every backend.

Oracle: dense torch in float64, x @ w_masked^T, where w_masked is the dense weight with
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


def forward(backend, x, W, bias=None):
    with edgesparse.use_backend(backend):
        return ops.bsr_linear(x, W, bias)


def oracle(x, w_masked, bias=None):
    y = to64(x) @ w_masked.T
    return y + to64(bias) if bias is not None else y


def check(backend, device, gen, block, shape, mask, dtype=torch.float32, layout="contiguous", bias=False, rows=None):
    W, w_masked = build_weight(shape, block, mask, gen, dtype, device)
    kwargs = {} if rows is None else {"rows": rows}
    x = make_operand(layout, shape[1], gen, dtype, device, **kwargs)
    b = randn((shape[0],), gen, dtype, device) if bias else None
    x_before, values_before = x.clone(), W.values.clone()

    y = forward(backend, x, W, b)

    assert y.device == x.device
    assert tuple(y.shape) == (*x.shape[:-1], shape[0])
    assert_close(y, oracle(x, w_masked, b), dtype, "y")
    assert torch.equal(x, x_before) and torch.equal(W.values, values_before), "inputs were modified"
    return y, b


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
    """2-D and batched [B, T, K] x, contiguous or not (transposed and sliced views)."""
    check(backend, device, gen, block, RAGGED_SHAPE, random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen), layout=layout)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("block", block_params([(8, 8), (3, 5)]))
def test_bias(backend, device, gen, block, bias):
    mask = random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen)
    check(backend, device, gen, block, RAGGED_SHAPE, mask, layout="batched", bias=bias)


@pytest.mark.parametrize("block", block_params([(8, 4), (3, 5), (64, 64)]))
def test_empty_block_rows_and_columns(backend, device, gen, block):
    bn = block[0]
    mask, empty_rows, _ = mask_with_empty_lines(*grid(RAGGED_SHAPE, block), gen)
    y, b = check(backend, device, gen, block, RAGGED_SHAPE, mask, bias=True)
    # Outputs of an empty block row hold exactly the bias: nothing else was added.
    # (Without bias they must be exactly 0: test_densities at density 0 checks that.)
    cols = [n for i in empty_rows for n in range(i * bn, min((i + 1) * bn, RAGGED_SHAPE[0]))]
    assert torch.equal(y[:, cols], b[cols].expand(y.shape[0], -1))


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_few_rows(backend, device, gen, rows):
    block = (8, 4)
    mask = random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen)
    check(backend, device, gen, block, RAGGED_SHAPE, mask, bias=True, rows=rows)


@pytest.mark.parametrize("block", block_params([(16, 16), (3, 5)]))
@pytest.mark.parametrize(("backend", "dtype"), LOW_PRECISION_CASES)
def test_other_dtypes(backend, dtype, gen, block):
    mask = random_mask(*grid(RAGGED_SHAPE, block), 0.3, gen)
    check(backend, device_for(backend), gen, block, RAGGED_SHAPE, mask, dtype=dtype, bias=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_tvm_rejects_dtypes_other_than_fp32(dtype, gen):
    W = BSR.from_dense(randn((16, 16), gen, dtype), (8, 8))
    x = randn((4, 16), gen, dtype)
    with pytest.raises(BackendUnavailableError, match="tvm"):
        forward("tvm", x, W)


def test_nan_in_x_gives_nan_in_the_affected_outputs(backend, device, gen):
    block, shape = (8, 4), RAGGED_SHAPE
    bn, bk = block
    mask = random_mask(*grid(shape, block), 0.5, gen)
    j0, m0 = 3, 5
    mask[0, j0], mask[1, j0] = True, False  # some block rows see the NaN column, some do not
    W, w_masked = build_weight(shape, block, mask, gen, torch.float32, device)
    x = randn((12, shape[1]), gen, torch.float32, device)
    k0 = j0 * bk + 1
    ref = oracle(x, w_masked)  # computed before the NaN goes in: the finite part of the answer
    ref[m0] -= to64(x[m0, k0]) * w_masked[:, k0]
    x[m0, k0] = float("nan")

    y = forward(backend, x, W)

    affected = expand_mask(mask, block, shape)[:, k0]  # outputs n whose block (n // bn, j0) is kept
    assert affected.any() and not affected.all()
    y64 = to64(y)
    assert torch.isnan(y64[m0, affected]).all(), "every output that reads the NaN must be NaN"
    assert_close(y[m0, ~affected], ref[m0, ~affected], torch.float32, "y[m0, unaffected]")
    others = [m for m in range(x.shape[0]) if m != m0]
    assert_close(y[others], ref[others], torch.float32, "y[other rows]")


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block", [(1, 4), (4, 1), (3, 5), (8, 36), (32, 32)])
def test_tvm_transposed_blocks_match_torch(gen, block, density):
    """The forward kernel reads W's blocks transposed, made by our own kernel; oracle:
    torch's transpose. An in-place update of the values (an optimizer step) must be seen."""
    from edgesparse.kernels.tvm.bsr_linear import transposed_values

    W = BSR.from_dense(randn((50, 70), gen, torch.float32), block, density=density)
    assert torch.equal(transposed_values(W), W.values.transpose(1, 2))
    W.values.mul_(-2.0)
    assert torch.equal(transposed_values(W), W.values.transpose(1, 2))


# ------------------------------------------------------------------ bad input (checked before dispatch)
@pytest.fixture
def small():
    w = torch.randn(13, 7)
    return BSR.from_dense(w, (4, 4)), torch.randn(5, 7)


def test_rejects_mismatched_k(small):
    W, _ = small
    with edgesparse.use_backend("reference"):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 7\]"):
            ops.bsr_linear(torch.randn(5, 8), W)
        with pytest.raises(ValueError, match=r"^x"):
            ops.bsr_linear(torch.tensor(1.0), W)


def test_rejects_x_not_a_tensor(small):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^x"):
        ops.bsr_linear(x.numpy(), W)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_rejects_x_dtype_different_from_w(small, dtype):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^x has dtype"):
        ops.bsr_linear(x.to(dtype), W)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["dense", "torch_sparse_bsr"])
def test_rejects_w_not_a_bsr(small, kind):
    _, x = small
    w = torch.randn(13, 7)
    W = w if kind == "dense" else torch.randn(16, 8).to_sparse_bsr((4, 4))
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^W must be an edgesparse.BSR"):
        ops.bsr_linear(x, W)


@pytest.mark.parametrize("shape", [(14,), (12,), (1, 13), (13, 1), ()], ids=str)
def test_rejects_bias_of_wrong_shape(small, shape):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match=r"^bias"):
        ops.bsr_linear(x, W, torch.randn(shape))


def test_rejects_bias_of_wrong_dtype(small):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(TypeError, match=r"^bias"):
        ops.bsr_linear(x, W, torch.randn(13, dtype=torch.float64))


def test_rejects_w_on_another_device(small):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match="W is on meta"):
        ops.bsr_linear(x, W.to("meta"))


def test_rejects_bias_on_another_device(small):
    W, x = small
    with edgesparse.use_backend("reference"), pytest.raises(ValueError, match=r"^bias is on meta"):
        ops.bsr_linear(x, W, torch.randn(13, device="meta"))
