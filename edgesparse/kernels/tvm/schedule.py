"""Schedule knobs of the TVM kernels, and the heuristic that picks them.

Every kernel is compiled per (kernel, block shape, knobs, target): the batch size,
the matrix sizes and the number of blocks stay symbolic, so one build serves every
layer with the same block shape. ``edgesparse tune`` searches the knobs and keeps
the fastest in the tuning database; untuned, ``heuristic_*`` decides from the CPU's
vector unit.

Measured on the Zen 3 dev machine (AVX2: 8 fp32 lanes, 16 registers; both threads;
x 256x2048, W 2048x2048), GFLOP/s on the nonzeros, best tile first:

- forward 32x32 at 10%: 2x32 114, 4x16 102;  at 50%: 6x16 122, 4x16 117
- forward 16x16 at 10%: 4x16 79, 6x16 78;    grad-input 32x32 at 10%: 4x16 100, 2x32 87
- grad-weight 32x32 at 10%: 4x16 65, 2x32 54; 16x16: 4x16 54

A tile two vectors wide and half the registers deep in accumulators (4 x 16 on AVX2)
was best or within 12% of best in every case, so both heuristics use it. On AVX-512
(16 lanes, 32 registers) that rule alone gives 8 x 32 = 1 KiB of accumulators, which
TVM does not keep on the stack (``accumulator_vectors``), so there the tile stops one
vector short: 7 x 32. Blocks narrower than a vector (an output side of 1, 2 or 4 on
AVX2, or few entries in grad-weight) vectorise along the batch instead
(``vector='batch'``; the measurements are beside ``heuristic_block_rows`` and
``heuristic_grad_weight``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

from ...compiler.target import VectorUnit, vector_unit

PARALLEL_CANDIDATES = ("blocks", "batch")
VECTOR_CANDIDATES = ("columns", "batch")


@dataclass(frozen=True)
class Schedule:
    """Knobs of one kernel build.

    rows      batch rows (grad-weight: rows of the block) held in one register tile
    cols      output columns per register tile, vectorised; divides the block side it tiles
    unroll    unroll factor of the innermost reduction loop
    parallel  'blocks': threads split the block rows / nonzero blocks;
              'batch': threads split the batch (better when there are few block rows)
    vector    what the vectors run along. 'columns': the output's (grad-weight: the
              block's) columns, as above. 'batch': the batch, from copies of the inputs
              transposed inside the kernel (for blocks too narrow to fill a vector);
              ``rows`` then counts vectors of batch rows in the forward / grad-input
              tile, and in grad-weight ``rows`` x ``cols`` is the tile of the block, one
              vector accumulator per entry, with ``unroll`` over the batch vectors.
              Linear layers only: a convolution's input is never unfolded to transpose.
    """

    rows: int
    cols: int
    unroll: int
    parallel: str = "blocks"
    vector: str = "columns"

    def __post_init__(self):
        for name in ("rows", "cols", "unroll"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Schedule.{name} must be a positive int, got {value!r}")
        if self.parallel not in PARALLEL_CANDIDATES:
            raise ValueError(f"Schedule.parallel must be one of {PARALLEL_CANDIDATES}, got {self.parallel!r}")
        if self.vector not in VECTOR_CANDIDATES:
            raise ValueError(f"Schedule.vector must be one of {VECTOR_CANDIDATES}, got {self.vector!r}")

    def short(self) -> str:
        """One column's worth for tables: '4x16 u4 par=blocks vec=columns'."""
        return f"{self.rows}x{self.cols} u{self.unroll} par={self.parallel} vec={self.vector}"


def check_fits(schedule: Schedule, tiled: int, reduced: int | None, what: str) -> None:
    """Raise if the schedule's tile does not divide the block side it tiles.

    tiled: the side cut into ``cols``-wide tiles (grad-weight: also into ``rows``);
    reduced: the loop unrolled by ``unroll``, when the unroll must divide it.
    """
    if tiled % schedule.cols:
        raise ValueError(f"schedule.cols={schedule.cols} must divide the {what} block side {tiled}")
    if reduced is not None and reduced % schedule.unroll:
        raise ValueError(f"schedule.unroll={schedule.unroll} must divide the {what} reduction length {reduced}")


def check_transposable(schedule: Schedule, gathered: bool) -> None:
    """Raise if a batch-vectorised schedule meets a convolution's gathered input, which
    is never unfolded, so there is no matrix to transpose."""
    if schedule.vector == "batch" and gathered:
        raise ValueError("schedule.vector='batch' transposes the input, which a convolution's gathered input "
                         "has not got: use vector='columns' for convolutions")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# TVM keeps a constant-size buffer on the stack only below 1 KiB (kMaxStackAlloca in its
# lower_tvm_builtin pass); from 1 KiB up it takes it from the workspace allocator, LLVM
# can no longer promote it to registers, and every FMA of the tile goes through memory.
# AVX2's tiles stayed far below; AVX-512's half-the-registers tiles hit it exactly. Zen 5
# (AVX-512), x 256 x 2048 by 2048 x 2048 at 10%, one interleaved run, ms: forward 32x32,
# tile 6 x 32 0.51, 7 x 32 0.50, 8 x 32 (1 KiB) 2.12, 10 x 32 2.10; forward 16x16,
# 8 x 16 0.64, 12 x 16 0.70, 15 x 16 0.92, 16 x 16 (1 KiB) 4.22.
STACK_BYTES = 1024

# The register tile is at most this many batch rows (grad-weight: block rows) tall: on
# AVX-512 the one-vector tile got slower past 8 rows though the registers would hold 15
# (the 16x16 forward above: 8 rows 0.64 ms, 9 0.67, 12 0.70, 15 0.92); each row is one
# more broadcast load per FMA. AVX2's half of 16 registers gave 8 before this cap.
MAX_TILE_ROWS = 8


def accumulator_vectors(simd: VectorUnit) -> int:
    """Vector accumulators in one register tile: half the registers (the other half
    loads and broadcasts), and together under ``STACK_BYTES`` (fp32): 8 on AVX2, 15 on
    AVX-512, 16 on NEON."""
    return min(simd.registers // 2, (STACK_BYTES - 1) // (4 * simd.lanes))


def _last_vector_under_half(cols: int, simd: VectorUnit) -> bool:
    """Whether a tile ``cols`` wide ends in a vector less than half full.

    Such tiles ran slow on AVX-512 (Zen 5): a block-punched conv's 8 x 36 blocks (256 ch,
    8 x 8, batch 32, 10%), ms: grad-input tile 7 x 18 (16 + 2) 5.33, 4 x 36 (2 x 16 + 4)
    8.77, 8 x 12 1.85; grad-weight 4 x 36 6.49, 8 x 12 3.27. On AVX2 (Zen 3) the same
    sides end half full (12 = 8 + 4, 36 = 4 x 8 + 4), and there the whole 36 was best."""
    return 0 < cols % simd.lanes < simd.lanes / 2


def _tile(width: int, simd: VectorUnit) -> Tuple[int, int]:
    """(rows, cols) of the register tile over an output side of ``width`` columns: two
    vectors wide (or the whole side when it is narrower or not a multiple), not ending
    in a vector under half full where a divisor avoids it, as many rows as
    ``accumulator_vectors`` allows, at most ``MAX_TILE_ROWS``."""
    cols = width if width <= 2 * simd.lanes else _largest_divisor_at_most(width, 2 * simd.lanes)
    if _last_vector_under_half(cols, simd):
        fuller = [c for c in range(1, cols) if width % c == 0 and not _last_vector_under_half(c, simd)]
        cols = max(fuller, default=cols)
    vectors = -(-cols // simd.lanes)
    return max(1, min(MAX_TILE_ROWS, accumulator_vectors(simd) // vectors)), cols


def _rows_for_batch(batch: int, max_rows: int) -> int:
    """The tile height for a batch, whose last tile runs one row at a time.

    A model, not a measurement: a tile of r rows costs max(r, 4) + 1 steps per reduction
    step, since under 4 rows the FMA latency (4 cycles, 2 units) leaves too few
    independent accumulators to hide, and the +1 is the tile's own loads; the rows left
    over cost 5 each. Ties go to the shorter tile. 256 rows -> 4, 7 -> 3, 2 -> 2, 1 -> 1.
    """
    return min(range(1, max_rows + 1), key=lambda r: (batch // r) * (max(r, 4) + 1) + (batch % r) * 5)


# Vector accumulators of the batch-vectorised block-row tile: AVX2's half of its 16
# registers, kept on AVX-512 where more measured slower (forward 4x8, M = 256 on
# 2048 x 2048 at 10%, Zen 5: 2 x 4 tile 1.43 ms, 3 x 4 1.52; 2x8 blocks 2 x 2 2.02, 4 x 2 2.32).
BATCH_ROWS_ACCUMULATORS = 8


def batch_rows_tile(batch: int, out_width: int, simd: VectorUnit) -> Tuple[int, int]:
    """(vectors of batch rows, output columns) of the batch-vectorised block-row tile: at
    most a vector's worth of the output side, and batch vectors for up to
    ``BATCH_ROWS_ACCUMULATORS`` accumulators (2 x 4, 4 x 2, 4 x 1), at most 4, as many
    as there are."""
    accumulators = min(BATCH_ROWS_ACCUMULATORS, accumulator_vectors(simd))
    cols = _largest_divisor_at_most(out_width, min(simd.lanes, accumulators))
    return min(4, max(1, accumulators // cols), -(-batch // simd.lanes)), cols


# Threads split the batch, not the block rows, from this many batch rows (or from
# SPLIT_BATCH_ROWS_NARROW when an output block is one vector wide or less), in the
# kernel vectorised along the output (the batch-vectorised one keeps its rule). Split by
# block rows, each thread walks every batch row once per block row, and the touched
# columns of x come from memory again each time; split by batch, a thread keeps its
# rows' tile in cache across all block rows. ms split by block rows -> by batch, one
# interleaved run each, 10% density:
#   M = 1024, 2048 x 2048, 32x32: forward 31.4 -> 10.8, grad-input 31.6 -> 12.4
#   M = 4096, 1024 x 1024, 32x32: forward 33.2 -> 13.5, grad-input 32.7 -> 14.0
#   M = 512, 2048 x 2048, 16x16: forward 25.9 -> 6.6, grad-input 26.8 -> 10.7
#   M = 256, 2048 x 2048, 32x32: forward 2.43 -> 2.64, grad-input 2.68 -> 3.15 (blocks)
#   output side of 8, M = 64 / 128 / 256 on 2048 x 2048: forward 8x8 1.42 -> 1.28 /
#   2.56 -> 1.94 / 5.23 -> 4.09, 8x4 1.36 -> 1.00 / 2.74 -> 2.07 / 5.55 -> 3.94;
#   grad-input 8x8 2.02 -> 1.40 / 3.07 -> 2.24 / 5.48 -> 4.85, 16x8 1.01 -> 0.90 /
#   2.16 -> 1.66 / 4.89 -> 4.73
#   a convolution's forward (gathered rows), 8x36 blocks (block-punched 8x4) of 64 ch
#   at 32 x 32, batch 32 (M = 32768): 11.9 -> 7.4; 8x8 blocks of 128 ch at 16 x 16: 18.6 -> 6.8
SPLIT_BATCH_ROWS = 512
SPLIT_BATCH_ROWS_NARROW = 64


# The heuristics are memoised: every kernel call asks them, and working a schedule out
# took 12 us, a sixth of the 70 us kernel at M = 8 on 2048 x 2048 at 10% of 32 x 32.
#
# An output block narrower than a vector makes the block-row kernel vectorise along the
# batch, from a batch of one vector up. x (dy) [M, 2048] by 2048 x 2048 at 10%, GFLOP/s on
# the nonzeros, along the output -> along the batch (M = 256 / 32 / 8, one interleaved
# run each): forward 4x8 22 -> 33 / 27 -> 45 / 25 -> 30, 1x4 5 -> 22 / 7 -> 27 / 8 -> 15,
# 2x8 11 -> 32 / 15 -> 45 / 16 -> 25; grad-input 8x4 16 -> 26 / 12 -> 31 / 21 -> 25, 4x1
# 5 -> 20 / 6 -> 33 / 8 -> 14, 16x4 27 -> 39 / 30 -> 50 / 26 -> 25. Output blocks of a
# vector or more stayed along the output (forward 8x8 41 -> 34 at M = 256, 16x4 56 -> 30).
# On AVX-512 (Zen 5) an output side of 8, half a vector, also stayed along the output:
# forward 8x8, ms along the output (8 x 8 tile) -> along the batch (1 x 8), M = 256:
# 1.24 -> 1.62; M = 32: 0.150 -> 0.150. A side of 4 or less went along the batch (best
# tile of each layout, M = 256: 4x8 4.35 -> 1.43; 2x8 8.47 -> 2.02).
BATCH_LAYOUT_MAX_WIDTH = 4


@functools.lru_cache(maxsize=1024)
def heuristic_block_rows(batch: int, out_width: int, in_depth: int, out_block_rows: int, threads: int,
                         simd: VectorUnit | None = None, transposable: bool = True) -> Schedule:
    """Knobs for the block-row kernel (forward and grad-input).

    batch: rows of x (dy); out_width: columns of one output block (vectorised);
    in_depth: the block's reduction length; out_block_rows: how many output block rows
    there are to share out; transposable: False when the input is a convolution's
    implicit im2col (or the C++ host's), which the batch-vectorised kernel cannot take.
    """
    simd = simd or vector_unit()
    few_block_rows = out_block_rows < 4 * threads
    unroll = _largest_divisor_at_most(in_depth, 4)
    if out_width < simd.lanes and out_width <= BATCH_LAYOUT_MAX_WIDTH and batch >= simd.lanes and transposable:
        # Split by batch, a thread reads a strip of every row of the transposed input:
        # 8x4 grad-input at M = 256 took 9.0-10.0 ms against 6.6-7.9 split by block rows.
        parallel = "batch" if few_block_rows else "blocks"
        return Schedule(*batch_rows_tile(batch, out_width, simd), unroll, parallel, "batch")
    split_batch = (few_block_rows or batch >= SPLIT_BATCH_ROWS
                   or (out_width <= simd.lanes and batch >= SPLIT_BATCH_ROWS_NARROW))
    rows, cols = _tile(out_width, simd)
    return Schedule(_rows_for_batch(batch, rows), cols, unroll, "batch" if split_batch else "blocks")


# Blocks of at most this many entries take the batch-vectorised grad-weight, at batches
# of at least four vectors. GFLOP/s on the nonzeros, 2048 x 2048 at 10%, vectorised
# along the block's columns -> along the batch, one interleaved run per batch:
#   M = 256: 8x4 14.6 -> 28.3, 4x8 17.6 -> 30.3, 4x4 8.3 -> 27.0, 2x8 6.0 -> 21.0,
#            1x4 2.0 -> 18.8, 4x1 2.1 -> 22.7
#   M = 32:  8x4 17.9 -> 20.9, 4x8 12.1 -> 19.0, 4x4 9.6 -> 20.2, 2x8 9.4 -> 21.7,
#            1x4 2.3 -> 13.3, 4x1 2.2 -> 15.4
#   M = 8:   8x4 17.1 -> 8.5, 4x8 26.2 -> 9.8, 1x4 8.6 -> 8.0, 4x1 4.8 -> 7.2
# Below four vectors the transposes and each accumulator's sum across its lanes (7 adds
# on AVX2, per block entry) outweigh the FMAs. Larger blocks lost at M = 32 (8x8 26.8
# -> 20.1, 16x4 20.0 -> 17.3, 32x4 27.0 -> 20.9) though 16x4 and 32x4 won at M = 256
# (17.1 -> 27.2, 21.2 -> 28.8): the tuner finds those.
BATCH_VECTOR_MAX_ENTRIES = 32


def batch_tile(bn: int, bk: int, simd: VectorUnit) -> Tuple[int, int]:
    """(rows, cols) of the block covered by one batch-vectorised tile: as many vector
    accumulators as ``accumulator_vectors`` allows (the other registers load a vector of
    dy per row and of x per column); among equals, rows nearest 2 x cols (8x4 blocks at M =
    256, ms at unroll 1 / 2: 4 x 2 8.1 / 6.9, 2 x 4 8.6 / 7.9, 8 x 1 9.8 / 9.1)."""
    fits = [(r, c) for r in range(1, bn + 1) for c in range(1, bk + 1)
            if bn % r == 0 and bk % c == 0 and r * c <= accumulator_vectors(simd)]
    return max(fits, key=lambda rc: (rc[0] * rc[1], -abs(rc[0] - 2 * rc[1])))


@functools.lru_cache(maxsize=1024)
def heuristic_grad_weight(block: Tuple[int, int], batch: int, simd: VectorUnit | None = None,
                          transposable: bool = True) -> Schedule:
    """Knobs for grad-weight: the register tile covers (rows of the block) x (cols of the
    block). ``transposable``: False when x is a convolution's implicit im2col, which the
    batch-vectorised kernel cannot transpose (then the tile runs along the columns)."""
    simd = simd or vector_unit()
    bn, bk = block
    if bn * bk <= BATCH_VECTOR_MAX_ENTRIES and batch >= 4 * simd.lanes and transposable:
        return Schedule(*batch_tile(bn, bk, simd), 1, "blocks", "batch")
    rows, cols = _tile(bk, simd)
    whole_side_vectors = -(-bk // simd.lanes)
    if bk % simd.lanes and whole_side_vectors <= accumulator_vectors(simd) and not _last_vector_under_half(bk, simd):
        # A side that is no multiple of the vector (the block-punched 8 x 36) is tiled
        # whole: each step loads the panel's row once, in full vectors but the last.
        # 8 x 36 blocks of a 256-channel 3x3 conv at 10%, batch 32 on 8x8: 1 x 36 took
        # 33 ms against 91 for _tile's 4 x 12 (one thread), 52-76 against 74-84 (two).
        rows, cols = max(1, accumulator_vectors(simd) // whole_side_vectors), bk
    rows = _largest_divisor_at_most(bn, rows)
    # A tile that is the whole block reads dy and x in place (a gathered input is always
    # copied), and there unrolling the batch by 2 beat 4: 8x8 blocks, ms for u1 / u2 / u4,
    # M = 256 on 1024 x 1024 at 20%: 2.88 / 2.70 / 4.30; 2048 x 2048 at 10%: 7.14 / 6.83 /
    # 7.70; M = 32: 0.79 / 0.79 / 0.93. Copied chunks kept 4 (16x8: 6.40 / 6.29 / 5.64).
    in_place = rows == bn and cols == bk and transposable
    return Schedule(rows, cols, (2 if in_place else 4) if batch >= 16 else 1, "blocks")


# ---- tuned schedules (compiler issue): the tuning database first, the heuristic otherwise.
def tuned(op: str, W, m: int) -> Schedule | None:
    """The schedule ``edgesparse tune`` measured fastest for ``op`` on W's shape, block
    and density at batch ``m`` on this machine, or None when it has not been tuned."""
    from ...compiler.tuning import tuned_schedule

    return tuned_schedule(op, W.block, m, W.shape[0], W.shape[1], W.density)
