"""pytest-benchmark microbenchmarks: each product against torch dense and torch.sparse.

    pytest bench/ --benchmark-only --benchmark-group-by=group

Groups hold one op at the headline shape (x 256x2048, W 2048x2048, 32x32 blocks,
10% kept), so the providers of an op sit side by side in one run. For the
whole grid with derived GFLOP/s and ratios, run ``edgesparse bench``.
"""

from __future__ import annotations

import pytest
import torch

from edgesparse.bench import OPS, Case, providers

HEADLINE = {op: Case(256, 2048, 2048, (32, 32), 0.1, op) for op in OPS}
PROVIDERS = ("ours", "dense", "torch_sparse")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_product(benchmark, op, provider):
    fns, _ = providers(HEADLINE[op], torch.Generator().manual_seed(0))
    benchmark.group = f"{op} 256x2048x2048 32x32 10%"
    benchmark(fns[provider])
