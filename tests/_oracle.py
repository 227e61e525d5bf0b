"""Shared helpers of the test suite: independent oracles, test data and tolerances.

Everything here is built from first principles (dense torch in float64, Python loops
over blocks); nothing calls the code under test to produce an expected value. A test
chooses a block mask itself, builds the masked dense weight from that mask, and reads
the package's result against it.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import pytest
import torch

from edgesparse import BSR, use_backend

# ---------------------------------------------------------------- tolerances
# Max abs error allowed, relative to the oracle's scale (max |oracle|). The oracle is
# computed in float64 from the very same (already rounded) low-precision inputs, so
# what remains is accumulation error plus the rounding of the output, at most the unit
# roundoff u of an element's magnitude: u = 2^-24 (fp32), 2^-11 = 4.9e-4 (fp16),
# 2^-8 = 3.9e-3 (bf16). fp16 allows ~4u and bf16 ~2.5u (a bias added after rounding the
# product rounds twice) for reductions of <= 140 terms accumulated in fp32, as every
# backend does (summing block products in fp16/bf16 instead used ~0.75 of this already).
# fp32 allows ~170u: the reduction itself, in any order, stays far below it, while TF32
# (~1e-3) does not pass.
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
    torch.float64: 1e-12,
}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# fp32 runs on every backend (the `backend` fixture); these add the other dtypes. fp16 and
# bf16 are triton's; the reference is what dispatch falls back to for them (and for fp64)
# on a CPU, so it is held to the same tolerances.
LOW_PRECISION_CASES = [
    pytest.param(backend, dtype, id=f"{backend}-{DTYPE_IDS[dtype]}")
    for backend, dtype in [
        ("triton", torch.float16),
        ("triton", torch.bfloat16),
        ("reference", torch.float16),
        ("reference", torch.bfloat16),
        ("reference", torch.float64),
    ]
]


# ---------------------------------------------------------------- shapes
BLOCK_SHAPES = [(1, 4), (4, 1), (8, 4), (8, 8), (16, 16), (32, 32), (64, 64), (3, 5)]


def block_id(block: Tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def block_params(blocks: Sequence[Tuple[int, int]] = BLOCK_SHAPES):
    return [pytest.param(b, id=block_id(b)) for b in blocks]


RAGGED_SHAPE = (67, 131)  # (N, K), a multiple of no block size above except 1


def aligned_shape(block: Tuple[int, int]) -> Tuple[int, int]:
    """A logical (N, K) that is a whole number of blocks, N <= 140, K <= 140."""
    bn, bk = block
    return bn * max(2, 48 // bn), bk * max(2, 64 // bk)


def logical_shape(kind: str, block: Tuple[int, int]) -> Tuple[int, int]:
    return RAGGED_SHAPE if kind == "ragged" else aligned_shape(block)


SHAPE_KINDS = ["ragged", "aligned"]


def grid(shape: Tuple[int, int], block: Tuple[int, int]) -> Tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


# ---------------------------------------------------------------- devices
def device_for(backend: str) -> torch.device:
    """Where a backend's tests put their tensors: triton on CUDA when there is one,
    otherwise on the CPU under the interpreter (TRITON_INTERPRET=1, set in conftest)."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------- masks and dense oracles
def random_mask(nb: int, kb: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A [nb, kb] bool block mask with exactly round(density * nb * kb) blocks set."""
    count = int(round(density * nb * kb))
    mask = torch.zeros(nb * kb, dtype=torch.bool)
    mask[torch.randperm(nb * kb, generator=gen)[:count]] = True
    return mask.reshape(nb, kb)


def mask_with_empty_lines(nb: int, kb: int, gen: torch.Generator):
    """A random mask with at least one empty block row and one empty block column,
    and at least one kept block. Returns (mask, empty_rows, empty_cols)."""
    assert nb >= 2 and kb >= 2, "need two block rows and columns to empty one of each"
    empty_rows = sorted({0, nb // 2}) if nb > 2 else [0]
    empty_cols = sorted({kb - 1, kb // 2}) if kb > 2 else [kb - 1]
    mask = torch.rand(nb, kb, generator=gen) < 0.6
    mask[empty_rows, :] = False
    mask[:, empty_cols] = False
    keep_r = next(i for i in range(nb) if i not in empty_rows)
    keep_c = next(j for j in range(kb) if j not in empty_cols)
    mask[keep_r, keep_c] = True
    return mask, empty_rows, empty_cols


def expand_mask(mask: torch.Tensor, block: Tuple[int, int], shape: Tuple[int, int]) -> torch.Tensor:
    """Element mask of logical shape from a block mask (repeat_interleave, then crop)."""
    bn, bk = block
    full = mask.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def masked_dense(w: torch.Tensor, mask: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """float64 CPU copy of w with every block outside ``mask`` zeroed."""
    w64 = w.detach().to("cpu", torch.float64)
    return w64 * expand_mask(mask, block, tuple(w.shape)).to(torch.float64)


def padded(t: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """t [N, K] zero-padded to whole blocks."""
    nb, kb = grid(tuple(t.shape), block)
    out = torch.zeros(nb * block[0], kb * block[1], dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def blocks_in_mask_order(dense: torch.Tensor, mask: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """The blocks of ``dense`` (logical shape) where mask is set, row-major, padding zero:
    a Python loop over block coordinates and plain slicing."""
    bn, bk = block
    p = padded(dense, block)
    out = []
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if bool(mask[i, j]):
                out.append(p[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk])
    if not out:
        return torch.zeros(0, bn, bk, dtype=dense.dtype)
    return torch.stack(out)


def expected_indices(mask: torch.Tensor):
    """(row_offsets, col_indices, row_indices) of a row-major BSR of this mask, by hand."""
    row_offsets, col_indices, row_indices = [0], [], []
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if bool(mask[i, j]):
                col_indices.append(j)
                row_indices.append(i)
        row_offsets.append(len(col_indices))
    as_t = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return as_t(row_offsets), as_t(col_indices), as_t(row_indices)


def top_blocks_mask(w: torch.Tensor, block: Tuple[int, int], density: float) -> torch.Tensor:
    """The density * blocks (halves up) blocks of w [N, K] with the largest L2 norm, the
    norms computed by a loop over blocks."""
    nb, kb = grid(tuple(w.shape), block)
    bn, bk = block
    p = padded(to64(w), block)
    norms = torch.tensor([[float(p[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].norm()) for j in range(kb)] for i in range(nb)])
    keep = math.floor(density * nb * kb + 0.5)
    mask = torch.zeros(nb * kb, dtype=torch.bool)
    mask[norms.flatten().argsort(descending=True)[:keep]] = True
    return mask.reshape(nb, kb)


def assert_pattern(layer, mask: torch.Tensor) -> None:
    """A sparse layer's saved pattern (row_offsets, col_indices) is exactly ``mask``'s."""
    row_offsets, col_indices, _ = expected_indices(mask)
    assert torch.equal(layer.row_offsets, row_offsets) and torch.equal(layer.col_indices, col_indices)


def padding_mask(nnz_rows: torch.Tensor, nnz_cols: torch.Tensor, block, shape) -> torch.Tensor:
    """[nnzb, bn, bk] bool: True where an entry of a stored block lies outside the logical shape."""
    bn, bk = block
    r = nnz_rows.long()[:, None, None] * bn + torch.arange(bn)[None, :, None]
    c = nnz_cols.long()[:, None, None] * bk + torch.arange(bk)[None, None, :]
    return (r >= shape[0]) | (c >= shape[1])


# ---------------------------------------------------------------- inputs
def randn(shape, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


# Layouts of an operand [..., width]: contiguous 2-D, a transposed view, a column-sliced
# view, a contiguous batch [B, T, width] and a non-contiguous batch (a transposed [T, B]).
LAYOUTS = ["contiguous", "transposed", "sliced", "batched", "batched_transposed"]
ROWS = 37  # 2-D operands: rows not a multiple of any tile size
BATCH = (3, 7)  # batched operands


def make_operand(layout: str, width: int, gen: torch.Generator, dtype, device, rows: int = ROWS) -> torch.Tensor:
    if layout == "contiguous":
        t = randn((rows, width), gen, dtype, device)
    elif layout == "transposed":
        t = randn((width, rows), gen, dtype, device).T
    elif layout == "sliced":
        t = randn((rows, 2 * width + 1), gen, dtype, device)[:, 1::2]
    elif layout == "batched":
        t = randn((*BATCH, width), gen, dtype, device)
    elif layout == "batched_transposed":
        t = randn((BATCH[1], BATCH[0], width), gen, dtype, device).transpose(0, 1)
    else:
        raise AssertionError(layout)
    if layout in ("transposed", "sliced", "batched_transposed"):
        assert not t.is_contiguous()
    return t


def to64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


# ---------------------------------------------------------------- comparison
def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "result") -> None:
    """max |actual - expected| <= TOLERANCES[dtype] * max |expected|; an all-zero oracle
    must be matched exactly. ``expected`` is a float64 oracle and must be finite."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = to64(actual), to64(expected)
    assert torch.isfinite(e).all(), "oracle is not finite; use assert_close only for finite oracles"
    bad = ~torch.isfinite(a)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite entries, first at {bad.nonzero()[0].tolist()}"
    err = (a - e).abs()
    scale = float(e.abs().max())
    worst = float(err.max())
    if scale == 0.0:
        assert worst == 0.0, f"{what}: oracle is all zeros but max |result| = {worst:.3g}"
        return
    where = torch.unravel_index(err.argmax(), err.shape)
    where = [int(i) for i in where]
    assert worst <= TOLERANCES[dtype] * scale, (
        f"{what}: max abs error {worst:.3g} at {where} exceeds {TOLERANCES[dtype]:g} x scale {scale:.3g} "
        f"({DTYPE_IDS[dtype]}); got {float(a[tuple(where)]):.6g}, expected {float(e[tuple(where)]):.6g}"
    )


def build_weight(shape, block, mask, gen, dtype, device):
    """The BSR under test and its float64 dense oracle, both from the test's mask."""
    w = randn(shape, gen, dtype)
    return BSR.from_mask(w.to(device), mask, block), masked_dense(w, mask, block)


def forward_and_input_grad(layer, x):
    """A layer's output and input gradient on the reference backend; after a state_dict
    load the input gradient walks the transposed index rebuilt from the saved pattern."""
    x = x.clone().requires_grad_()
    with use_backend("reference"):
        y = layer(x)
        y.sum().backward()
    return y.detach(), x.grad


def compile_training_step(model, x, target, backend):
    """Compile one MSE training step of ``model`` with ``torch.compile(fullgraph=True)``
    (any graph break is an error) and run it and the eager step on ``backend``.

    Returns ((compiled loss, grads), (eager loss, grads), the names of every op in the
    forward and backward graphs). Dynamo traces loss.backward() inside the compiled
    function only with trace_autograd_ops (torch 2.13); AOTAutograd then puts the
    registered backwards, with their sparse products, in the same graphs.
    """
    from torch._dynamo.backends.common import aot_autograd

    params = list(model.parameters())

    def step(x, target):
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss.detach()

    def run(fn):
        for p in params:
            p.grad = None
        return fn(x, target), [p.grad for p in params]

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    with use_backend(backend), torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        compiled_result, eager_result = run(compiled), run(step)
    torch._dynamo.reset()
    return compiled_result, eager_result, {str(node.target) for gm in graphs for node in gm.graph.nodes}


def check_conv_against_dense(conv, layer, block, mask, x, gen, backend):
    """Forward and every gradient of the sparse ``layer`` on ``backend`` against ``conv``
    (the dense layer holding the same masked weights) run in float64."""
    import copy

    x = x.detach().clone().requires_grad_()
    with use_backend(backend):
        y = layer(x)
        dy = randn(tuple(y.shape), gen)
        y.backward(dy)
    oracle = copy.deepcopy(conv).double()
    x64 = to64(x).requires_grad_()
    y64 = oracle(x64)
    y64.backward(to64(dy))
    assert_close(y, y64, torch.float32, "forward")
    assert_close(x.grad, x64.grad, torch.float32, "grad input")
    weight_grad = blocks_in_mask_order(oracle.weight.grad.reshape(conv.out_channels, -1), mask, block)
    assert_close(layer.values.grad, weight_grad, torch.float32, "grad values")
    if conv.bias is not None:
        assert_close(layer.bias.grad, oracle.bias.grad, torch.float32, "grad bias")
