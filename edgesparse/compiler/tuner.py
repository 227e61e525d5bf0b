"""The auto-tuner: measure each kernel's schedule knobs on the target, keep the fastest.

Search (ours, over the explicit knobs of ``kernels/tvm/schedule.py``): start from the
heuristic schedule and a starting tile of each way of vectorising (along the block's
columns or along the batch); then, while the budget lasts, measure every valid
schedule that differs from the best one in a single knob (rows, cols, unroll, parallel,
vector) and move to the fastest; when a sweep finds nothing faster, spend what is left
of the budget on random valid schedules (a fixed seed). Candidates are built by TVM,
each measured with TVM's time evaluator: all the schedules of a sweep take turns within
each round (the heuristic's and the current best's included) and the median over
rounds is kept, so a burst of load from other processes hits them alike. The winner is
confirmed against the heuristic in a final interleaved run; if it does not beat it
there, the heuristic is recorded, so a tuned schedule is never knowingly slower than
the untuned one.

Interleaving evens out bursts, not load that lasts: while another job keeps a core busy,
a schedule that needs one core beats one that needs both, and that choice loses on an
idle machine (a grid tuned beside other jobs, recorded 1.149x the heuristic, rechecked
at 0.947x on a quiet one; ``bench/tune_grid.py --recheck``). So local tuning measures
how much CPU other processes used meanwhile (``OtherLoad``), stores it with the record
and warns above ``BUSY_CORES``.

Measurement is local (``LocalRunner``) or on another device through TVM's RPC
(``RPCRunner``: a ``tvm.rpc`` server on the board, directly or through a tracker); the
kernel is then compiled here for the target's LLVM triple and CPU and uploaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..formats import BSR, pad_columns
from ..kernels.tvm.schedule import (PARALLEL_CANDIDATES, STACK_BYTES, Schedule, batch_rows_tile, batch_tile,
                                    heuristic_block_rows, heuristic_grad_weight)
from .target import Target, vector_unit, versions
from .tuning import OPS, ShapeClass, TuningDatabase, make_record

DEFAULT_LAYER_BUDGET_S = 60.0
# Cores' worth of CPU that other processes may use during local tuning before the result
# is flagged: a quarter of a core is more than this machine's background when idle.
BUSY_CORES = 0.25
_UNROLLS = (1, 2, 4, 8)
_GROUP = 6  # schedules built, then timed together against the best


@dataclass(frozen=True)
class Problem:
    """One kernel on one layer: op, batch m, weight n x k, block, density."""

    op: str
    m: int
    n: int
    k: int
    block: Tuple[int, int]
    density: float

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        ShapeClass.of(self.m, self.n, self.k, self.density)  # validates the sizes
        bn, bk = self.block
        if bn < 1 or bk < 1:
            raise ValueError(f"block must be two positive ints, got {self.block}")

    def label(self) -> str:
        return f"{self.op} M={self.m} {self.n}x{self.k} {self.block[0]}x{self.block[1]} @{self.density:g}"

    @property
    def tiled(self) -> Tuple[int, int]:
        """(output side the tile vectorises, reduction length the unroll splits; None for
        grad-weight, whose unrolled loop is the batch and has a remainder loop)."""
        bn, bk = self.block
        return {"forward": (bn, bk), "grad_input": (bk, bn), "grad_weight": (bk, None)}[self.op]


def candidates(problem: Problem) -> List[Schedule]:
    """Every schedule worth trying for ``problem``, all of which the kernel accepts
    (``check_fits``): tiles one to four vectors wide (or the whole side when it is
    narrower) and at most as many accumulator registers as leave two free for the
    broadcast and the load; and the batch-vectorised tiles whose accumulators and loads
    fit the registers (grad-weight: a tile of the block, one load per tile row and
    column; forward and grad-input: batch vectors by at most a vector's worth of output
    columns, one load per vector and one broadcast). No tile of ``STACK_BYTES`` or more:
    TVM moves it off the stack, out of the registers (4x slower, schedule.py)."""
    simd = vector_unit()

    def on_stack(*floats: int) -> bool:
        return 4 * math.prod(floats) < STACK_BYTES

    width, reduced = problem.tiled
    bn, bk = problem.block
    cols_options = [c for c in range(1, width + 1)
                    if width % c == 0 and c <= 4 * simd.lanes and (c % simd.lanes == 0 or c == width)]
    out = []
    for cols in cols_options:
        vectors = -(-cols // simd.lanes)
        for rows in range(1, (simd.registers - 2) // vectors + 1):
            if (problem.op == "grad_weight" and bn % rows) or not on_stack(rows, cols):
                continue
            for unroll in _UNROLLS:
                if reduced is not None and reduced % unroll:
                    continue
                parallels = ("blocks",) if problem.op == "grad_weight" else PARALLEL_CANDIDATES
                out.extend(Schedule(rows, cols, unroll, p) for p in parallels)
    if problem.op == "grad_weight":
        out.extend(Schedule(rows, cols, unroll, "blocks", "batch")
                   for rows in range(1, bn + 1) for cols in range(1, bk + 1) for unroll in _UNROLLS
                   if bn % rows == 0 and bk % cols == 0 and rows * cols + rows + cols <= simd.registers
                   and on_stack(rows, cols, simd.lanes))
    else:  # batch vectors x output columns (at most a vector's worth), plus a load and a broadcast
        out.extend(Schedule(vectors, cols, unroll, p, "batch")
                   for cols in range(1, min(width, simd.lanes) + 1) if width % cols == 0
                   for vectors in range(1, (simd.registers - 1) // (cols + 1) + 1) if on_stack(vectors, cols, simd.lanes)
                   for unroll in _UNROLLS if reduced % unroll == 0
                   for p in PARALLEL_CANDIDATES)
    return out


def layout_seeds(problem: Problem) -> List[Schedule]:
    """A starting schedule for each way of vectorising the kernel, along the output (the
    block's columns) and along the batch: the knob walk moves one knob at a time, and no
    single knob turns a good tile of one layout into one of the other."""
    simd = vector_unit()
    columns = heuristic(problem, transposable=False)
    if problem.op == "grad_weight":
        return [columns, Schedule(*batch_tile(*problem.block, simd), 1, "blocks", "batch")]
    width, _ = problem.tiled
    return [columns, Schedule(*batch_rows_tile(problem.m, width, simd), columns.unroll, columns.parallel, "batch")]


def heuristic(problem: Problem, transposable: bool = True) -> Schedule:
    """The schedule the kernels use untuned (what the wrappers would pick)."""
    from ..kernels.tvm._runtime import threads

    bn, bk = problem.block
    if problem.op == "grad_weight":
        return heuristic_grad_weight(problem.block, problem.m, transposable=transposable)
    blocks = -(-problem.n // bn) if problem.op == "forward" else -(-problem.k // bk)
    width, depth = problem.tiled
    return heuristic_block_rows(problem.m, width, depth, blocks, threads(), transposable=transposable)


def build(problem: Problem, schedule: Schedule, target: Optional[Target] = None):
    """The TVM executable of ``problem``'s kernel with ``schedule`` (not cached)."""
    import tvm

    from ..kernels.tvm._block_rows import kernel_recipe as block_rows_recipe
    from ..kernels.tvm.bsr_linear_grad_weight import kernel_recipe as grad_weight_recipe

    bn, bk = problem.block
    if problem.op == "grad_weight":
        maker, params = grad_weight_recipe(bn, bk, schedule, False)
    else:
        width, depth = problem.tiled
        maker, params = block_rows_recipe(width, depth, schedule, problem.op == "grad_input", False, False)
    func = maker(*params)
    return tvm.compile(tvm.IRModule({"main": func}), target=(target or Target.detect()).tvm_target())


def kernel_args(problem: Problem, seed: int = 0) -> List:
    """The kernel's arguments for a random weight of ``problem``'s shape and density, as
    numpy arrays (and ints), laid out exactly as the torch wrappers pass them."""
    from ..kernels.tvm._runtime import threads

    g = torch.Generator().manual_seed(seed)
    W = BSR.from_dense(torch.randn(problem.n, problem.k, generator=g), problem.block, density=problem.density)
    x = torch.randn(problem.m, problem.k, generator=g)
    dy = torch.randn(problem.m, problem.n, generator=g)
    i32, f32 = torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    np_, kp = W.padded_shape
    if problem.op == "forward":
        args = [pad_columns(x, kp), i32, i32, W.values.transpose(1, 2).contiguous(), W.row_offsets, W.col_indices,
                i32, f32, torch.empty(problem.m, np_)]
    elif problem.op == "grad_input":
        args = [pad_columns(dy, np_), i32, i32, W.values, W.col_offsets, W.col_order_rows, W.col_order, f32,
                torch.empty(problem.m, kp)]
    else:
        # Padded to whole blocks, as the wrapper pads them for the schedules that read in place.
        args = [pad_columns(dy, np_), pad_columns(x, kp), i32, i32, W.row_indices, W.col_indices,
                torch.empty_like(W.values), min(threads(), W.nnz_blocks)]
    return [a.contiguous().numpy() if isinstance(a, torch.Tensor) else a for a in args]


def _cpu_busy_seconds() -> Optional[float]:
    """CPU seconds every core has spent busy since boot, stolen time included
    (``/proc/stat``), or None where that file does not exist (not Linux)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """``with OtherLoad() as load: ...``; then ``load.cores``: the CPU that other
    processes (and the hypervisor, as stolen time) used during the block, in cores on
    average over its wall time; None where it cannot be read."""

    cores: Optional[float] = None

    def __enter__(self) -> "OtherLoad":
        self._start = (_cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        if busy is not None and self._start[0] is not None and wall > self._start[2]:
            others = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(others, 0.0) / (wall - self._start[2])


class LocalRunner:
    """Measures on this machine, in this process."""

    name = "local"
    measures_here = True

    def __init__(self):
        import tvm

        self.device = tvm.cpu()

    def load(self, executable):
        return executable.jit()

    def tensors(self, arrays):
        import tvm

        return [tvm.runtime.tensor(a, self.device) if hasattr(a, "shape") else a for a in arrays]


class RPCRunner:
    """Measures on a device running ``python -m tvm.exec.rpc_server`` (or a ``tvm.rpc.Server``),
    reached directly at host:port or, with ``key``, through the tracker at host:port."""

    measures_here = False  # this machine's load says nothing about the device's

    def __init__(self, host: str, port: int, key: Optional[str] = None, session_timeout: float = 0):
        from tvm import rpc

        if key is None:
            self.session = rpc.connect(host, port, session_timeout=session_timeout)
        else:
            self.session = rpc.connect_tracker(host, port).request(key, session_timeout=session_timeout)
        self.name = f"rpc://{host}:{port}" + (f"/{key}" if key else "")
        self.device = self.session.cpu()
        self._dir = tempfile.mkdtemp(prefix="edgesparse-rpc-")
        self._count = 0

    def load(self, executable):
        self._count += 1
        name = f"kernel{self._count}.so"
        path = os.path.join(self._dir, name)
        executable.export_library(path)
        self.session.upload(path)
        os.unlink(path)
        return self.session.load_module(name)

    def tensors(self, arrays):
        import tvm

        return [tvm.runtime.tensor(a, self.device) if hasattr(a, "shape") else a for a in arrays]


class _Progress:
    """One self-rewriting line on stderr: [####....] label  done/budget s  tried, best."""

    def __init__(self, label: str, budget_s: float, stream=None):
        self.label, self.budget, self.start = label, budget_s, time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr

    def update(self, tried: int, speedup: float) -> None:
        elapsed = time.perf_counter() - self.start
        filled = min(20, int(20 * elapsed / self.budget)) if self.budget > 0 else 20
        self.stream.write(f"\r  [{'#' * filled}{'.' * (20 - filled)}] {self.label}  {elapsed:4.0f}/{self.budget:.0f} s  "
                          f"{tried} schedules, best {speedup:.2f}x heuristic ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@dataclass
class TuneResult:
    problem: Problem
    best: Schedule
    best_s: float  # median seconds per call, confirm run
    heuristic: Schedule
    heuristic_s: float
    tried: int
    seconds: float
    other_load: Optional[float] = None  # cores other processes used meanwhile (local runs)

    @property
    def speedup(self) -> float:
        return self.heuristic_s / self.best_s


class _Measurer:
    """Builds and loads schedules for one problem, and times groups of them interleaved."""

    def __init__(self, problem: Problem, runner, target: Target, rounds: int):
        self.problem, self.runner, self.target, self.rounds = problem, runner, target, rounds
        self.args = runner.tensors(kernel_args(problem))
        self.modules: Dict[Schedule, object] = {}
        self.number = 1

    def add(self, schedule: Schedule) -> None:
        if schedule not in self.modules:
            self.modules[schedule] = self.runner.load(build(self.problem, schedule, self.target))

    def _once(self, schedule: Schedule) -> float:
        # TVM's evaluator makes one untimed call first: every sample comes warmed up.
        ev = self.modules[schedule].time_evaluator("main", self.runner.device, number=self.number, repeat=1)
        return ev(*self.args).results[0]

    def calibrate(self, schedule: Schedule, min_s: float = 0.003) -> None:
        """Calls per sample such that one sample lasts at least ``min_s`` (timer noise)."""
        self._once(schedule)  # first call: page faults, thread-pool start
        once = max(self._once(schedule), 1e-7)
        self.number = max(1, int(min_s / once + 0.999))
        self.sample_s = self.number * once  # one timed (or warm-up) sample

    def timing_cost(self, schedules: int, rounds: Optional[int] = None) -> float:
        """Seconds ``time()`` of that many schedules will take (the evaluator's warm-up call
        included)."""
        return (rounds or self.rounds) * schedules * (self.sample_s + self.sample_s / self.number)

    def time(self, schedules: Sequence[Schedule], rounds: Optional[int] = None) -> Dict[Schedule, float]:
        """Median seconds per call of each schedule; every round runs all of them in turn."""
        samples: Dict[Schedule, List[float]] = {s: [] for s in schedules}
        for _ in range(rounds or self.rounds):
            for s in schedules:
                samples[s].append(self._once(s))
        return {s: statistics.median(ts) for s, ts in samples.items()}


def tune_problem(problem: Problem, budget_s: float, runner=None, target: Optional[Target] = None, rounds: int = 5,
                 seed: int = 0, progress: bool = True) -> TuneResult:
    """Search ``problem``'s schedules within ``budget_s`` seconds, building and timing
    included (a build that takes far longer than the ones before may overrun it)."""
    runner = runner or LocalRunner()
    with OtherLoad() as load:
        result = _search(problem, budget_s, runner, target or Target.detect(), rounds, seed, progress)
    if getattr(runner, "measures_here", False):
        result.other_load = load.cores
    return result


def _search(problem: Problem, budget_s: float, runner, target: Target, rounds: int, seed: int,
            progress: bool) -> TuneResult:
    start = time.perf_counter()
    bar = _Progress(problem.label(), budget_s) if progress else None
    valid = candidates(problem)
    base = heuristic(problem)
    if base not in valid:
        valid.append(base)
    m = _Measurer(problem, runner, target, rounds)
    m.add(base)
    m.calibrate(base)
    best, measured = base, {base}
    rng = random.Random(seed)

    # What is left once the final confirmation (two schedules, 7 rounds) is paid for.
    confirm_rounds = max(rounds, 7)
    built_s = [time.perf_counter() - start]  # seconds per build so far (the first includes calibrating)

    def left() -> float:
        return budget_s - m.timing_cost(2, confirm_rounds) - (time.perf_counter() - start)

    def step(group: List[Schedule]) -> bool:
        """Build and time ``group`` against the best; True if one of it won. A schedule
        is built only if its build and the group's timing still fit the budget."""
        nonlocal best
        built = []
        for s in group:
            if left() < statistics.median(built_s) + m.timing_cost(len(built) + 2):
                break
            t0 = time.perf_counter()
            m.add(s)
            built_s.append(time.perf_counter() - t0)
            built.append(s)
            measured.add(s)
        if not built:
            return False
        round_times = m.time([best, *built])
        winner = min(round_times, key=round_times.get)
        if bar:
            bar.update(len(measured), round_times[best] / round_times[winner] if winner != best else 1.0)
        changed = winner != best
        best = winner
        return changed

    seeds = [s for s in layout_seeds(problem) if s not in measured]
    if seeds:
        step(seeds)
    improved = True
    while improved and left() > 0:
        improved = False
        for knob in ("cols", "rows", "unroll", "parallel", "vector"):
            group = [s for s in valid if s not in measured and _differs_only_in(s, best, knob)]
            if group and step(group[:_GROUP]):
                improved = True
    rest = [s for s in valid if s not in measured]
    rng.shuffle(rest)
    while rest and left() > 0:
        step([rest.pop() for _ in range(min(_GROUP, len(rest)))])

    final = m.time([base, best] if best != base else [base], rounds=confirm_rounds)
    if final[best] >= final[base]:
        best = base
    if bar:
        bar.update(len(measured), final[base] / final[best])
        bar.close()
    return TuneResult(problem, best, final[best], base, final[base], len(measured), time.perf_counter() - start)


def _differs_only_in(a: Schedule, b: Schedule, knob: str) -> bool:
    return getattr(a, knob) != getattr(b, knob) and all(
        getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(Schedule) if f.name != knob)


def tune_layer(m: int, n: int, k: int, block: Tuple[int, int], density: float,
               budget_s: float = DEFAULT_LAYER_BUDGET_S, ops: Sequence[str] = OPS, runner=None,
               db: Optional[TuningDatabase] = None, target: Optional[Target] = None, progress: bool = True,
               rounds: int = 5, save: bool = True) -> List[TuneResult]:
    """Tune the layer's kernels (the budget shared between ``ops``) and, with
    ``save``, store the results in ``db`` (default: the default database)."""
    target = target or Target.detect()
    # Each op gets an even share of what is left, so one that overran (a slow build, a
    # burst of load that made its timing take longer than estimated) is paid back by
    # the next; 10% is held back for those overruns.
    deadline = time.perf_counter() + 0.9 * budget_s
    results = []
    for i, op in enumerate(ops):
        share = max(deadline - time.perf_counter(), 0.0) / (len(ops) - i)
        results.append(tune_problem(Problem(op, m, n, k, tuple(block), density), share, runner, target,
                                    rounds=rounds, progress=progress))
    busy = [r.other_load for r in results if r.other_load is not None and r.other_load > BUSY_CORES]
    if busy:
        print(f"edgesparse tune: other processes used {max(busy):.2f} cores while M={m} {n}x{k} was tuned; "
              "schedules chosen under load may lose on an idle machine (tune again when it is quiet)",
              file=sys.stderr, flush=True)
    if save:
        store(results, db or TuningDatabase(), target)
    return results


def store(results: Sequence[TuneResult], db: TuningDatabase, target: Target) -> None:
    records = {}
    for r in results:
        p = r.problem
        key, record = make_record(
            p.op, p.block, "float32", ShapeClass.of(p.m, p.n, p.k, p.density), target.fingerprint, versions(), r.best,
            time_s=r.best_s, heuristic_time_s=r.heuristic_s, heuristic=dataclasses.asdict(r.heuristic),
            candidates_tried=r.tried, tuning_seconds=r.seconds, other_load_cores=r.other_load,
        )
        records[key] = record
    db.merge(records)


def geomean(values: Sequence[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))

