"""Schedule knobs of the TVM kernels, and the heuristic that picks them.

Every kernel is compiled per (kernel, block shape, knobs, target): the batch size,
the matrix sizes and the number of blocks stay symbolic, so one build serves every
layer with the same block shape. The tuner (compiler issue) will search the knobs;
until it has, ``heuristic_*`` decides from the CPU's vector unit.

Measured on the Zen 3 dev machine (AVX2: 8 fp32 lanes, 16 registers; 2 threads;
x 256x2048, W 2048x2048 at 10% unless noted), GFLOP/s on the nonzeros:

- forward / grad-input (the block-row kernel): a tile of 6 batch rows x 16 columns
  (12 accumulator registers, the shape of the classic 6x16 AVX2 GEMM micro-kernel)
  was best or within noise of best at every block: forward 32x32 at 50% 75 (rows=2,
  cols=32: 63), grad-input 32x32 57, 16x16 49; forward 8x8 24 with 6x8.
- grad-weight: 8 accumulator registers won (rows=2 x cols=32 at 32x32: 43.5;
  rows=4 x cols=16 at 16x16: 52), a 12-register tile lost a few percent.

On AVX-512 (16 lanes, 32 registers) the same rules give twice-as-wide, twice-as-tall
tiles; that is the rule scaled, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ...compiler.target import VectorUnit, vector_unit

# The values the tuner may try.
ROWS_CANDIDATES = (1, 2, 3, 4, 6, 8, 12)
COLS_CANDIDATES = (4, 8, 16, 32, 64)
UNROLL_CANDIDATES = (1, 2, 4, 8)
PARALLEL_CANDIDATES = ("blocks", "batch")


@dataclass(frozen=True)
class Schedule:
    """Knobs of one kernel build.

    rows      batch rows (grad-weight: rows of the block) held in one register tile
    cols      output columns per register tile, vectorised; divides the block side it tiles
    unroll    unroll factor of the innermost reduction loop
    parallel  'blocks': threads split the block rows / nonzero blocks;
              'batch': threads split the batch (better when there are few block rows)
    """

    rows: int
    cols: int
    unroll: int
    parallel: str = "blocks"

    def __post_init__(self):
        for name in ("rows", "cols", "unroll"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Schedule.{name} must be a positive int, got {value!r}")
        if self.parallel not in PARALLEL_CANDIDATES:
            raise ValueError(f"Schedule.parallel must be one of {PARALLEL_CANDIDATES}, got {self.parallel!r}")


def check_fits(schedule: Schedule, tiled: int, reduced: int | None, what: str) -> None:
    """Raise if the schedule's tile does not divide the block side it tiles.

    tiled: the side cut into ``cols``-wide tiles (grad-weight: also into ``rows``);
    reduced: the loop unrolled by ``unroll``, when the unroll must divide it.
    """
    if tiled % schedule.cols:
        raise ValueError(f"schedule.cols={schedule.cols} must divide the {what} block side {tiled}")
    if reduced is not None and reduced % schedule.unroll:
        raise ValueError(f"schedule.unroll={schedule.unroll} must divide the {what} reduction length {reduced}")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _tile(width: int, accumulators: int, max_cols: int, simd: VectorUnit) -> Tuple[int, int]:
    """(rows, cols) of a register tile over an output side of ``width`` columns that
    holds about ``accumulators`` vector registers."""
    cols = width if width <= max_cols else _largest_divisor_at_most(width, max_cols)
    vectors = -(-cols // simd.lanes)
    return max(1, accumulators // vectors), cols


def _rows_for_batch(batch: int, max_rows: int) -> int:
    """The tile height for a batch, which is padded to whole tiles.

    A model, not a measurement: a tile of r rows costs max(r, 4) + 1 steps per reduction
    step, since under 4 rows the FMA latency (4 cycles, 2 units) leaves too few
    independent accumulators to hide, and the +1 is the tile's own loads. Ties go to the
    shorter tile (less padding). 256 rows -> 6, 8 -> 4, 7 -> 4, 2 -> 2, 1 -> 1.
    """
    return min(range(1, max_rows + 1), key=lambda r: -(-batch // r) * (max(r, 4) + 1))


def heuristic_block_rows(batch: int, out_width: int, in_depth: int, out_block_rows: int, threads: int,
                         simd: VectorUnit | None = None) -> Schedule:
    """Knobs for the block-row kernel (forward and grad-input).

    batch: rows of x (dy); out_width: columns of one output block (vectorised);
    in_depth: the block's reduction length; out_block_rows: how many output block rows
    there are to share out.
    """
    simd = simd or vector_unit()
    # 3/4 of the registers accumulate, two vectors wide: 6 x 16 on AVX2.
    rows, cols = _tile(out_width, simd.registers * 3 // 4, 2 * simd.lanes, simd)
    rows = _rows_for_batch(batch, min(rows, simd.registers * 3 // 8))
    parallel = "blocks" if out_block_rows >= 4 * threads else "batch"
    return Schedule(rows, cols, _largest_divisor_at_most(in_depth, 4), parallel)


def heuristic_grad_weight(block: Tuple[int, int], batch: int, simd: VectorUnit | None = None) -> Schedule:
    """Knobs for grad-weight: the register tile covers (rows of the block) x (cols of the block)."""
    simd = simd or vector_unit()
    bn, bk = block
    rows, cols = _tile(bk, simd.registers // 2, 4 * simd.lanes, simd)
    return Schedule(_largest_divisor_at_most(bn, rows), cols, 4 if batch >= 16 else 1, "blocks")
