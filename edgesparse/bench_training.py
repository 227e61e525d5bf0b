"""The end-to-end section of ``edgesparse bench``: whole training steps and conv layers,
sparse modules against the dense model they were made from, measured in one run.

Each case times the dense model and its sparsified copy with the same inputs, taking
turns within each round (``bench._median_times``). A row also gives the FLOP ratio
(dense FLOPs / sparse FLOPs of the timed work, from the nonzeros actually stored):
the speed-up the FLOP count promises. Measured speed-up over FLOP ratio is how much of
that promise the kernels keep.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .models import MLP, ResNet18, resnet18_sparse_config
from .nn import SparseConv2d, SparseLinear, SparseScheme, sparsify


@dataclass(frozen=True)
class TrainingCase:
    name: str
    what: str  # "step": forward + loss + backward + SGD step; "fwd+bwd": a layer's forward and backward
    build: Callable[[torch.Generator], Tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]]


@dataclass
class TrainingRow:
    name: str
    what: str
    dense_ms: float
    sparse_ms: float
    speedup: float
    flop_ratio: float


def _mlp(widths, sparse_layers, block, density, batch):
    def build(gen):
        dense = MLP(widths)
        config = {name: SparseScheme(block, density) for name in sparse_layers}
        sparse = sparsify(copy.deepcopy(dense), {**config, "default": None})
        x = torch.randn(batch, widths[0], generator=gen)
        target = torch.randint(widths[-1], (batch,), generator=gen)
        return dense, sparse, x, target
    return build


def _conv(channels, size, block, density, batch, punched=False):
    def build(gen):
        dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        sparse = SparseConv2d.block_punched(dense, *block, density=density) if punched else SparseConv2d.from_dense(dense, block, density)
        x = torch.randn(batch, channels, size, size, generator=gen).requires_grad_()
        dy = torch.randn(batch, channels, size, size, generator=gen)
        return dense, sparse, x, dy
    return build


def _resnet(block, density, batch, width=64):
    def build(gen):
        dense = ResNet18(10, width)
        sparse = sparsify(copy.deepcopy(dense), resnet18_sparse_config(SparseScheme(block, density)))
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        target = torch.randint(10, (batch,), generator=gen)
        return dense, sparse, x, target
    return build


DEFAULT_CASES: Tuple[TrainingCase, ...] = (
    TrainingCase("MLP 2048-2048-2048-2048-10, batch 256, 3 hidden layers 32x32 @ 10%", "step",
                 _mlp([2048, 2048, 2048, 2048, 10], ["layers.0", "layers.1", "layers.2"], (32, 32), 0.1, 256)),
    TrainingCase("conv 3x3 256ch 8x8, batch 32, 32x32 @ 10%", "fwd+bwd", _conv(256, 8, (32, 32), 0.1, 32)),
    TrainingCase("conv 3x3 512ch 4x4, batch 32, 32x32 @ 10%", "fwd+bwd", _conv(512, 4, (32, 32), 0.1, 32)),
    TrainingCase("conv 3x3 256ch 8x8, batch 32, punched 8x4 @ 10%", "fwd+bwd", _conv(256, 8, (8, 4), 0.1, 32, punched=True)),
    TrainingCase("conv 3x3 512ch 4x4, batch 32, punched 8x4 @ 10%", "fwd+bwd", _conv(512, 4, (8, 4), 0.1, 32, punched=True)),
    TrainingCase("ResNet-18 (CIFAR), batch 32, 3x3 convs 32x32 @ 10%", "step", _resnet((32, 32), 0.1, 32)),
)

QUICK_CASES: Tuple[TrainingCase, ...] = (
    TrainingCase("MLP 256-256-256-10, batch 64, 32x32 @ 25%", "step", _mlp([256, 256, 256, 10], ["layers.0", "layers.1"], (32, 32), 0.25, 64)),
    TrainingCase("conv 3x3 64ch 8x8, batch 4, 16x16 @ 25%", "fwd+bwd", _conv(64, 8, (16, 16), 0.25, 4)),
)


def _sgd_update(model: nn.Module) -> Callable[[], None]:
    """The update that ends a training step: plain SGD on model's parameters, and for
    power-of-two layers SmartDeal's re-quantization of C (their update is not done without it)."""
    from .nn.pow2 import _Pow2Layer, requantize_

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    pow2 = any(isinstance(m, _Pow2Layer) for m in model.modules())

    def update():
        optimizer.step()
        if pow2:
            requantize_(model)
    return update


def _step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """One training step: forward, cross-entropy, backward, the update (``_sgd_update``)."""
    update = _sgd_update(model)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        update()
    return step


def fwd_bwd_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    """One forward + backward of ``layer`` (its gradients and x's cleared first): what the
    conv rows here time."""
    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
    return fwd_bwd


def layer_step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    """What ``layer`` adds to a training step: forward, backward from dy, and the update of
    its parameters (``_sgd_update``), which also makes the next forward rebuild a sparse
    layer's transposed copy of W. The mapper's per-layer latencies time this.

    The gradients are dropped after the update, as a step's are dead by then. Kept to
    the next call, those of the 239 variants a width-20 ResNet-18 search times together
    raised its peak RSS from 1.03 GB (forward + backward timed) to 1.39 GB; dropped,
    1.07-1.12 GB."""
    update = _sgd_update(layer)
    fwd_bwd = fwd_bwd_fn(layer, x, dy)

    def step():
        fwd_bwd()
        update()
        layer.zero_grad(set_to_none=True)
    return step


def run_case(case: TrainingCase, rounds: int, seed: int = 0) -> TrainingRow:
    from .bench import _median_times

    dense, sparse, x, target = case.build(torch.Generator().manual_seed(seed))
    make = _step_fn if case.what == "step" else fwd_bwd_fn
    times = _median_times({"dense": make(dense, x, target), "sparse": make(sparse, x, target)}, rounds)
    return TrainingRow(
        case.name, case.what, 1e3 * times["dense"], 1e3 * times["sparse"], times["dense"] / times["sparse"],
        training_flops(dense, x) / training_flops(sparse, x),
    )


def training_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward + backward of ``model`` on ``x`` in its Linear / Conv2d layers
    (dense or sparse), counted from the weights actually stored: 2 per weight per output
    row for the forward and for the weight gradient, and again for the input gradient
    where the layer's input needs one (not for a first layer fed with data)."""
    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, (SparseLinear, SparseConv2d)):
            weights = module.values.numel()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            weights = module.weight.numel()
        else:
            return
        rows = output.numel() // output.shape[1 if output.dim() == 4 else -1]
        total += (3 if inputs[0].requires_grad else 2) * 2.0 * rows * weights

    # Run with autograd on: it is what tells which inputs need a gradient.
    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def run(cases: Sequence[TrainingCase], rounds: int, progress: Callable[[str], None] = print) -> List[TrainingRow]:
    rows = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.what}: {case.name}")
        rows.append(run_case(case, rounds))
    return rows


def format_table(rows: Sequence[TrainingRow]) -> str:
    width = max(len(r.name) for r in rows)
    header = f"{'case':<{width}}  {'timed':<8}{'dense ms':>10}{'sparse ms':>11}{'x dense':>9}{'FLOP ratio':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.what:<8}{r.dense_ms:>10.1f}{r.sparse_ms:>11.1f}{r.speedup:>8.2f}x{r.flop_ratio:>11.2f}x")
    return "\n".join(lines)


def plot(rows: Sequence[TrainingRow], path: Path) -> Path:
    """Measured speed-up beside the FLOP ratio, one pair of bars per case."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from .bench import save_figure

    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r.speedup for r in rows], 0.4, label="measured speed-up over dense")
    ax.bar([x + 0.2 for x in xs], [r.flop_ratio for r in rows], 0.4, label="FLOP ratio (dense / sparse)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [textwrap.fill(f"{r.name} [{r.what}]", 28) for r in rows], fontsize=7)
    ax.set_ylabel("x dense (same run)")
    ax.set_title("edgesparse sparse modules against their dense models")
    ax.legend()
    return save_figure(fig, path)
