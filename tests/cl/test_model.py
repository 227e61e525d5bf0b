"""The CL trainer's model: build_mlp's initial weights.

Oracle: the same seed's torch.nn.Linear layers built directly (torch's default
initialisation), scaled by hand, and the kept blocks chosen by their norms computed here.
"""

import pytest
import torch
from torch import nn

from edgesparse.cl.model import build_mlp

WIDTHS = [6, 32, 32, 32, 3]  # input, three hidden, classes: two hidden-to-hidden layers


def torch_default_layers(seed):
    torch.manual_seed(seed)
    return [nn.Linear(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]


@pytest.mark.parametrize("gain", [1.0, 1.5])
def test_dense_init_scales_only_the_hidden_to_hidden_weights(gain):
    expected = torch_default_layers(3)
    torch.manual_seed(3)
    model = build_mlp(WIDTHS[0], WIDTHS[-1], WIDTHS[1:-1], init_gain=gain)
    for i, (got, ref) in enumerate(zip(model.layers, expected)):
        scale = gain if 0 < i < len(expected) - 1 else 1.0
        torch.testing.assert_close(got.weight, ref.weight * scale, rtol=0, atol=0)
        torch.testing.assert_close(got.bias, ref.bias, rtol=0, atol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_init_keeps_the_largest_blocks_of_the_scaled_weights(rescale):
    gain, density, block = 1.5, 0.25, (8, 8)
    expected = torch_default_layers(5)
    torch.manual_seed(5)
    model = build_mlp(WIDTHS[0], WIDTHS[-1], WIDTHS[1:-1], densities=[density] * 2, block=block,
                      rescale=rescale, init_gain=gain)
    for i in (1, 2):
        w = expected[i].weight.detach() * gain
        norms = w.reshape(4, 8, 4, 8).pow(2).sum((1, 3))  # 32 x 32 in 8 x 8 blocks
        keep = torch.zeros(16, dtype=torch.bool)
        keep[norms.flatten().argsort(descending=True)[:4]] = True  # 25% of 16 blocks
        dense = model.layers[i].weight_bsr().to_dense().detach()
        mask = keep.view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
        torch.testing.assert_close(dense, w * mask * (density ** -0.5 if rescale else 1.0))
    torch.testing.assert_close(model.layers[0].weight, expected[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.layers[3].weight, expected[3].weight, rtol=0, atol=0)


@pytest.mark.parametrize("gain", [0.0, -1.0, float("nan")])
def test_a_gain_that_is_not_positive_is_rejected(gain):
    with pytest.raises(ValueError, match="init_gain must be positive"):
        build_mlp(WIDTHS[0], WIDTHS[-1], WIDTHS[1:-1], init_gain=gain)
