"""edgesparse.nn.functional: the three products as differentiable torch.library custom ops.

Oracle: a dense nn.Linear in float64 holding the same masked weight, differentiated by
torch's own autograd; the weight gradient is read at the kept blocks by the Python loop
of tests/_oracle.blocks_in_mask_order. Masks are the test's own (random_mask).
"""

import importlib

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType

import edgesparse
from edgesparse import BSR
from edgesparse.formats import BSRIndex
from edgesparse.kernels import dispatch
from edgesparse.nn import SparseLinear, WeightGradMask, sparse_linear
from tests._oracle import (
    assert_close,
    blocks_in_mask_order,
    compile_training_step,
    device_for,
    grid,
    masked_dense,
    random_mask,
    randn,
    to64,
)

BLOCK = (4, 4)
SHAPE = (13, 19)  # (N, K): ragged for 4x4 blocks
BATCH = (2, 3)  # leading dims of x: the bias gradient sums over both
OPS = ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def spy(monkeypatch, backend):
    """Record which of a backend module's products run (and still run them)."""
    module = importlib.import_module(f"edgesparse.kernels.{backend}")
    calls = []
    for op in OPS:
        def wrapper(*args, _op=op, _original=getattr(module, op), **kwargs):
            calls.append(_op)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, op, wrapper)
    return calls


def problem(gen, dtype, device, density=0.5):
    """(x, values, bias, W, mask): leaves that require grad and the test's block mask."""
    mask = random_mask(*grid(SHAPE, BLOCK), density, gen)
    W = BSR.from_mask(randn(SHAPE, gen, dtype, device), mask, BLOCK)
    x = randn((*BATCH, SHAPE[1]), gen, dtype, device).requires_grad_()
    values = W.values.clone().requires_grad_()
    bias = randn((SHAPE[0],), gen, dtype, device).requires_grad_()
    return x, values, bias, W, mask


def test_gradcheck_reference_fp64(gen):
    x, values, bias, W, _ = problem(gen, torch.float64, "cpu")
    with edgesparse.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, W.index, W.shape, b), (x, values, bias))


@pytest.mark.parametrize("op", OPS)
def test_opcheck_schema_fake_and_autograd_registration(op, gen):
    x, values, bias, W, _ = problem(gen, torch.float32, "cpu")
    dy = randn((*BATCH, SHAPE[0]), gen)
    index, (n, k) = list(W.index), W.shape
    args = {
        # The backward products are not differentiable: their operands do not ask for grad.
        "bsr_linear": (x, values, index, n, k, bias, None, [], None),
        "bsr_linear_grad_input": (dy, values.detach(), index, n, k, "reference"),
        "bsr_linear_grad_weight": (dy, x.detach(), values.detach(), index, n, k, "reference"),
    }[op]
    with edgesparse.use_backend("reference"):
        torch.library.opcheck(getattr(torch.ops.edgesparse, op).default, args)


def masked_problem(gen, dtype, device):
    """problem() plus a WeightGradMask keeping every other kept block, and the elements
    of an element mask set on those blocks."""
    x, values, bias, W, mask = problem(gen, dtype, device)
    blocks = torch.arange(0, W.nnz_blocks, 2)
    sub_mask = torch.zeros_like(mask)
    sub_mask[W.row_indices[blocks].long(), W.col_indices[blocks].long()] = True
    elements = (torch.rand(len(blocks), *BLOCK, generator=gen) < 0.5).to(dtype).to(device)
    return x, values, bias, W, mask, WeightGradMask(blocks.to(device), BSRIndex.from_block_mask(sub_mask.to(device)), elements)


def test_opcheck_with_a_weight_grad_mask(gen):
    x, values, bias, W, _, grad_mask = masked_problem(gen, torch.float32, "cpu")
    args = (x, values, list(W.index), *W.shape, bias, grad_mask.blocks, list(grad_mask.index), grad_mask.elements)
    with edgesparse.use_backend("reference"):
        torch.library.opcheck(torch.ops.edgesparse.bsr_linear.default, args)


@pytest.mark.parametrize("backend", ["reference", "tvm", "triton"])
def test_weight_grad_mask_computes_only_its_blocks_and_elements(backend, gen):
    device = device_for(backend)
    x, values, bias, W, mask, grad_mask = masked_problem(gen, torch.float32, device)
    dy = randn((*BATCH, SHAPE[0]), gen, device=device)
    with edgesparse.use_backend(backend):
        sparse_linear(x, values, W.index, W.shape, bias, grad_mask).backward(dy)
    full = blocks_in_mask_order(to64(dy).reshape(-1, SHAPE[0]).T @ to64(x).reshape(-1, SHAPE[1]), mask, BLOCK)
    expected = torch.zeros_like(full)
    expected[grad_mask.blocks.cpu()] = full[grad_mask.blocks.cpu()] * to64(grad_mask.elements)
    assert_close(values.grad, expected, torch.float32, "masked values.grad")
    # x and bias gradients are not masked.
    assert_close(x.grad, to64(dy) @ masked_dense(W.to_dense(), mask, BLOCK), torch.float32, "x.grad")


# Triton runs under its interpreter on CPU: SHAPE is small enough for it.
@pytest.mark.parametrize("backend", ["reference", "tvm", "triton"])
def test_forward_and_all_gradients_match_masked_dense_linear(backend, gen):
    device = device_for(backend)
    x, values, bias, W, mask = problem(gen, torch.float32, device)
    dense = nn.Linear(SHAPE[1], SHAPE[0], dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(masked_dense(W.to_dense(), mask, BLOCK))
        dense.bias.copy_(to64(bias))
    x64 = to64(x).requires_grad_()
    dy = randn((*BATCH, SHAPE[0]), gen)  # a non-uniform upstream gradient

    with edgesparse.use_backend(backend):
        y = sparse_linear(x, values, W.index, W.shape, bias)
        y.backward(dy.to(device))
    y64 = dense(x64)
    y64.backward(to64(dy))

    assert_close(y, y64, torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "x.grad")
    assert_close(values.grad, blocks_in_mask_order(dense.weight.grad, mask, BLOCK), torch.float32, "values.grad")
    assert_close(bias.grad, dense.bias.grad, torch.float32, "bias.grad")


@pytest.mark.parametrize("wanted", ["x", "values", "bias", "x+values+bias"])
def test_backward_runs_only_the_products_asked_for(wanted, gen, monkeypatch):
    x, values, bias, W, _ = problem(gen, torch.float32, "cpu")
    leaves = {"x": x, "values": values, "bias": bias}
    for name, leaf in leaves.items():
        leaf.requires_grad_(name in wanted.split("+"))
    calls = spy(monkeypatch, "reference")
    with edgesparse.use_backend("reference"):
        sparse_linear(x, values, W.index, W.shape, bias).sum().backward()
    assert calls.count("bsr_linear_grad_input") == ("x" in wanted)
    assert calls.count("bsr_linear_grad_weight") == ("values" in wanted)
    for name, leaf in leaves.items():
        assert (leaf.grad is not None) == (name in wanted), name


def test_backward_runs_on_the_backend_the_forward_was_asked_for(gen, monkeypatch):
    # Autograd may run the backward on another thread (a CUDA graph's device threads),
    # or the caller may leave the use_backend block first: either way the backward must
    # not silently switch to the automatic choice (tvm here).
    assert dispatch.select(torch.device("cpu"), torch.float32).__name__ == "edgesparse.kernels.tvm"
    x, values, bias, W, _ = problem(gen, torch.float32, "cpu")
    calls = spy(monkeypatch, "reference")
    with edgesparse.use_backend("reference"):
        y = sparse_linear(x, values, W.index, W.shape, bias)
    y.sum().backward()
    assert calls == ["bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight"]


def test_compiled_training_step_has_no_graph_break(gen):
    model = nn.Sequential(SparseLinear(19, 13, BLOCK, 0.5), nn.ReLU(), SparseLinear(13, 6, BLOCK, 0.7))
    x, target = randn((5, 19), gen), randn((5, 6), gen)
    (loss_c, grads_c), (loss_e, grads_e), targets = compile_training_step(model, x, target, "reference")
    assert {f"edgesparse.{op}.default" for op in OPS} <= targets
    torch.testing.assert_close(loss_c, loss_e)
    for got, expected in zip(grads_c, grads_e):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ memory
def allocation_peak(fn) -> int:
    """Peak bytes held, above what was held before, by torch's CPU allocator while fn runs.

    Every tensor torch allocates, in any op or kernel wrapper (outputs, repacked operands,
    gathers), is one allocation event of the profiler, recorded in order with its size
    (frees negative); the peak of their running sum is the extra memory fn needed. The
    TVM kernels allocate nothing of their own beyond a per-thread register tile.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted(
        (e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation),
        key=lambda e: e.start_time_ns,
    )
    held = peak = 0
    for event in events:
        held += event.extra_fields.alloc_size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("block", [BLOCK, (32, 32)], ids=["4x4-read-in-place", "32x32-copied-in-chunks"])
def test_weight_gradient_extra_peak_memory_is_the_nonzero_storage(gen, block):
    # A frozen input, no bias: the backward computes the weight gradient only. Half the
    # blocks kept, so a dense N x K gradient would need 2x the nonzero storage. A batch
    # of 256: the TVM kernel reads dy and x in place or copies 256-row chunks into
    # per-thread buffers, so nothing grows with the batch (an earlier version packed
    # M x (N + K) panels: 4x the nonzeros here). The reference backend gathers
    # [M, blocks, bn] copies of its operands; it is the oracle, not the path this bound is for.
    n = k = 256
    layer = SparseLinear(k, n, block, 0.5, bias=False)
    x, dy = randn((256, k), gen), randn((256, n), gen)
    nonzero_bytes = layer.values.numel() * layer.values.element_size()
    with edgesparse.use_backend("tvm"):
        layer(x).backward(dy)  # builds the kernels outside the measurement
        layer.values.grad = None
        y = layer(x)
        peak = allocation_peak(lambda: y.backward(dy))
    assert layer.values.grad is not None
    assert peak <= 1.1 * nonzero_bytes, f"backward held {peak} bytes, {peak / nonzero_bytes:.2f}x the nonzeros"

    # The meter sees a dense gradient when there is one: the masked-dense layer's.
    dense = layer.to_dense()
    y = dense(x)
    dense_peak = allocation_peak(lambda: y.backward(dy))
    assert dense_peak >= n * k * 4
