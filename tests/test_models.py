"""edgesparse.models: the benchmark / continual-learning model families."""

import pytest
import torch
from torch import nn

from edgesparse.models import MLP, ResNet18, resnet18_sparse_config
from edgesparse.nn import SparseConv2d, SparseScheme, sparse_layers, sparsify


def test_mlp_matches_its_dense_layers():
    model = MLP([12, 7, 3])
    assert [(m.in_features, m.out_features) for m in model.layers] == [(12, 7), (7, 3)]
    x = torch.randn(5, 3, 4)  # inputs are flattened
    expected = model.layers[1](torch.relu(model.layers[0](x.flatten(1))))
    torch.testing.assert_close(model(x), expected)


def test_mlp_frozen_prefix_gets_no_gradient_and_same_output():
    model = MLP([6, 5, 4, 3])
    x = torch.randn(2, 6)
    before = model(x).detach()
    model.freeze_prefix(2)
    out = model(x)
    torch.testing.assert_close(out, before)
    out.sum().backward()
    assert all(p.grad is None for layer in model.layers[:2] for p in layer.parameters())
    assert model.layers[2].weight.grad is not None
    with pytest.raises(ValueError, match="the classifier is never frozen"):
        model.freeze_prefix(3)


@pytest.mark.parametrize("widths", [[5], [4, 0], [4, 2.5]])
def test_mlp_rejects_bad_widths(widths):
    with pytest.raises(ValueError, match="widths must be"):
        MLP(widths)


def test_resnet18_shapes_and_its_sparse_config():
    model = ResNet18(num_classes=7, width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    convs3x3 = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3x3) == 17  # the stem and 4 stages x 2 blocks x 2 convs
    sparse = sparsify(model, resnet18_sparse_config(SparseScheme((8, 8), 0.5)))
    names = [name for name, _ in sparse_layers(sparse)]
    assert names == [n for n in convs3x3 if n != "conv1"]
    assert all(isinstance(m, SparseConv2d) for _, m in sparse_layers(sparse))
    assert sparse(torch.randn(2, 3, 32, 32)).shape == (2, 7)
