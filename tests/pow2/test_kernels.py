"""edgesparse.pow2 products (forward, grad-input, grad-weight) on every backend.

Oracle: W, C and B rebuilt in float64 by a loop over blocks (tests/pow2/_pow2_oracle.py),
dense torch products, and torch autograd through C·B for dC and dB. The decode test is
exact: with B = I and one-hot inputs the products return C's values themselves.
"""

import math

import pytest
import torch

import edgesparse
from edgesparse.pow2 import Pow2Weight, pow2_linear, pow2_linear_grad_input, pow2_linear_grad_weight
from tests._oracle import assert_close, mask_with_empty_lines, random_mask, randn, to64
from tests.pow2._pow2_oracle import basis_layout, blocks_of_C, code_value, dense_oracle, random_pow2_weight

SHAPE = (67, 131)  # N, K: 131 = 43 rows of 3 + 2 columns
SMALL = (23, 40)  # for a group of 5 (many block rows: slow under the Triton interpreter)


def make(gen, device, group=32, chunk_rows=8, density=0.5, empty_lines=False, shape=SHAPE, exp_range=(-7, 5), basis_scale=0.5):
    nb, r = math.ceil(shape[0] / group), math.ceil(shape[1] / 3)
    mask = mask_with_empty_lines(nb, r, gen)[0] if empty_lines else random_mask(nb, r, density, gen)
    return random_pow2_weight(shape, group, chunk_rows, mask, gen, exp_range=exp_range, basis_scale=basis_scale, device=device)


@pytest.mark.parametrize("group, rows", [(32, 1), (32, 37), (32, 70), (5, 8)])
def test_forward_and_grad_input(backend, device, gen, group, rows):
    """Group 5: narrower than a vector and than Triton's 16-lane minimum; empty block rows
    and columns. 70 rows: the TVM forward decodes the blocks once (DECODE_ONCE_ROWS)."""
    shape = SHAPE if group == 32 else SMALL
    W = make(gen, device, group=group, empty_lines=group == 5, shape=shape)
    w64, _, _ = dense_oracle(W)
    x = randn((rows, shape[1]), gen, device=device)
    bias = randn((shape[0],), gen, device=device)
    dy = randn((2, rows, shape[0]), gen, device=device)  # batched: flattened by the op
    with edgesparse.use_backend(backend):
        y = pow2_linear(x, W, bias)
        dx = pow2_linear_grad_input(dy, W)
    assert_close(y, to64(x) @ w64.T + to64(bias), torch.float32, "y")
    assert_close(dx, to64(dy) @ w64, torch.float32, "dx")


def test_forward_with_a_basis_too_large_to_prescale(backend, device, gen):
    """|B| up to 2^13: the TVM forward cannot fold all of 2^(e_min + 126) into B (it
    would reach 2^127 from |B| = 2^(1 - e_min) on) and applies the rest to the output."""
    W = make(gen, device, basis_scale=2.0 ** 13)
    assert float(W.basis.abs().max()) * 2.0 ** (W.exp_range[0] + 126) > torch.finfo(torch.float32).max
    w64, _, _ = dense_oracle(W)
    x = randn((11, SHAPE[1]), gen, device=device)
    bias = randn((SHAPE[0],), gen, device=device)
    with edgesparse.use_backend(backend):
        y = pow2_linear(x, W, bias)
    assert_close(y, to64(x) @ w64.T + to64(bias), torch.float32, "y")


@pytest.mark.parametrize("group", [32, 5])
def test_grad_weight_is_the_straight_through_gradient_of_C_and_the_gradient_of_B(backend, device, gen, group):
    shape = SHAPE if group == 32 else SMALL
    W = make(gen, device, group=group, shape=shape)
    x = randn((37, shape[1]), gen, device=device)
    dy = randn((37, shape[0]), gen, device=device)
    w64, C64, B64 = dense_oracle(W, requires_grad=True)
    (to64(x) @ w64.T).backward(to64(dy))
    with edgesparse.use_backend(backend):
        dC, dB = pow2_linear_grad_weight(dy, x, W)
    assert_close(dC, blocks_of_C(C64.grad, W), torch.float32, "dC")
    assert_close(dB, basis_layout(B64.grad, W), torch.float32, "dB")


@pytest.mark.parametrize("exp_range", [(-7, 5), (-126, -112), (113, 127)])
def test_decode_in_the_kernels_is_bit_exact(backend, device, gen, exp_range):
    """B = I per row and chunk, x = I: y[k, n] = W[n, k] = C's code value, exactly. The
    exponent ranges reach both ends of float32's normal numbers (the TVM decode scales
    by 2^(e_min + 126), which past e_min = 1 takes two factors)."""
    W = make(gen, device, density=0.7, shape=SMALL, exp_range=exp_range)
    eye_basis = torch.eye(3).reshape(1, 1, 3, 3, 1).expand_as(W.basis).contiguous().to(device)
    W = Pow2Weight.from_index(W.words, eye_basis, W.index, W.shape, W.chunk_rows, W.exp_range)
    expected, _, _ = dense_oracle(W)
    with edgesparse.use_backend(backend):
        y = pow2_linear(torch.eye(SMALL[1], device=device), W)
        y_many = pow2_linear(torch.eye(SMALL[1], device=device).repeat(2, 1), W)  # 80 rows: decoded once on tvm
        dx = pow2_linear_grad_input(torch.eye(SMALL[0], device=device), W)
    expected32 = expected.float()
    assert torch.equal(y.T.cpu(), expected32), "forward decode differs from the code values"
    assert torch.equal(y_many[SMALL[1]:].T.cpu(), expected32), "forward decode (many rows) differs from the code values"
    assert torch.equal(dx.cpu(), expected32), "grad-input decode differs from the code values"
    # the oracle itself is the definition, value by value
    assert float(expected32.abs().max()) == max(abs(code_value(int(c), exp_range[0])) for c in W.codes.flatten().cpu())


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_batch_and_extreme_densities(backend, device, gen, density):
    W = make(gen, device, density=density)
    w64, _, _ = dense_oracle(W)
    x = randn((5, SHAPE[1]), gen, device=device)
    with edgesparse.use_backend(backend):
        y = pow2_linear(x, W)
        empty = pow2_linear(x[:0], W)
        dC, dB = pow2_linear_grad_weight(randn((0, SHAPE[0]), gen, device=device), x[:0], W)
    assert_close(y, to64(x) @ w64.T, torch.float32, "y")
    assert empty.shape == (0, SHAPE[0])
    assert not dC.any() and not dB.any() and dC.shape == (W.nnz_blocks, 3, W.group) and dB.shape == W.basis.shape


def test_bad_operands_are_rejected(gen):
    W = make(gen, "cpu")
    x = randn((4, SHAPE[1]), gen)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 131\]"):
        pow2_linear(x[:, :-1], W)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but W has torch.float32"):
        pow2_linear(x.double(), W)
    with pytest.raises(TypeError, match="W must be an edgesparse.pow2.Pow2Weight"):
        pow2_linear(x, W.to_bsr())
    with pytest.raises(ValueError, match=r"bias must have shape \(67,\)"):
        pow2_linear(x, W, torch.zeros(1, SHAPE[0]))
    with pytest.raises(ValueError, match="same number of rows"):
        pow2_linear_grad_weight(randn((3, SHAPE[0]), gen), x, W)
