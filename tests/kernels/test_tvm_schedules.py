"""The TVM kernels under every value of their schedule knobs (the heuristic picks only
some), the knob validation, and the transposed-values cache of the forward.

Oracle: dense float64 torch on the masked weight, as in the per-op tests.
"""

import pytest
import torch

from edgesparse import BSR, ops, use_backend
from edgesparse.kernels.tvm import bsr_linear, bsr_linear_grad_input, bsr_linear_grad_weight
from edgesparse.kernels.tvm.schedule import Schedule
from tests._oracle import assert_close, grid, masked_dense, random_mask, randn, to64

SHAPE, BLOCK = (67, 131), (16, 8)  # ragged: 5 block rows (last one 3 rows tall), 17 block columns
SCHEDULES = [
    Schedule(1, 8, 1, "blocks"),
    Schedule(3, 4, 2, "batch"),
    Schedule(6, 16, 4, "blocks"),
    Schedule(4, 8, 8, "batch"),
    Schedule(2, 2, 1, "blocks"),
]


@pytest.fixture
def problem(gen):
    mask = random_mask(*grid(SHAPE, BLOCK), 0.4, gen)
    w = randn(SHAPE, gen)
    W = BSR.from_mask(w, mask, BLOCK)
    x, dy, bias = randn((11, SHAPE[1]), gen), randn((11, SHAPE[0]), gen), randn((SHAPE[0],), gen)
    return W, masked_dense(w, mask, BLOCK), mask, x, dy, bias


def _fits(schedule: Schedule, out_side: int, depth: int) -> bool:
    return out_side % schedule.cols == 0 and depth % schedule.unroll == 0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_forward_and_grad_input_under_each_schedule(problem, schedule):
    W, w_masked, _, x, dy, bias = problem
    bn, bk = BLOCK
    if _fits(schedule, bn, bk):
        assert_close(bsr_linear(x, W, bias, schedule), to64(x) @ w_masked.T + to64(bias), torch.float32, "forward")
    if _fits(schedule, bk, bn):
        assert_close(bsr_linear_grad_input(dy, W, schedule), to64(dy) @ w_masked, torch.float32, "grad-input")


@pytest.mark.parametrize("schedule", [Schedule(1, 8, 1), Schedule(2, 8, 4), Schedule(4, 4, 8), Schedule(16, 8, 2)], ids=str)
def test_grad_weight_under_each_schedule(problem, schedule):
    W, _, mask, x, dy, _ = problem
    values = bsr_linear_grad_weight(dy, x, W, schedule)
    dense = to64(dy).T @ to64(x)
    expected = masked_dense(dense, mask, BLOCK)
    assert_close(W.with_values(values).to_dense(), expected, torch.float32, "grad-weight")


# Batch-vectorised forward and grad-input: output blocks of 1, 2 and 4 columns (and 8),
# ragged shapes, batches below, at and past a vector and not a multiple of one.
@pytest.mark.parametrize("block", [(1, 4), (4, 1), (2, 8), (8, 4)], ids=str)
@pytest.mark.parametrize("m", [1, 8, 13, 37])
@pytest.mark.parametrize("vectors, parallel", [(1, "blocks"), (3, "batch")])
def test_batch_vectorised_forward_and_grad_input(gen, block, m, vectors, parallel):
    shape = (43, 29)
    mask = random_mask(*grid(shape, block), 0.4, gen)
    w = randn(shape, gen)
    W, w_masked = BSR.from_mask(w, mask, block), masked_dense(w, mask, block)
    x, dy, bias = randn((m, shape[1]), gen), randn((m, shape[0]), gen), randn((shape[0],), gen)
    bn, bk = block
    y = bsr_linear(x, W, bias, Schedule(vectors, min(bn, 8), 1, parallel, "batch"))
    assert_close(y, to64(x) @ w_masked.T + to64(bias), torch.float32, "forward")
    dx = bsr_linear_grad_input(dy, W, Schedule(vectors, min(bk, 8), 1, parallel, "batch"))
    assert_close(dx, to64(dy) @ w_masked, torch.float32, "grad-input")


def test_the_heuristic_vectorises_narrow_outputs_along_the_batch():
    from edgesparse.compiler.target import VectorUnit
    from edgesparse.kernels.tvm.schedule import heuristic_block_rows

    avx2 = VectorUnit(8, 16)
    assert heuristic_block_rows(256, 4, 8, 512, 2, avx2) == Schedule(2, 4, 4, "blocks", "batch")
    assert heuristic_block_rows(256, 1, 4, 2048, 2, avx2) == Schedule(4, 1, 4, "blocks", "batch")
    assert heuristic_block_rows(8, 2, 8, 1024, 2, avx2) == Schedule(1, 2, 4, "blocks", "batch")  # one vector of batch
    assert heuristic_block_rows(7, 4, 8, 512, 2, avx2).vector == "columns"  # less than a vector
    assert heuristic_block_rows(256, 8, 8, 256, 2, avx2).vector == "columns"  # a whole vector wide
    assert heuristic_block_rows(256, 4, 8, 512, 2, avx2, transposable=False).vector == "columns"


@pytest.mark.parametrize("simd", [(8, 16), (16, 32), (4, 32)], ids=["avx2", "avx512", "neon"])
def test_the_heuristics_keep_their_accumulators_under_tvms_stack_limit(simd):
    """TVM keeps a buffer on the stack (where LLVM makes registers of it) only below 1 KiB."""
    from edgesparse.compiler.target import VectorUnit
    from edgesparse.kernels.tvm.schedule import heuristic_block_rows, heuristic_grad_weight

    unit = VectorUnit(*simd)

    def accumulator_bytes(s):
        return 4 * s.rows * s.cols * (unit.lanes if s.vector == "batch" else 1)

    for side in (1, 2, 4, 8, 16, 32, 36, 64):
        for batch in (1, 8, 32, 256, 1024):
            for transposable in (True, False):
                s = heuristic_block_rows(batch, side, 32, 64, 2, unit, transposable)
                assert accumulator_bytes(s) < 1024, (side, batch, s)
                for other in (1, 4, 8, 16, 32, 64):
                    g = heuristic_grad_weight((other, side), batch, unit, transposable)
                    assert accumulator_bytes(g) < 1024, ((other, side), batch, g)


def test_tvm_takes_an_accumulator_tile_of_the_stack_limit_off_the_stack():
    """The premise of STACK_BYTES: a 7 x 32 fp32 tile (896 B) stays a stack buffer that LLVM
    keeps in registers; an 8 x 32 one (1 KiB) is allocated from TVM's workspace."""
    import tvm

    from edgesparse.kernels.tvm._block_rows import kernel_recipe
    from edgesparse.kernels.tvm.schedule import STACK_BYTES

    def uses_workspace(schedule):
        maker, params = kernel_recipe(32, 32, schedule, False, False, False)
        executable = tvm.compile(tvm.IRModule({"main": maker(*params)}), target="llvm")
        module = getattr(executable, "mod", executable)
        sources = [module.inspect_source("ll")] + [m.inspect_source("ll") for m in module.imports]
        return any("TVMBackendAllocWorkspace" in text for text in sources)

    rows = STACK_BYTES // (4 * 32)
    assert uses_workspace(Schedule(rows, 32, 1))
    assert not uses_workspace(Schedule(rows - 1, 32, 1))


def test_the_avx512_heuristic_tiles():
    """On AVX-512 the two-vector tile stops at 7 rows (8 would be 1 KiB); a one-vector tile
    at 8 rows; an output side of 8 stays along the output, one of 4 goes along the batch."""
    from edgesparse.compiler.target import VectorUnit
    from edgesparse.kernels.tvm.schedule import heuristic_block_rows, heuristic_grad_weight

    avx512 = VectorUnit(16, 32)
    assert heuristic_block_rows(256, 32, 32, 64, 2, avx512) == Schedule(7, 32, 4, "blocks")
    assert heuristic_block_rows(256, 64, 64, 16, 2, avx512) == Schedule(7, 32, 4, "blocks")
    assert heuristic_block_rows(256, 16, 16, 128, 2, avx512) == Schedule(8, 16, 4, "batch")
    assert heuristic_block_rows(256, 8, 8, 256, 2, avx512) == Schedule(8, 8, 4, "batch")
    assert heuristic_block_rows(256, 4, 8, 512, 2, avx512) == Schedule(2, 4, 4, "blocks", "batch")
    assert heuristic_grad_weight((32, 32), 256, avx512) == Schedule(4, 32, 4, "blocks")
    assert heuristic_grad_weight((8, 4), 256, avx512) == Schedule(4, 2, 1, "blocks", "batch")
    # A side of 36 (block-punched 8x4 convs): no tile ending in a vector under half full
    # (18 = 16 + 2, 36 = 2 x 16 + 4) on AVX-512; on AVX2 36 = 4 x 8 + 4 stays whole.
    assert heuristic_block_rows(2048, 36, 8, 32, 2, avx512, transposable=False) == Schedule(8, 12, 4, "batch")
    assert heuristic_grad_weight((8, 36), 2048, avx512, transposable=False) == Schedule(8, 12, 4, "blocks")
    assert heuristic_grad_weight((8, 36), 2048, VectorUnit(8, 16), transposable=False) == Schedule(1, 36, 4, "blocks")


def test_the_heuristic_splits_long_batches_and_narrow_outputs_between_threads():
    from edgesparse.compiler.target import VectorUnit
    from edgesparse.kernels.tvm.schedule import heuristic_block_rows

    avx2 = VectorUnit(8, 16)
    assert heuristic_block_rows(256, 32, 32, 64, 2, avx2).parallel == "blocks"
    assert heuristic_block_rows(512, 32, 32, 64, 2, avx2).parallel == "batch"  # a long batch
    assert heuristic_block_rows(64, 8, 8, 256, 2, avx2).parallel == "batch"  # an output side of one vector
    assert heuristic_block_rows(63, 8, 8, 256, 2, avx2).parallel == "blocks"
    assert heuristic_block_rows(256, 16, 16, 128, 2, avx2).parallel == "blocks"
    assert heuristic_block_rows(32, 32, 32, 7, 2, avx2).parallel == "batch"  # too few block rows to share
    assert heuristic_block_rows(64, 4, 8, 256, 2, avx2, transposable=False).parallel == "batch"  # a conv's narrow output
    assert heuristic_block_rows(1024, 4, 8, 256, 2, avx2).parallel == "blocks"  # the batch-vectorised kernel


def test_convolutions_refuse_batch_vectorised_schedules(gen):
    from edgesparse.kernels.tvm.bsr_conv2d import conv2d_grad_input, unfold_tables

    x = randn((2, 3, 5, 5), gen)
    W = BSR.from_dense(randn((4, 27), gen), (4, 3))
    flat, row_base, col_off = unfold_tables(x, 27, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="vector='batch'.*convolution"):
        bsr_linear(flat, W, None, Schedule(1, 4, 1, "blocks", "batch"), gather=(row_base, col_off))
    with pytest.raises(ValueError, match="vector='batch'.*convolution"):
        conv2d_grad_input(randn((2, 4, 5, 5), gen), W, x.shape, (3, 3), (1, 1), (1, 1), (1, 1),
                          schedule=Schedule(1, 3, 1, "blocks", "batch"))


# Batch-vectorised grad-weight: ragged shapes (the last block row / column cut short),
# batches below, at and past a vector (8 lanes on AVX2) and not a multiple of one.
@pytest.mark.parametrize("block, tile", [((1, 4), (1, 4)), ((4, 1), (4, 1)), ((8, 4), (4, 2)), ((16, 8), (2, 4)), ((8, 4), (1, 1))],
                         ids=str)
@pytest.mark.parametrize("m", [1, 8, 13, 37])
@pytest.mark.parametrize("unroll", [1, 3])
def test_batch_vectorised_grad_weight(gen, block, tile, m, unroll):
    shape = (43, 29)
    mask = random_mask(*grid(shape, block), 0.4, gen)
    W = BSR.from_mask(randn(shape, gen), mask, block)
    x, dy = randn((m, shape[1]), gen), randn((m, shape[0]), gen)
    values = bsr_linear_grad_weight(dy, x, W, Schedule(*tile, unroll, "blocks", "batch"))
    expected = masked_dense(to64(dy).T @ to64(x), mask, block)
    assert_close(W.with_values(values).to_dense(), expected, torch.float32, "grad-weight")


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_batch_vectorised_grad_weight_at_density_0_and_1(gen, density):
    shape, block = (20, 12), (4, 4)
    mask = torch.full(grid(shape, block), density == 1.0)
    W = BSR.from_mask(randn(shape, gen), mask, block)
    x, dy = randn((9, 12), gen), randn((9, 20), gen)
    values = bsr_linear_grad_weight(dy, x, W, Schedule(2, 4, 1, "blocks", "batch"))
    assert values.shape == (W.nnz_blocks, 4, 4)
    assert_close(W.with_values(values).to_dense(), masked_dense(to64(dy).T @ to64(x), mask, block), torch.float32)


def test_the_heuristic_vectorises_small_blocks_along_a_long_batch_except_in_convolutions():
    from edgesparse.kernels.tvm.schedule import heuristic_grad_weight

    from edgesparse.compiler.target import VectorUnit

    avx2 = VectorUnit(8, 16)
    assert heuristic_grad_weight((8, 4), 256, avx2) == Schedule(4, 2, 1, "blocks", "batch")
    assert heuristic_grad_weight((1, 4), 32, avx2) == Schedule(1, 4, 1, "blocks", "batch")
    assert heuristic_grad_weight((1, 4), 31, avx2).vector == "columns"  # under four vectors of batch
    assert heuristic_grad_weight((32, 32), 256, avx2).vector == "columns"
    assert heuristic_grad_weight((8, 4), 256, avx2, transposable=False).vector == "columns"


def test_batch_vectorised_grad_weight_refuses_a_gathered_input(gen):
    from edgesparse.kernels.tvm.bsr_conv2d import unfold_tables

    x, dy_rows = randn((2, 3, 5, 5), gen), randn((50, 8), gen)
    W = BSR.from_dense(randn((8, 27), gen), (8, 3))
    flat, row_base, col_off = unfold_tables(x, 27, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="vector='batch'.*convolution"):
        bsr_linear_grad_weight(dy_rows, flat, W, Schedule(4, 3, 1, "blocks", "batch"), gather=(row_base, col_off))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rows=2, cols=8, unroll=1, vector="rows"), "vector"),
        (dict(rows=0, cols=8, unroll=1), "rows"),
        (dict(rows=2, cols=-8, unroll=1), "cols"),
        (dict(rows=2, cols=8, unroll=1.5), "unroll"),
        (dict(rows=2, cols=8, unroll=1, parallel="threads"), "parallel"),
    ],
)
def test_schedule_rejects_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_forward_sees_in_place_updates_of_the_values(problem):
    """The forward keeps W's blocks transposed between calls; an optimizer step writes
    the values in place, and the next forward must use the new values."""
    W, w_masked, _, x, _, _ = problem
    with use_backend("tvm"):
        before = ops.bsr_linear(x, W)
        W.values.mul_(-2.0)
        after = ops.bsr_linear(x, W)
    assert_close(before, to64(x) @ w_masked.T, torch.float32, "before the update")
    assert_close(after, -2.0 * (to64(x) @ w_masked.T), torch.float32, "after the update")


def test_schedules_that_do_not_divide_the_block_are_rejected(problem):
    W, _, _, x, dy, _ = problem  # blocks of 16 x 8
    with pytest.raises(ValueError, match="cols=32"):
        bsr_linear(x, W, None, Schedule(2, 32, 1))
    with pytest.raises(ValueError, match="unroll=3"):
        bsr_linear_grad_input(dy, W, Schedule(2, 8, 3))
    with pytest.raises(ValueError, match="rows=3"):
        bsr_linear_grad_weight(dy, x, W, Schedule(3, 8, 1))
