"""SparseConv2d on the TVM backend: the implicit-GEMM custom op edgesparse::sparse_conv2d
(edgesparse/nn/conv_functional.py over edgesparse/kernels/tvm/bsr_conv2d.py), which
reads the unfolded rows through index tables instead of building them.

Oracle: a float64 nn.Conv2d holding the test's own masked weight, differentiated by
torch's autograd (forward, input, weight and bias gradients); the weight gradient is
read at the kept blocks by tests/_oracle.blocks_in_mask_order. Every test here makes
the im2col path raise, so a pass proves the direct path computed the result.
"""

import copy
import math

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse.nn import SparseConv2d, conv_functional, modules
from tests._oracle import assert_close, assert_pattern, blocks_in_mask_order, expand_mask, grid, mask_with_empty_lines
from tests._oracle import check_conv_against_dense, compile_training_step, padded, random_mask, randn, to64


_IM2COL = modules._im2col


@pytest.fixture(autouse=True)
def _no_im2col(monkeypatch):
    def im2col(*args, **kwargs):
        raise AssertionError("the TVM backend must take the direct (implicit im2col) path")

    monkeypatch.setattr(modules, "_im2col", im2col)


# (in_channels, out_channels, kernel_size, stride, padding, dilation, block, density, batch, (H, W));
# block None is the block-punched scheme (8 filters x 4 input channels x all positions).
# Few distinct blocks: each block shape (and geometry) builds its own kernels.
CASES = {
    "3x3-s1-p1-K45-not-multiple-of-bk": (5, 12, 3, 1, 1, 1, (4, 8), 0.5, 2, (9, 8)),
    "3x3-s2-p0": (6, 8, 3, 2, 0, 1, (4, 8), 0.5, 2, (9, 8)),
    "3x2-s2-p2-dilation2": (4, 8, (3, 2), 2, 2, 2, (4, 8), 0.5, 2, (7, 9)),
    "1x3-mixed-stride-padding-dilation": (3, 7, (1, 3), (1, 2), (0, 2), (2, 1), (3, 5), 0.6, 2, (5, 11)),
    "5x5-p2-ragged-N": (3, 10, 5, 1, 2, 1, (3, 5), 0.5, 2, (6, 6)),
    "block-punched": (8, 16, 3, 1, 1, 1, None, 0.5, 2, (6, 7)),
    "batch1": (5, 12, 3, 1, 1, 1, (4, 8), 0.5, 1, (5, 5)),
    "density0": (5, 12, 3, 1, 1, 1, (4, 8), 0.0, 2, (5, 6)),
    "density1": (5, 12, 3, 2, 1, 1, (4, 8), 1.0, 2, (5, 6)),
    "1x1": (10, 9, 1, 1, 0, 1, (4, 8), 0.5, 2, (4, 5)),
}

def masked_conv(case, mask_fn, gen):
    """(float32 nn.Conv2d with the block mask applied to its weight matrix, block, mask)."""
    c_in, c_out, kernel, stride, padding, dilation, block, density = case[:8]
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation)
    kh, kw = conv.kernel_size
    block = block or (8, 4 * kh * kw)
    shape = (c_out, c_in * kh * kw)
    mask = mask_fn(*grid(shape, block), density, gen)
    with torch.no_grad():
        conv.weight.copy_(randn(tuple(conv.weight.shape), gen))  # not the init's tiny scale
        conv.weight.mul_(expand_mask(mask, block, shape).reshape(conv.weight.shape))
        conv.bias.copy_(randn((c_out,), gen))
    return conv, block, mask


def check_against_dense(conv, layer, block, mask, x, gen):
    """Forward and every gradient of ``layer`` on the TVM backend (the direct path) against the float64 oracle."""
    check_conv_against_dense(conv, layer, block, mask, x, gen, "tvm")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_direct_path_matches_masked_dense_conv(case, gen):
    conv, block, mask = masked_conv(case, random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    assert_pattern(layer, mask)
    batch, hw = case[8:]
    check_against_dense(conv, layer, block, mask, randn((batch, conv.in_channels, *hw), gen), gen)


@pytest.mark.parametrize("case", ["3x3-s1-p1-K45-not-multiple-of-bk", "block-punched"])
def test_empty_block_rows_and_columns(case, gen):
    conv, block, mask = masked_conv(CASES[case], lambda nb, kb, _d, g: mask_with_empty_lines(nb, kb, g)[0], gen)
    layer = SparseConv2d.from_dense(conv, block)
    assert_pattern(layer, mask)
    check_against_dense(conv, layer, block, mask, randn((2, conv.in_channels, 6, 5), gen), gen)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_input_layouts(layout, gen):
    conv, block, mask = masked_conv(CASES["3x2-s2-p2-dilation2"], random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    x = randn((3, conv.in_channels, 7, 9), gen)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x[1:, :, :, 1:]
    check_against_dense(conv, layer, block, mask, x, gen)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_input_gradient_takes_the_inputs_layout(channels_last, gen):
    """dx comes back in x's memory layout (the raw gradient, before autograd's layout
    contract could copy it), with the float64 dense conv's values."""
    conv, block, mask = masked_conv(CASES["3x3-s1-p1-K45-not-multiple-of-bk"], random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    x = randn((2, conv.in_channels, 9, 8), gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = randn((2, conv.out_channels, 9, 8), gen)
    with edgesparse.use_backend("tvm"):
        (dx,) = torch.autograd.grad(layer(x), x, dy)
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x64 = to64(x.detach()).requires_grad_()
    (expected,) = torch.autograd.grad(copy.deepcopy(conv).double()(x64), x64, to64(dy))
    assert_close(dx, expected, torch.float32, "grad-input")


def test_output_is_channels_last(gen):
    """The kernel's rows [B*OH*OW, C_out] are a channels-last image: returned without a copy."""
    layer = SparseConv2d(4, 8, 3, (4, 8), 0.5, padding=1)
    with edgesparse.use_backend("tvm"):
        y = layer(randn((2, 4, 5, 5), gen))
    assert y.shape == (2, 8, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)


def test_frozen_weight_and_input_without_grad(gen):
    conv, block, mask = masked_conv(CASES["3x3-s2-p0"], random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    layer.values.requires_grad_(False)
    x = randn((2, conv.in_channels, 9, 8), gen)
    with edgesparse.use_backend("tvm"):
        layer(x).sum().backward()
    x64 = to64(x)
    oracle = copy.deepcopy(conv).double()
    oracle(x64).sum().backward()
    assert layer.values.grad is None
    assert_close(layer.bias.grad, oracle.bias.grad, torch.float32, "grad bias")


# ------------------------------------------------------------------ gradient masking
@pytest.mark.parametrize("granularity", ["block", "element"])
def test_gradient_masking_on_the_direct_path(granularity, gen):
    """The mask is chosen from a full gradient, then the cached mask's blocks alone are
    computed: both passes must equal the oracle's gradient restricted to the top-k."""
    conv, block, mask = masked_conv(CASES["block-punched"], random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    x = randn((2, conv.in_channels, 6, 7), gen)
    oracle = copy.deepcopy(conv).double()
    oracle(to64(x)).square().sum().backward()
    full = blocks_in_mask_order(oracle.weight.grad.reshape(conv.out_channels, -1), mask, block)
    if granularity == "block":
        keep = full.flatten(1).norm(dim=1).topk(math.ceil(0.5 * layer.nnz_blocks)).indices
        expected = torch.zeros_like(full)
        expected[keep] = full[keep]
    else:
        chosen = full.abs().flatten().topk(math.ceil(0.3 * full.numel())).indices
        expected = torch.zeros(full.numel(), dtype=full.dtype)
        expected[chosen] = full.flatten()[chosen]
        expected = expected.view(full.shape)
    layer.mask_gradients(0.5 if granularity == "block" else 0.3, refresh_every=5, granularity=granularity)
    for step in range(2):  # 0: refresh on a full gradient; 1: the cached mask, sub-pattern only
        layer.values.grad = None
        with edgesparse.use_backend("tvm"):
            layer(x).square().sum().backward()
        assert_close(layer.values.grad, expected, torch.float32, f"masked gradient, pass {step}")
    assert layer.gradient_mask is not None


def test_dense_grad_scores_take_the_im2col_path_once(gen, monkeypatch):
    """Scoring the dense gradient reads the unfolded rows: that one step runs im2col, and
    the scores are the block norms of the oracle's dense weight gradient."""
    calls = []
    monkeypatch.setattr(modules, "_im2col", lambda *args: calls.append(1) or _IM2COL(*args))
    conv, block, mask = masked_conv(CASES["3x3-s2-p0"], random_mask, gen)
    layer = SparseConv2d.from_dense(conv, block)
    x = randn((2, conv.in_channels, 9, 8), gen)
    oracle = copy.deepcopy(conv).double()
    oracle(to64(x)).square().sum().backward()
    layer.request_dense_grad_scores()
    with edgesparse.use_backend("tvm"):
        layer(x).square().sum().backward()
        assert len(calls) == 1
        layer(x).square().sum().backward()
    assert len(calls) == 1, "the next step is direct again"
    dense_grad = oracle.weight.grad.reshape(conv.out_channels, -1)
    (bn, bk), (nb, kb) = block, grid(tuple(dense_grad.shape), block)
    expected = padded(dense_grad, block).reshape(nb, bn, kb, bk).square().sum((1, 3)).sqrt()
    assert_close(layer.dense_grad_scores, expected, torch.float32, "dense_grad_scores")


# ------------------------------------------------------------------ torch.compile
def test_compiled_training_step_has_no_graph_break(gen):
    model = nn.Sequential(SparseConv2d(4, 8, 3, (4, 8), 0.5, padding=1), nn.ReLU(), SparseConv2d(8, 4, 3, (4, 8), 0.5, stride=2))
    x, target = randn((2, 4, 6, 6), gen), randn((2, 4, 2, 2), gen)
    (loss_c, grads_c), (loss_e, grads_e), targets = compile_training_step(model, x, target, "tvm")
    ops = ("sparse_conv2d", "sparse_conv2d_grad_input", "sparse_conv2d_grad_weight")
    assert {f"edgesparse.{op}.default" for op in ops} <= targets
    torch.testing.assert_close(loss_c, loss_e)
    for got, expected in zip(grads_c, grads_e):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_argument():
    layer = SparseConv2d(4, 8, 3, (4, 4), 0.5)
    args = (layer.values, layer.index, layer.shape, layer.bias)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \[B, C, H, W\] with C\*kh\*kw = 36"):
        conv_functional.sparse_conv2d(torch.randn(2, 3, 5, 5), *args, 3)
    with pytest.raises(TypeError, match=r"x and values must be float32 CPU tensors, got x torch.float64"):
        conv_functional.sparse_conv2d(x.double(), *args, 3)
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"):
        conv_functional.sparse_conv2d(x, *args, (3, 3, 3))
    with pytest.raises(ValueError, match=r"stride and dilation must be >= 1 and padding >= 0"):
        conv_functional.sparse_conv2d(x, *args, 3, stride=0)
    with pytest.raises(ValueError, match=r"padded to \(2, 2\), than the dilated kernel \(3, 3\)"):
        conv_functional.sparse_conv2d(torch.randn(2, 4, 2, 2), *args, 3)
