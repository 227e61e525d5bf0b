"""DER++'s loss against the formula computed by hand (Buzzega et al.: current-batch
cross-entropy + α·MSE to a stored logit vector + β·cross-entropy on a stored label)."""

import math

import pytest
import torch
from torch import nn

from edgesparse.cl.buffer import ReservoirBuffer
from edgesparse.cl.strategies import Strategy


def _identity_model(n: int) -> nn.Module:
    model = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(n))
    return model  # logits = inputs, so every term below is a closed form


@pytest.mark.parametrize("alpha, beta", [(0.1, 0.5), (0.0, 1.0), (0.3, 2.0)])
def test_derpp_loss_is_ce_plus_alpha_mse_plus_beta_ce(alpha, beta):
    gen = torch.Generator().manual_seed(0)
    buffer = ReservoirBuffer(1, 3, 3)  # one stored example: both replay draws return it
    stored_x, stored_logits = torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, -1.0]])
    buffer.add(stored_x, torch.tensor([2]), stored_logits, task=0, gen=gen)
    strategy = Strategy("derpp", buffer, buffer_batch=1, alpha=alpha, beta=beta)
    x, y = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([0])
    out = strategy.step(_identity_model(3), x, y, classes=[0, 1], seen=[0, 1], gen=gen)
    # Current batch: class 2 is unseen and masked, so CE over logits (1, 0) for class 0.
    current = math.log(1 + math.exp(-1.0))
    # Replayed logits (0, 2, 0) against the stored (1, 1, -1): squared errors 1, 1, 1.
    mse = 1.0
    # Replayed label 2 over all classes: -log(e^0 / (1 + e^2 + 1)).
    replay_ce = math.log(2 + math.exp(2.0))
    assert out.loss.item() == pytest.approx(current + alpha * mse + beta * replay_ce, rel=1e-6)
    assert out.samples == 3
