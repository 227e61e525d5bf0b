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


@pytest.mark.parametrize(
    "kwargs, match",
    [
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
