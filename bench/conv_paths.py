"""SparseConv2d's two TVM-backend paths against torch's dense nn.Conv2d, forward + backward.

    .venv/bin/python bench/conv_paths.py [--rounds 7] [--breakdown]

Shapes of the CIFAR-style reduced ResNet-18's 3x3 convs (stride 1, padding 1, batch 32):
64 channels on 32x32, 128 on 16x16, 256 on 8x8 and 512 on 4x4, 90% of the blocks pruned, 32x32 blocks and the
block-punched (8, 36). Providers, each a forward + backward with the input's gradient:

- dense:  torch's nn.Conv2d holding the same masked weight
- im2col: the unfolded rows (modules._im2col, a copy of a strided view), then the
          linear layer's sparse products (SparseConv2d's path on the other backends)
- direct: SparseConv2d on TVM, the implicit-GEMM op edgesparse::sparse_conv2d

Times are medians over rounds, each round running every provider in turn after a
warm-up (edgesparse.bench._median_times), so the ratios come from the same moments of
a shared machine. --breakdown adds the direct path's three kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

# As the edgesparse commands do (cli.TIMED_COMMANDS); OpenMP reads it when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import edgesparse
from edgesparse.bench import _median_times
from edgesparse.kernels.tvm import bsr_conv2d
from edgesparse.nn import SparseConv2d, modules

SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, height = width)
BLOCKS = ((32, 32), (8, 36))
BATCH, DENSITY = 32, 0.1
GEOMETRY = ((3, 3), (1, 1), (1, 1), (1, 1))  # kernel_size, stride, padding, dilation


def providers(channels: int, size: int, block, gen: torch.Generator, breakdown: bool):
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, block, DENSITY)
    dense = layer.to_dense()
    x = torch.randn(BATCH, channels, size, size, generator=gen).requires_grad_()
    with edgesparse.use_backend("tvm"):
        y = layer(x)
    dy_direct = torch.randn(y.shape, generator=gen).contiguous(memory_format=torch.channels_last)  # as y
    dy = dy_direct.contiguous()

    def zero():
        x.grad = None
        for p in (*layer.parameters(), *dense.parameters()):
            p.grad = None

    def run_dense():
        zero()
        dense(x).backward(dy)

    def run_im2col():
        zero()
        rows, (out_h, out_w) = modules._im2col(x, *GEOMETRY)
        out = layer._sparse_product(rows).transpose(1, 2).reshape(BATCH, channels, out_h, out_w)
        out.backward(dy)

    def run_direct():
        zero()
        layer(x).backward(dy_direct)

    fns = {"dense": run_dense, "im2col": run_im2col, "direct": run_direct}
    if breakdown:
        W = layer.weight_bsr().with_values(layer.values.detach())
        xd = x.detach()
        fns.update({
            "d.forward": lambda: bsr_conv2d.conv2d(xd, W, None, *GEOMETRY),
            "d.grad_input": lambda: bsr_conv2d.conv2d_grad_input(dy_direct, W, xd.shape, *GEOMETRY),
            "d.grad_weight": lambda: bsr_conv2d.conv2d_grad_weight(dy_direct, xd, W, *GEOMETRY),
        })
    return fns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds to take the median over (default 7)")
    parser.add_argument("--breakdown", action="store_true", help="also time the direct path's pieces")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"batch {BATCH}, 3x3 stride 1 padding 1, {1 - DENSITY:.0%} of blocks pruned, "
          f"forward + backward, median of {args.rounds} rounds; ratio = dense time / path time")
    for channels, size in SHAPES:
        for block in BLOCKS:
            print(f"  measuring {channels} ch {size}x{size} block {block} ...", file=sys.stderr)
            with edgesparse.use_backend("tvm"):
                times = _median_times(providers(channels, size, block, gen, args.breakdown), args.rounds)
            dense = times["dense"]
            cells = [f"dense {dense * 1e3:7.2f} ms"]
            for name in ("im2col", "direct"):
                cells.append(f"{name} {times[name] * 1e3:7.2f} ms ({dense / times[name]:4.2f}x)")
            print(f"{channels:4d} ch {size}x{size} block {str(block):8s} " + "  ".join(cells))
            if args.breakdown:
                parts = {name: t for name, t in times.items() if name not in ("dense", "im2col", "direct")}
                print("      " + "  ".join(f"{name} {t * 1e3:.2f}" for name, t in parts.items()))


if __name__ == "__main__":
    main()
