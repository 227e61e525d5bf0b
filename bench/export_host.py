"""The C++ host's latency against the Python path, and the exported size against dense.

    python bench/export_host.py build/edgesparse-run [--batches 1 32] [--rounds 5] [--threads N]

Model: MLP 2048 -> 2048 -> 2048 -> 10, the two hidden layers at 10% of their 32x32
blocks (90% pruned), the classifier dense (in Python an nn.Linear on torch's matmul; in
the export a BSR keeping all its 8x8 blocks). Per batch and round, interleaved:

- host:    median of ``edgesparse-run --repeat N`` (the whole forward: kernels, ReLU,
           padding copies; the library is loaded once, before the timed runs)
- ops:     the Python path's products alone — the sum over the three layers of the
           median time of that layer's op (``ops.bsr_linear`` on the TVM backend for the
           sparse layers, ``F.linear`` for the classifier) on its recorded input
- kernels: as ops, but the sparse layers' TVM kernel calls alone (``block_rows_product``
           on the operands ``ops.bsr_linear`` prepares, prepared once)
- forward: median of ``model(x)`` under no_grad (the Python path end to end)

Each figure is the median over rounds; the ratios are of those medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# As the edgesparse commands do (cli.TIMED_COMMANDS); OpenMP reads it when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from edgesparse import ops
from edgesparse.export import export, size_report, write_arrays
from edgesparse.nn import SparseLinear, sparsify


def mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    return sparsify(model, {"re:[02]": {"block": (32, 32), "density": 0.1}}).eval()


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def layer_calls(model: nn.Sequential, x: torch.Tensor):
    """(ops, kernels): per product layer, a call of its op and of its bare kernel on the
    layer's input recorded from one forward (the classifier's F.linear in both)."""
    from edgesparse.kernels.tvm._block_rows import block_rows_product
    from edgesparse.kernels.tvm._runtime import threads
    from edgesparse.kernels.tvm.bsr_linear import transposed_values
    from edgesparse.kernels.tvm.schedule import heuristic_block_rows

    op_calls, kernel_calls = [], []
    for layer in model:
        if isinstance(layer, SparseLinear):
            W, bias, inp = layer.weight_bsr(), layer.bias, x
            op_calls.append(lambda W=W, bias=bias, inp=inp: ops.bsr_linear(inp, W, bias))
            sched = heuristic_block_rows(x.shape[0], *W.block, W.block_rows, threads())
            args = (inp, transposed_values(W), W.row_offsets, W.col_indices, None, bias.detach(), W.shape[0], sched)
            kernel_calls.append(lambda args=args: block_rows_product(*args))
        elif isinstance(layer, nn.Linear):
            call = functools.partial(nn.functional.linear, x, layer.weight, layer.bias)
            op_calls.append(call)
            kernel_calls.append(call)
        x = layer(x)
    return op_calls, kernel_calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", type=Path, help="the built edgesparse-run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per round and provider")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of torch and of TVM, in Python and in the host (default: every CPU)")
    args = parser.parse_args(argv)
    if args.threads is not None:  # before the first kernel starts TVM's thread pool; inherited by the host
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        out = export(model, Path(tmp) / "mlp", [2048], progress=lambda m: print(m, file=sys.stderr))
        print(size_report(model, out))
        print(f"torch threads {torch.get_num_threads()}, TVM threads {os.environ.get('TVM_NUM_THREADS', 'all CPUs')}; "
              f"median of {args.rounds} rounds x {args.calls} calls")
        print("batch | host ms | Python kernels ms | Python ops ms | Python forward ms | host / kernels | host / forward")
        for batch in args.batches:
            x = torch.randn(batch, 2048)
            write_arrays(Path(tmp) / "in.bin", {"input": x})
            op_calls, kernel_calls = layer_calls(model, x)
            host, kernels, op_times, forward = [], [], [], []
            for r in range(args.rounds):
                print(f"batch {batch}: round {r + 1}/{args.rounds}", file=sys.stderr)
                run = subprocess.run([str(args.host), str(out), str(Path(tmp) / "in.bin"), str(Path(tmp) / "out.bin"),
                                      "--repeat", str(args.calls)], check=True, capture_output=True, text=True)
                host.append(float(run.stdout.split()[1]))
                kernels.append(sum(median_ms(call, args.calls) for call in kernel_calls))
                op_times.append(sum(median_ms(call, args.calls) for call in op_calls))
                forward.append(median_ms(lambda: model(x), args.calls))
            h, k, o, f = (statistics.median(v) for v in (host, kernels, op_times, forward))
            print(f"{batch} | {h:.3f} | {k:.3f} | {o:.3f} | {f:.3f} | {h / k:.3f} | {h / f:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
