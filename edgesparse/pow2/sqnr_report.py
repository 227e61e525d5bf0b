"""SQNR of the W = C·B decomposition on trained layers, beside plain power-of-two rounding.

    python -m edgesparse.pow2.sqnr_report [--epochs 40] [--seed 0]

Trains an MLP 64-256-256-10 on scikit-learn's digits (8x8 images, 1797 samples; 1438 to
train, 359 to test) with Adam, then, for its two hidden layers at 0%, 40% and 70% row
sparsity, prints the reconstruction SQNR of

- plain: each weight rounded to s·2^e, s the (output row, chunk) maximum
  (``decompose(..., iterations=0)``), on the same pruned rows;
- C·B:  SmartDeal's alternating decomposition (50 rounds at most);

and the test accuracy with that one layer replaced by each (the dense model's beside).
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .decompose import decompose

SPARSITIES = (0.0, 0.4, 0.7)


def digits_split(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def train_mlp(train, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train
    for epoch in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            print(f"sqnr_report: trained {epoch + 1}/{epochs} epochs", file=sys.stderr, flush=True)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def accuracy_with(model: nn.Sequential, index: int, weight: torch.Tensor, data) -> float:
    original = model[index].weight.clone()
    model[index].weight.copy_(weight)
    try:
        return accuracy(model, data)
    finally:
        model[index].weight.copy_(original)


def report(epochs: int = 40, seed: int = 0) -> str:
    train, test = digits_split(seed)
    model = train_mlp(train, epochs, seed)
    lines = [
        f"MLP 64-256-256-10 trained {epochs} epochs on sklearn digits: test accuracy {accuracy(model, test):.3f}",
        f"{'layer':<14}{'row sparsity':>13}{'plain dB':>10}{'C·B dB':>9}{'gain dB':>9}{'acc plain':>11}{'acc C·B':>9}{'ALS rounds':>12}",
    ]
    for index, name in ((0, "fc1 256x64"), (2, "fc2 256x256")):
        w = model[index].weight.detach()
        for sparsity in SPARSITIES:
            print(f"sqnr_report: {name} at {sparsity:.0%}", file=sys.stderr, flush=True)
            plain = decompose(w, sparsity, iterations=0)
            fitted = decompose(w, sparsity)
            lines.append(
                f"{name:<14}{sparsity:>12.0%} {plain.sqnr_db:>10.2f}{fitted.sqnr_db:>9.2f}{fitted.sqnr_db - plain.sqnr_db:>9.2f}"
                f"{accuracy_with(model, index, plain.weight.to_dense(), test):>11.3f}"
                f"{accuracy_with(model, index, fitted.weight.to_dense(), test):>9.3f}{fitted.iterations:>12d}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(report(args.epochs, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
