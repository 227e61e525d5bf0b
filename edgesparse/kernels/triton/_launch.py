"""What the three Triton kernels share: tile sizes, launch settings, the dot's operand
dtype and precision, and the cases that need no launch at all.

The launch settings are a small dataclass chosen by :func:`default_launch`; every op
takes ``launch=`` to override it (by hand or from tuning results). There is no
``@triton.autotune``: the heuristic is cheap, deterministic and the same on every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...formats import BSR

# Rows of x / dy per program. The heuristic takes the smallest that covers M (a decode
# step with M=1 should not load 64 masked rows), else the largest, then halves it while
# the accumulator is over budget. 128 would only pay for dense-like shapes; a launch
# override can still ask for it.
BLOCK_M_CANDIDATES = (16, 32, 64)
# fp32 accumulator elements per program: 64 x 128 is 64 registers a thread at 4 warps;
# larger tiles spill, so the M tile shrinks as the block grows.
_ACC_BUDGET = 64 * 128
# Shared memory the software pipeline may use for its staged tiles: fits A100 (164 KiB)
# and H100 (228 KiB) with room left for the layout-conversion scratch.
_SMEM_BUDGET = 96 * 1024
_MAX_STAGES = 3

_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


@dataclass(frozen=True)
class TritonLaunch:
    """How a kernel is launched.

    block_m        rows of x / dy per tile: the output tile's height for the forward and
                   grad-input kernels, the reduction step for grad-weight.
    num_warps      warps per program.
    num_stages     software-pipeline depth of the block loop.
    fp32_precision ``tl.dot`` input precision for float32 operands. "ieee" keeps fp32
                   results within ~1e-6 relative of torch but runs on CUDA cores, not
                   tensor cores; "tf32x3" (three TF32 products) is close to fp32 accuracy
                   on tensor cores; "tf32" is fastest and ~1e-3 relative. float16 and
                   bfloat16 operands always use the tensor cores.
    """

    block_m: int
    num_warps: int = 4
    num_stages: int = 2
    fp32_precision: str = "ieee"

    def __post_init__(self):
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            # tl.dot needs every tile dimension to be a power of two of at least 16.
            raise ValueError(f"block_m must be a power of two >= 16, got {self.block_m}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.fp32_precision not in _DOT_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {_DOT_PRECISIONS}, got {self.fp32_precision!r}")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the flag must be set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tile_dims(block: Tuple[int, int]) -> Tuple[int, int]:
    """The tile (BN, BK) a (bn, bk) block is computed in.

    tl.dot needs power-of-two tile sides of at least 16, so smaller or odd blocks are
    padded with masked (zero) lanes: correct for any block, but a 1x4 block does 1/64 of
    the work of its 16x16 tile, so tiny blocks are slow on this backend.
    """
    bn, bk = block
    return max(16, triton.next_power_of_2(bn)), max(16, triton.next_power_of_2(bk))


def default_launch(m: int, block: Tuple[int, int], dtype: torch.dtype) -> TritonLaunch:
    """The launch settings for M rows of activations and blocks of this shape."""
    side = max(tile_dims(block))
    block_m = next((c for c in BLOCK_M_CANDIDATES if c >= m), BLOCK_M_CANDIDATES[-1])
    while block_m > BLOCK_M_CANDIDATES[0] and block_m * side > _ACC_BUDGET:
        block_m //= 2
    num_warps = 4 if block_m * side <= 64 * 64 else 8
    # One pipeline stage holds the activation tile and the weight block; the products of
    # the three kernels all read (block_m + side) * side elements at most.
    stage_bytes = (block_m + side) * side * torch.finfo(dtype).bits // 8
    num_stages = max(1, min(_MAX_STAGES, _SMEM_BUDGET // stage_bytes))
    return TritonLaunch(block_m=block_m, num_warps=num_warps, num_stages=num_stages)


def kernel_args(m: int, W: BSR, launch: Optional[TritonLaunch]) -> dict:
    """The compile-time and launch keyword arguments all three kernels take."""
    launch = launch if launch is not None else default_launch(m, W.block, W.dtype)
    BN, BK = tile_dims(W.block)
    dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[W.dtype]
    if dot_dtype == tl.bfloat16 and interpreting():
        # The interpreter multiplies bfloat16 dot operands as their raw uint16 bits
        # (triton-lang/triton#11584, "not supported yet"); bf16 -> fp32 is exact and so
        # are bf16 x bf16 products in fp32, so this matches the GPU's bf16 MMA + fp32 sum.
        dot_dtype = tl.float32
    return dict(
        bn=W.block[0], bk=W.block[1], BLOCK_M=launch.block_m, BN=BN, BK=BK,
        DOT_DTYPE=dot_dtype,
        # input_precision only means something for fp32 operands; None keeps the default.
        PRECISION=launch.fp32_precision if dot_dtype == tl.float32 else None,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )


def nothing_to_launch(m: int, W: BSR) -> bool:
    """No rows or no kept blocks: the result is zeros (plus bias) and the kernels would
    only be handed empty, possibly null, pointers."""
    return m == 0 or W.nnz_blocks == 0
