"""``edgesparse bench``: the three block-sparse products against torch dense and
torch.sparse, measured in one run.

Timing: providers take turns within each round (a few warm-up calls, then a few
timed ones) and the median over all rounds is kept, so a burst of load on a shared
machine hits every provider alike; the ratios, not the absolute times, are the
figures to quote.

GFLOP/s are counted on the nonzeros: 2 * M * nnz_blocks * bn * bk per product.
"% of dense rate" is our GFLOP/s over dense torch's GFLOP/s on the full matrix:
100% would mean a kept block costs exactly what it costs inside a dense product.

The pow2 rows (SmartDeal's W = C·B, :mod:`edgesparse.pow2`) time the products that read
C's packed 5-bit codes against, in the same run: the fp32 BSR of the same (32 x 3) row
pattern (our BSR kernel), torch dense on the original weight, and rebuilding the dense
W from C and B (one batched matmul of the dense float C) before each F.linear, as
SmartDeal's released code does; "density" is the kept fraction of C's rows, and the
weight's bytes are reported against the fp32 BSR's.

A "cold" row is the memory-bound case: every provider cycles through copies of its
weights (distinct memory, same values), as many as fill twice the last-level cache with
that provider's own format, so each call reads its weight from DRAM, as the layers of
a model larger than the cache do on an edge device. A warm row calls one weight again and
again: on a CPU with 32 MB of L3 the issue's 8 MB fp32 BSR then never leaves the cache.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import ops
from .formats import BSR
from .kernels import dispatch

OPS = ("forward", "grad_input", "grad_weight")
POW2_OPS = ("pow2_forward", "pow2_grad_input")


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    k: int
    block: Tuple[int, int]
    density: float
    op: str
    cold: bool = False  # pow2 rows: weights read from memory (see the module docstring)


@dataclass
class Row:
    op: str
    m: int
    n: int
    k: int
    block: str
    density: float
    backend: str
    ours_ms: float
    dense_ms: float
    torch_sparse_ms: Optional[float]
    gflops_nnz: float
    pct_of_dense_rate: float
    speedup_vs_dense: float
    speedup_vs_torch_sparse: Optional[float]
    # pow2 rows only: fp32 BSR of the same pattern, rebuild-dense-then-product, bytes.
    bsr_same_pattern_ms: Optional[float] = None
    rebuild_dense_ms: Optional[float] = None
    speedup_vs_bsr_same_pattern: Optional[float] = None
    speedup_vs_rebuild_dense: Optional[float] = None
    weight_bytes_vs_bsr: Optional[float] = None
    cold: bool = False


def _headline(op: str, m: int, block: Tuple[int, int], density: float) -> Case:
    return Case(m, 2048, 2048, block, density, op)


# The figures the foundation issue asks for, then a spread of block shapes.
DEFAULT_CASES: Tuple[Case, ...] = (
    *(_headline(op, 256, (32, 32), 0.1) for op in OPS),
    *(_headline(op, 256, (16, 16), 0.1) for op in OPS),
    _headline("forward", 256, (32, 32), 0.5),
    _headline("forward", 8, (32, 32), 0.1),
    _headline("forward", 256, (8, 8), 0.1),
    _headline("forward", 256, (64, 64), 0.1),
    # Narrow blocks, whose kernels vectorise along the batch (schedule.vector == 'batch'):
    # 8x4's grad-input and grad-weight, 4x8's forward (an output side of 4).
    *(_headline(op, 256, (8, 4), 0.1) for op in OPS),
    _headline("forward", 256, (4, 8), 0.1),
    # pow2 (issue 4): the memory-bound case of the figures, cold and warm, then a large
    # batch and grad-input.
    Case(8, 2048, 2048, (32, 3), 0.5, "pow2_forward", cold=True),
    _headline("pow2_forward", 8, (32, 3), 0.5),
    _headline("pow2_forward", 256, (32, 3), 0.5),
    _headline("pow2_grad_input", 8, (32, 3), 0.5),
)

QUICK_CASES: Tuple[Case, ...] = tuple(
    Case(64, 640, 640, (32, 32), 0.1, op) for op in OPS  # 400 blocks: 10% is exactly 40
)


# Warm-up before each provider's timed calls: at least this many calls and seconds.
_WARMUP_CALLS = 3
_WARMUP_SECONDS = 0.05


def _median_times(fns: Dict[str, Callable[[], object]], rounds: int, calls: int = 3,
                  progress: Optional[Callable[[str], None]] = None,
                  before: Optional[Dict[str, Callable[[], object]]] = None) -> Dict[str, float]:
    """Median seconds per call of each provider (``progress`` hears of each round done;
    ``before[name]``, where given, runs before each of that provider's timed calls,
    outside the timing).

    Each round runs every provider in turn: a warm-up, then ``calls`` timed calls. The
    warm-up matters on a 2-core machine: torch's OpenMP workers and TVM's thread pool
    both spin for a while after a call, and the other library's first calls after a
    switch ran up to 3x slower (ours: 6-8 ms settling to 2.3-2.9 ms over ~15 ms;
    torch dense: 57 ms settling to 23 ms), so the warm-up lasts at least 50 ms.
    """
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            start, done = time.perf_counter(), 0
            while done < _WARMUP_CALLS or time.perf_counter() - start < _WARMUP_SECONDS:
                fn()
                done += 1
            for _ in range(calls):
                if before and name in before:
                    before[name]()
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
        if progress:
            progress(f"  round {r + 1}/{rounds} done")
    return {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}


def _torch_sparse_bsr(dense: torch.Tensor, block: Tuple[int, int]) -> Optional[torch.Tensor]:
    """torch's own BSR of a matrix, or None where torch cannot build one (odd shapes)."""
    if dense.shape[0] % block[0] or dense.shape[1] % block[1]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse BSR tensor support is in beta state"
        return dense.to_sparse_bsr(block)


def smartdeal_tensors(W) -> Tuple[torch.Tensor, torch.Tensor]:
    """C as the dense float tensor [N, chunks, chunk_rows, 3] (pruned rows zero) and B as
    [N, chunks, 3, 3]: what SmartDeal's released code keeps, to rebuild W = C·B with one
    batched matmul before every product."""
    nb, g, group = W.block_rows, W.n_chunks, W.group
    C = torch.zeros(nb, g * W.chunk_rows, 3, group)
    C[W.index.row_indices.long(), W.index.col_indices.long()] = W.coefficients()
    C = C.permute(0, 3, 1, 2).reshape(nb * group, g, W.chunk_rows, 3)[: W.shape[0]].contiguous()
    B = W.basis.permute(0, 4, 1, 2, 3).reshape(nb * group, g, 3, 3)[: W.shape[0]].contiguous()
    return C, B


def pow2_providers(case: Case, generator: torch.Generator):
    """The calls to time for a pow2 case, the number of kept blocks and the weight bytes'
    ratio to the fp32 BSR's. The weight is decomposed with 2 ALS rounds: the kernels'
    speed does not depend on how well C·B fits."""
    from .compiler.target import last_level_cache_bytes
    from .pow2 import Pow2Weight, decompose, ops as pow2_ops

    m, n, k = case.m, case.n, case.k
    w = torch.randn(n, k, generator=generator) * 0.02
    W = decompose(w, 1.0 - case.density, group=case.block[0], iterations=2).weight
    bsr = W.to_bsr()
    sizes = W.nbytes()
    cache = last_level_cache_bytes()

    def cycle(make: Callable[[], object], nbytes: int) -> Callable[[], object]:
        """A call returns the next of enough distinct copies that together they fill
        twice the last-level cache (cold), or the one weight (warm)."""
        copies = math.ceil(2 * cache / nbytes) if case.cold else 1
        return itertools.cycle([make() for _ in range(copies)]).__next__

    def nbytes(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    next_w = cycle(w.clone, nbytes(w))
    next_W = cycle(lambda: Pow2Weight.from_index(W.words.clone(), W.basis.clone(), W.index, W.shape, W.chunk_rows, W.exp_range),
                   sizes["pow2"])
    next_bsr = cycle(lambda: BSR.from_index(bsr.values.clone(), bsr.index, bsr.shape), sizes["bsr_fp32"])
    C, B = smartdeal_tensors(W)
    next_CB = cycle(lambda: (C.clone(), B.clone()), nbytes(C, B))

    def rebuilt() -> torch.Tensor:
        C_copy, B_copy = next_CB()
        return torch.matmul(C_copy, B_copy).reshape(n, -1)[:, :k]

    if case.op == "pow2_forward":
        x = torch.randn(m, k, generator=generator)
        fns = {
            "ours": lambda: pow2_ops.pow2_linear(x, next_W()),
            "dense": lambda: F.linear(x, next_w()),
            "bsr": lambda: ops.bsr_linear(x, next_bsr()),
            "rebuild": lambda: F.linear(x, rebuilt()),
        }
    else:
        dy = torch.randn(m, n, generator=generator)
        fns = {
            "ours": lambda: pow2_ops.pow2_linear_grad_input(dy, next_W()),
            "dense": lambda: dy @ next_w(),
            "bsr": lambda: ops.bsr_linear_grad_input(dy, next_bsr()),
            "rebuild": lambda: dy @ rebuilt(),
        }
    return fns, W.nnz_blocks, sizes["vs_bsr"]


def providers(case: Case, generator: torch.Generator) -> Tuple[Dict[str, Callable[[], object]], int]:
    """The calls to time for this case, and the number of kept blocks."""
    m, n, k = case.m, case.n, case.k
    w = torch.randn(n, k, generator=generator)
    W = BSR.from_dense(w, case.block, density=case.density)
    masked = W.to_dense()
    x = torch.randn(m, k, generator=generator)
    dy = torch.randn(m, n, generator=generator)
    fns: Dict[str, Callable[[], object]] = {}
    if case.op == "forward":
        fns["ours"] = lambda: ops.bsr_linear(x, W)
        fns["dense"] = lambda: F.linear(x, w)
        sparse = _torch_sparse_bsr(masked, case.block)
        if sparse is not None:
            fns["torch_sparse"] = lambda: (sparse @ x.T).T
    elif case.op == "grad_input":
        fns["ours"] = lambda: ops.bsr_linear_grad_input(dy, W)
        fns["dense"] = lambda: dy @ w
        sparse_t = _torch_sparse_bsr(masked.T.contiguous(), case.block[::-1])
        if sparse_t is not None:
            fns["torch_sparse"] = lambda: (sparse_t @ dy.T).T
    else:
        fns["ours"] = lambda: ops.bsr_linear_grad_weight(dy, x, W)
        fns["dense"] = lambda: dy.T @ x
        # torch.sparse's product on a pattern is sampled_addmm, which takes CSR: the
        # element pattern of the kept blocks.
        pattern = (masked != 0).to(torch.float32).to_sparse_csr()
        dyt = dy.T.contiguous()
        fns["torch_sparse"] = lambda: torch.sparse.sampled_addmm(pattern, dyt, x, beta=0.0)
    if "torch_sparse" in fns and not _runs(fns["torch_sparse"]):
        del fns["torch_sparse"]  # e.g. "MKL Sparse doesn't support matrices with non-square blocks"
    return fns, W.nnz_blocks


def _runs(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except RuntimeError:
        return False
    return True


def run_case(case: Case, rounds: int, seed: int = 0) -> Row:
    generator = torch.Generator().manual_seed(seed)
    bytes_ratio = None
    if case.op in POW2_OPS:
        fns, nnz_blocks, bytes_ratio = pow2_providers(case, generator)
    else:
        fns, nnz_blocks = providers(case, generator)
    times = _median_times(fns, rounds)
    extra = {}
    if "bsr" in times:
        extra = dict(
            bsr_same_pattern_ms=times["bsr"] * 1e3, rebuild_dense_ms=times["rebuild"] * 1e3,
            speedup_vs_bsr_same_pattern=times["bsr"] / times["ours"],
            speedup_vs_rebuild_dense=times["rebuild"] / times["ours"], weight_bytes_vs_bsr=bytes_ratio, cold=case.cold,
        )
    bn, bk = case.block
    flops_nnz = 2.0 * case.m * nnz_blocks * bn * bk
    flops_dense = 2.0 * case.m * case.n * case.k
    gflops = flops_nnz / times["ours"] / 1e9
    dense_gflops = flops_dense / times["dense"] / 1e9
    ts = times.get("torch_sparse")
    return Row(
        op=case.op, m=case.m, n=case.n, k=case.k, block=f"{bn}x{bk}", density=case.density,
        backend=dispatch.select(torch.device("cpu"), torch.float32).__name__.rsplit(".", 1)[-1],
        ours_ms=times["ours"] * 1e3, dense_ms=times["dense"] * 1e3,
        torch_sparse_ms=ts * 1e3 if ts is not None else None,
        gflops_nnz=gflops, pct_of_dense_rate=100.0 * gflops / dense_gflops,
        speedup_vs_dense=times["dense"] / times["ours"],
        speedup_vs_torch_sparse=ts / times["ours"] if ts is not None else None,
        **extra,
    )


def environment_stamp() -> Dict[str, object]:
    from .compiler.target import cpu_count

    stamp: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpus": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import tvm

        from .compiler.target import host_cpu_name

        stamp["tvm"] = tvm.__version__
        stamp["llvm_cpu"] = host_cpu_name()
    except ImportError:
        stamp["tvm"] = None
    from . import __version__

    stamp["edgesparse"] = __version__
    return stamp


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt(value: Optional[float], spec: str) -> str:
    return format(value, spec) if value is not None else "n/a"


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'op':<12}{'M':>5}{'N':>6}{'K':>6}{'block':>7}{'dens':>6}{'ours ms':>9}{'dense ms':>10}"
        f"{'t.sparse ms':>12}{'GFLOP/s':>9}{'% dense':>9}{'x dense':>9}{'x t.sparse':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.op:<12}{r.m:>5}{r.n:>6}{r.k:>6}{r.block:>7}{r.density:>6.2f}{r.ours_ms:>9.3f}{r.dense_ms:>10.3f}"
            f"{_fmt(r.torch_sparse_ms, '.3f'):>12}{r.gflops_nnz:>9.1f}{r.pct_of_dense_rate:>8.0f}%"
            f"{r.speedup_vs_dense:>8.2f}x{_fmt(r.speedup_vs_torch_sparse, '.2f'):>10}x"
        )
    pow2 = [r for r in rows if r.bsr_same_pattern_ms is not None]
    if pow2:
        head = (f"{'pow2 op':<16}{'weights':>8}{'M':>5}{'dens':>6}{'ours ms':>9}{'BSR ms':>9}{'rebuild ms':>11}"
                f"{'x BSR':>8}{'x dense':>9}{'x rebuild':>11}{'bytes/BSR':>11}")
        lines += ["", "pow2 (W = C·B, packed 5-bit codes) against the fp32 BSR of the same (32x3) pattern", head, "-" * len(head)]
        for r in pow2:
            lines.append(
                f"{r.op:<16}{'cold' if r.cold else 'warm':>8}{r.m:>5}{r.density:>6.2f}{r.ours_ms:>9.3f}{r.bsr_same_pattern_ms:>9.3f}{r.rebuild_dense_ms:>11.3f}"
                f"{r.speedup_vs_bsr_same_pattern:>7.2f}x{r.speedup_vs_dense:>8.2f}x{r.speedup_vs_rebuild_dense:>10.2f}x"
                f"{r.weight_bytes_vs_bsr:>11.3f}"
            )
    return "\n".join(lines)


def write_results(rows: Sequence[Row], stamp: Dict[str, object], out: Path) -> Tuple[Path, Path]:
    """Write ``out`` (.json) and the same rows as .csv beside it; temp file then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    csv_path = out.with_suffix(".csv")
    payload = {"environment": stamp, "rows": [asdict(r) for r in rows]}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, json_path)
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["date", "processor", *asdict(rows[0]).keys()])
        writer.writeheader()
        for r in rows:
            writer.writerow({"date": stamp["date"], "processor": stamp["processor"], **asdict(r)})
    os.replace(tmp, csv_path)
    return json_path, csv_path


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Bar chart of the speed-ups over torch dense and torch.sparse, one group per row."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [f"{r.op}\nM={r.m} {r.block} {r.density:.0%}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r.speedup_vs_dense for r in rows], 0.4, label="vs torch dense")
    ax.bar([x + 0.2 for x in xs], [r.speedup_vs_torch_sparse or 0 for r in rows], 0.4, label="vs torch.sparse (BSR; sampled_addmm for grad-weight)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speed-up (same run)")
    ax.set_title("edgesparse block-sparse products against torch, measured in one run")
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` (PNG) through a temp file and a rename, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run(cases: Iterable[Case], rounds: int, progress: Callable[[str], None] = print) -> List[Row]:
    cases = list(cases)
    rows = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.op} M={case.m} {case.n}x{case.k} block {case.block[0]}x{case.block[1]} density {case.density}" + (" (cold weights)" if case.cold else ""))
        rows.append(run_case(case, rounds))
    return rows
