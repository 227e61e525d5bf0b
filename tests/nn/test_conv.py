"""edgesparse.nn.SparseConv2d: equivalence (forward and every gradient) with a dense
nn.Conv2d holding the same masked weight, construction, state_dict round trips, bad
inputs, and sparsify on a conv net.

Oracle: a float64 nn.Conv2d whose weight is the test's own block mask applied to the
weight matrix [C_out, C_in*kh*kw], differentiated by torch's autograd; the weight
gradient is read at the kept blocks by tests/_oracle.blocks_in_mask_order.
"""

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import edgesparse
from edgesparse.nn import SparseConv2d, SparseLinear, sparsify
from tests._oracle import (
    forward_and_input_grad,
    assert_close,
    assert_pattern,
    blocks_in_mask_order,
    check_conv_against_dense,
    expand_mask,
    grid,
    randn,
    random_mask,
    to64,
    top_blocks_mask,
)

# (in_channels, out_channels, kernel_size, stride, padding, dilation, block); block None
# is the block-punched scheme (8 filters x 4 input channels x all kernel positions).
CASES = {
    "plain": (5, 12, 3, 1, 0, 1, (4, 9)),
    "stride2-pad1": (6, 8, 3, 2, 1, 1, (4, 4)),
    "dilation2": (4, 8, (3, 2), 1, (2, 1), 2, (4, 8)),
    "ragged-3x5": (5, 7, 3, 1, 1, 1, (3, 5)),
    "block-punched": (8, 16, 3, 1, 1, 1, None),
}
BATCH, HW = 2, (9, 8)


def matrix(conv: nn.Conv2d) -> torch.Tensor:
    """The conv weight as the matrix SparseConv2d blocks: [C_out, C_in*kh*kw]."""
    return conv.weight.detach().reshape(conv.out_channels, -1)


def masked_conv(case, gen):
    """(dense conv with the mask applied to its weight matrix, block, mask)."""
    c_in, c_out, kernel, stride, padding, dilation, block = case
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation)
    kh, kw = conv.kernel_size
    block = block or (8, 4 * kh * kw)
    mask = random_mask(*grid(tuple(matrix(conv).shape), block), 0.5, gen)
    with torch.no_grad():
        conv.weight.mul_(expand_mask(mask, block, tuple(matrix(conv).shape)).reshape(conv.weight.shape))
    return conv, block, mask


@pytest.mark.parametrize("backend", ["reference", "tvm"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_all_gradients_match_masked_dense_conv(case, backend, gen):
    conv, block, mask = masked_conv(case, gen)
    if case[-1] is None:
        layer = SparseConv2d.block_punched(conv)  # density=None keeps the mask's blocks
        assert layer.block == block == (8, 4 * conv.kernel_size[0] * conv.kernel_size[1])
    else:
        layer = SparseConv2d.from_dense(conv, block)
    assert_pattern(layer, mask)

    check_conv_against_dense(conv, layer, block, mask, randn((BATCH, conv.in_channels, *HW), gen), gen, backend)


def test_gradcheck_reference_fp64(gen):
    conv = nn.Conv2d(2, 3, 2, stride=2, padding=1, dilation=2, dtype=torch.float64)
    layer = SparseConv2d.from_dense(conv, (2, 3), density=0.5)
    x = randn((2, 2, 5, 4), gen, torch.float64).requires_grad_()
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, values, bias):
        return torch.func.functional_call(layer, {"values": values, "bias": bias}, (x,))

    with edgesparse.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, values, bias))


# ------------------------------------------------------------------ construction
def test_from_dense_keeps_the_top_blocks_and_copies_the_weights():
    conv = nn.Conv2d(5, 12, 3, padding=1)
    before = conv.weight.detach().clone()
    layer = SparseConv2d.from_dense(conv, (4, 9), density=0.3)
    mask = top_blocks_mask(matrix(conv), (4, 9), 0.3)
    assert_pattern(layer, mask)
    assert torch.equal(to64(layer.values), blocks_in_mask_order(to64(matrix(conv)), mask, (4, 9)))
    assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    with torch.no_grad():
        layer.values.add_(1.0)
    assert torch.equal(conv.weight, before), "from_dense must copy: the dense layer stays untouched"
    assert layer.shape == (12, 45) and layer.block == (4, 9)


def test_new_layer_keeps_the_top_blocks_of_a_conv_init():
    torch.manual_seed(3)
    expected = nn.Conv2d(4, 8, 3, bias=False)
    torch.manual_seed(3)
    layer = SparseConv2d(4, 8, 3, block=(8, 36), density=0.5, bias=False)
    assert_pattern(layer, top_blocks_mask(matrix(expected), (8, 36), 0.5))
    assert layer.bias is None and layer.values.requires_grad


def test_to_dense_is_the_equivalent_conv(gen):
    conv = nn.Conv2d(6, 8, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
    layer = SparseConv2d.from_dense(conv, (4, 6), 0.5)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    mask = top_blocks_mask(matrix(conv), (4, 6), 0.5)
    masked = to64(matrix(conv)) * expand_mask(mask, (4, 6), layer.shape)
    assert torch.equal(to64(matrix(dense)), masked)
    assert torch.equal(dense.bias, layer.bias) and dense.bias is not layer.bias
    x = randn((2, 6, 7, 9), gen)
    with edgesparse.use_backend("reference"):
        assert_close(layer(x), to64(dense(x)), torch.float32, "forward")


def test_valid_padding_is_no_padding(gen):
    conv = nn.Conv2d(4, 8, 3, padding="valid")
    layer = SparseConv2d.from_dense(conv, (4, 4), 1.0)
    assert layer.padding == (0, 0)
    x = randn((2, 4, 6, 5), gen)
    with edgesparse.use_backend("reference"):
        assert_close(layer(x), to64(conv(x)), torch.float32, "forward")


def test_extra_repr():
    layer = SparseConv2d(8, 16, 3, block=(8, 36), density=0.5, padding=1)
    assert repr(layer) == (
        "SparseConv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), "
        "block=(8, 36), nnz_blocks=2, density=0.500, bias=True)"
    )


# ------------------------------------------------------------------ state_dict
def test_state_dict_round_trip_restores_the_pattern(gen):
    torch.manual_seed(1)
    saved = SparseConv2d(5, 12, 3, (4, 9), 0.5, padding=1)
    torch.manual_seed(2)
    fresh = SparseConv2d(5, 12, 3, (4, 9), 0.25, padding=1)
    assert set(saved.state_dict()) == {"values", "bias", "row_offsets", "col_indices"}
    param = fresh.values
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)

    fresh.load_state_dict(torch.load(buffer))

    assert fresh.values is param and fresh.nnz_blocks == saved.nnz_blocks
    for mine, theirs in zip(fresh.index, saved.index):
        assert torch.equal(mine, theirs)
    assert torch.equal(fresh.values, saved.values) and torch.equal(fresh.bias, saved.bias)
    x = randn((2, 5, 6, 6), gen)
    for got, expected in zip(forward_and_input_grad(fresh, x), forward_and_input_grad(saved, x)):
        assert torch.equal(got, expected)


def test_load_rejects_a_pattern_of_another_shape():
    layer = SparseConv2d(5, 12, 3, (4, 9), 0.5)
    with pytest.raises(ValueError, match=r"inconsistent with this layer \(out_channels=12, in_channels\*kh\*kw=5\*3\*3=45, block=\(4, 9\)\): row_offsets must have 4 entries"):
        layer.load_state_dict(SparseConv2d(5, 16, 3, (4, 9), 0.5).state_dict())


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("shape", [(5, 6, 6), (1, 2, 5, 6, 6)], ids=["unbatched", "5-D"])
def test_input_must_be_4d(shape):
    with pytest.raises(ValueError, match=r"x must have shape \[B, C, H, W\] .*in_channels=5\), got"):
        SparseConv2d(5, 12, 3, (4, 9), 0.5)(torch.randn(shape))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"x must have shape \[B, 5, H, W\] \(in_channels=5\), got \(2, 4, 6, 6\)"):
        SparseConv2d(5, 12, 3, (4, 9), 0.5)(torch.randn(2, 4, 6, 6))


def test_input_smaller_than_the_kernel():
    layer = SparseConv2d(5, 12, 3, (4, 9), 0.5, dilation=2, padding=1)
    with pytest.raises(ValueError, match=r"padded to \(4, 8\), than the dilated kernel \(5, 5\)"):
        layer(torch.randn(2, 5, 2, 6))
    with edgesparse.use_backend("reference"):
        assert layer(torch.randn(2, 5, 3, 6)).shape == (2, 12, 1, 4), "a kernel that just fits"


@pytest.mark.parametrize("block", [(16, 4), (4, 46)])
def test_block_larger_than_the_weight_matrix(block):
    with pytest.raises(ValueError, match=r"block=\(\d+, \d+\) is larger than the layer: .*\[out_channels=12, in_channels\*kh\*kw=5\*3\*3=45\]"):
        SparseConv2d.from_dense(nn.Conv2d(5, 12, 3), block, 0.5)


@pytest.mark.parametrize(
    "build, error, message",
    [
        pytest.param(lambda: SparseConv2d(4, 8, 3, (4, 4), 0.5, groups=2), NotImplementedError,
                     "groups=2: SparseConv2d supports groups=1 only", id="groups"),
        pytest.param(lambda: SparseConv2d.from_dense(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), 4, 0.5),
                     NotImplementedError, "padding_mode='reflect'", id="padding-mode"),
        pytest.param(lambda: SparseConv2d.from_dense(nn.Conv2d(4, 8, 3, padding="same"), 4, 0.5),
                     NotImplementedError, "padding='same'", id="padding-same"),
        pytest.param(lambda: SparseConv2d.block_punched(nn.Linear(4, 8)), TypeError,
                     "conv must be an nn.Conv2d, got Linear", id="not-a-conv"),
    ],
)
def test_unsupported_sources(build, error, message):
    with pytest.raises(error, match=message):
        build()


# ------------------------------------------------------------------ sparsify
def conv_net():
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), act0=nn.ReLU(),
        conv1=nn.Conv2d(8, 16, 3, stride=2, padding=1), act1=nn.ReLU(),
        conv2=nn.Conv2d(16, 16, 3, padding=1), act2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(16, 10),
    ))


def test_sparsify_swaps_every_conv_but_the_first(gen):
    model = conv_net()
    dense = {name: model.get_submodule(name) for name in ("stem", "conv1", "conv2")}
    punched = {"block": (8, 36), "density": 0.5}  # 8 filters x 4 channels x 3x3
    sparsify(model, {"default": punched, "stem": None, "head": None})
    assert model.stem is dense["stem"] and type(model.head) is nn.Linear
    for name in ("conv1", "conv2"):
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseConv2d) and layer.block == (8, 36), name
        assert layer.stride == dense[name].stride and layer.padding == dense[name].padding
        blocks = math.prod(grid(tuple(matrix(dense[name]).shape), (8, 36)))
        assert layer.nnz_blocks == math.floor(0.5 * blocks + 0.5)
        assert_pattern(layer, top_blocks_mask(matrix(dense[name]), (8, 36), 0.5))

    expected = copy.deepcopy(model)
    for name in ("conv1", "conv2"):
        setattr(expected, name, model.get_submodule(name).to_dense())
    x = randn((2, 3, 8, 8), gen)
    with edgesparse.use_backend("reference"):
        assert_close(model(x), to64(expected(x)), torch.float32, "sparsified net")


def test_sparsify_passes_over_grouped_convs_unless_named():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 8))
    grouped = model[0]
    sparsify(model, {"default": {"block": 4, "density": 0.5}})
    assert model[0] is grouped and type(model[1]) is SparseConv2d and type(model[3]) is SparseLinear
    with pytest.raises(NotImplementedError, match=r"groups=2: SparseConv2d supports groups=1 only; config\['0'\] names a Conv2d"):
        sparsify(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), {"0": {"block": 4, "density": 0.5}})
