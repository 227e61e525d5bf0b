"""Schedule knobs of the TVM kernels, and the heuristic that picks them.

Every kernel is compiled per (kernel, block shape, knobs, target): the batch size,
the matrix sizes and the number of blocks stay symbolic, so one build serves every
layer with the same block shape. The tuner (compiler issue) searches the knobs;
until it has, ``heuristic_*`` decides.

Register budget behind the heuristic: x86 with AVX2 has 16 vector registers. A tile
of ``rows x cols`` fp32 accumulators takes rows * cols / 8 of them, plus one for the
broadcast operand and a few for loads. Measured on the Zen 3 dev machine (1 thread,
x 256x2048, W 2048x2048, 32x32 blocks at 10%): rows=2, cols=32, unroll=4 ran at
53 GFLOP/s on the nonzeros; rows=4, cols=16 at 45; rows=8, cols=8 at 31; tiles of
12 or more accumulators spilled and fell to 13-25.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# The candidates the tuner may try; the heuristic picks among the same values.
ROWS_CANDIDATES = (1, 2, 3, 4, 6, 8)
COLS_CANDIDATES = (4, 8, 16, 24, 32, 64)
UNROLL_CANDIDATES = (1, 2, 4, 8)
PARALLEL_CANDIDATES = ("blocks", "batch")

# fp32 accumulator registers we aim to fill (of 16 on AVX2), see the module docstring.
_ACCUMULATOR_VECTORS = 8
_VECTOR_LANES = 8


@dataclass(frozen=True)
class Schedule:
    """Knobs of one kernel build.

    rows      batch rows (or, for grad-weight, block rows) held in one register tile
    cols      output columns per register tile; divides the block dimension it tiles
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
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Schedule.{name} must be a positive int, got {value!r}")
        if self.parallel not in PARALLEL_CANDIDATES:
            raise ValueError(f"Schedule.parallel must be one of {PARALLEL_CANDIDATES}, got {self.parallel!r}")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _tile(width: int, depth: int) -> Tuple[int, int, int]:
    """(rows, cols, unroll) for a tile whose vector dimension is ``width`` and whose
    reduction runs over ``depth``."""
    cols = width if width <= 32 else _largest_divisor_at_most(width, 32)
    vectors = -(-cols // _VECTOR_LANES)
    rows = max(1, _ACCUMULATOR_VECTORS // vectors)
    unroll = _largest_divisor_at_most(depth, 4)
    return rows, cols, unroll


def heuristic_block_rows(out_width: int, in_depth: int, out_block_rows: int, threads: int) -> Schedule:
    """Knobs for the block-row product (forward and grad-input).

    out_width: columns of one output block (vectorised); in_depth: the block's
    reduction length; out_block_rows: how many output block rows there are to share out.
    """
    rows, cols, unroll = _tile(out_width, in_depth)
    parallel = "blocks" if out_block_rows >= 4 * threads else "batch"
    return Schedule(rows, cols, unroll, parallel)


def heuristic_grad_weight(block: Tuple[int, int], batch: int) -> Schedule:
    """Knobs for grad-weight: the register tile covers (rows of the block) x (cols of the block)."""
    bn, bk = block
    rows, cols, _ = _tile(bk, 1)
    rows = _largest_divisor_at_most(bn, rows)
    unroll = 4 if batch >= 16 else 1
    return Schedule(rows, cols, unroll, "blocks")
