"""The FLOP counter against hand counts on small MLPs."""

import math

import torch
from torch import nn

from edgesparse.cl.flops import FlopCounter
from edgesparse.cl.model import build_mlp
from edgesparse.models import MLP


def test_dense_mlp_hand_count():
    model = MLP([8, 16, 4])  # layers 16x8 and 4x16
    counter = FlopCounter(model)
    counter.enabled = True
    model(torch.randn(5, 8)).sum().backward()
    assert counter.forward == 2 * (16 * 8 + 4 * 16) * 5
    # Layer 0: grad-weight only (its input needs no gradient); layer 1: grad-input and grad-weight.
    assert counter.backward == 2 * 16 * 8 * 5 + 2 * 2 * 4 * 16 * 5


def test_sparse_layer_counts_its_stored_blocks():
    torch.manual_seed(0)
    model = build_mlp(8, 4, [32, 32], densities=[0.25], block=(8, 8))  # 32x32 in 8x8 blocks: 16, keeps 4
    assert model.layers[1].nnz_blocks == 4
    counter = FlopCounter(model)
    counter.enabled = True
    model(torch.randn(3, 8)).sum().backward()
    dense_fwd = 32 * 8 + 4 * 32
    assert counter.forward == 2 * (dense_fwd + 4 * 64) * 3
    assert counter.backward == 2 * 3 * (32 * 8 + 2 * 4 * 64 + 2 * 4 * 32)


def test_gradient_masking_counts_the_blocks_computed():
    torch.manual_seed(0)
    model = build_mlp(8, 4, [64, 64], densities=[0.5], block=(8, 8))  # 64 blocks, keeps 32
    sparse = model.layers[1]
    sparse.mask_gradients(0.25, refresh_every=10)
    counter = FlopCounter(model)
    counter.enabled = True
    x = torch.randn(2, 8)
    model(x).sum().backward()  # the refresh: every block's gradient is computed
    first = counter.backward
    model(x).sum().backward()  # then only the kept quarter: ceil(0.25 * 32) = 8 blocks
    kept = math.ceil(0.25 * 32)
    assert first - (counter.backward - first) == 2 * 2 * (32 - kept) * 64


def test_frozen_prefix_and_evaluation_count_forward_only():
    model = MLP([8, 16, 16, 4])
    counter = FlopCounter(model)
    counter.enabled = True
    model.freeze_prefix(1)
    model(torch.randn(2, 8)).sum().backward()
    assert counter.forward == 2 * 2 * (16 * 8 + 16 * 16 + 4 * 16)
    # Layer 0 frozen: nothing; layer 1: grad-weight only (its input carries no graph); layer 2: both.
    assert counter.backward == 2 * 2 * (16 * 16 + 2 * 4 * 16)
    assert model.layers[0].weight.grad is None
    before = counter.total
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert counter.total - before == 2 * 2 * (16 * 8 + 16 * 16 + 4 * 16)


def test_disabled_counter_counts_nothing():
    model = nn.Sequential(nn.Linear(3, 3))
    counter = FlopCounter(model)
    model(torch.randn(1, 3)).sum().backward()
    assert counter.total == 0
