"""What the Triton pow2 kernels share: the in-register decode of int8 codes (the bit
construction of kernels/tvm/_pow2.py, exact and bit-equal to the reference), a chunk's
B row, and the launch arguments."""

from __future__ import annotations

import triton
import triton.language as tl

from ...pow2.format import Pow2Weight

@triton.jit
def decode(code, E_BIAS: tl.constexpr):
    """Float32 values of int8 codes ``s << 7 | f``: 0 for f = 0, else (-1)^s·2^(f + E_BIAS - 127)."""
    c = code.to(tl.int32)
    # Of the code shifted left by 23, keep the sign (bit 31) and f (bits 23..26): the mask
    # 0x87800000 as an int32; then add the exponent bias.
    bits = ((c << 23) & -2021654528) + (E_BIAS << 23)
    return tl.where((c & 15) == 0, 0.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def load_codes(codes_ptr, blk, offs_p, p_mask, P: tl.constexpr, E_BIAS: tl.constexpr):
    """The three decoded rows C[:, i] (over the group's output rows) of block ``blk`` (int64)."""
    base = codes_ptr + blk * (3 * P) + offs_p
    c0 = decode(tl.load(base, mask=p_mask, other=0), E_BIAS)
    c1 = decode(tl.load(base + P, mask=p_mask, other=0), E_BIAS)
    c2 = decode(tl.load(base + 2 * P, mask=p_mask, other=0), E_BIAS)
    return c0, c1, c2


@triton.jit
def basis_entry(chunk_ptr, i: tl.constexpr, j: tl.constexpr, offs_p, p_mask, P: tl.constexpr):
    """B[i, j] over the group's output rows, for the chunk's basis at ``chunk_ptr``."""
    return tl.load(chunk_ptr + (i * 3 + j) * P + offs_p, mask=p_mask, other=0.0).to(tl.float32)


def kernel_args(W: Pow2Weight) -> dict:
    return dict(P=W.group, BP=max(16, triton.next_power_of_2(W.group)), CHUNK=W.chunk_rows, E_BIAS=W.exp_range[0] + 126)
