"""The model families the benchmarks and the continual-learning runs train: a plain
MLP and the CIFAR-style ResNet-18 (3x3 stem, no max-pool, stages of 64-128-256-512
channels on 32-16-8-4 pixel maps for a 32x32 input)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP", "ResNet18", "resnet18_sparse_config"]


class MLP(nn.Module):
    """Linear layers ``layers[i]`` of the given ``widths`` (input first, classes last),
    ReLU between them; inputs of any shape are flattened.

    ``frozen`` (SpFDE's progressive freezing, :meth:`freeze_prefix`) is the number of
    leading layers run without autograd: their output is computed under
    ``torch.no_grad`` and carries no graph, so backward stops at the first trained
    layer and no gradient of any kind is computed for the frozen prefix.
    """

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        widths = list(widths)
        if len(widths) < 2 or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ValueError(f"widths must be at least two positive ints (input, ..., classes), got {widths}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.frozen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        last = len(self.layers) - 1
        with torch.no_grad():
            for layer in self.layers[: self.frozen]:
                x = F.relu(layer(x))
        for i, layer in enumerate(self.layers[self.frozen :], start=self.frozen):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x

    def freeze_prefix(self, n: int) -> None:
        """Freeze the first ``n`` layers: weights, bias and pattern stay as they are, their
        parameters stop requiring gradients (so optimizers skip them)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(self.layers):
            raise ValueError(f"n must be an int in [0, {len(self.layers) - 1}] (the classifier is never frozen), got {n!r}")
        self.frozen = n
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                p.requires_grad_(i >= n)
                if i < n:
                    p.grad = None


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (the CIFAR variant SparCL trains): 3x3 stem ``conv1``,
    four stages ``layer1``..``layer4`` of two basic blocks, global average pool and the
    classifier ``linear``. ``width`` scales every stage (64 is the standard network;
    the "reduced" ResNet-18 of the continual-learning literature uses 20)."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18_sparse_config(scheme) -> dict:
    """A :func:`~edgesparse.nn.sparsify` config giving every 3x3 conv of the stages
    ``scheme``; the stem, the 1x1 shortcuts and the classifier stay dense (as in SparCL)."""
    return {r"re:layer\d\.\d\.conv[12]": scheme, "default": None}
