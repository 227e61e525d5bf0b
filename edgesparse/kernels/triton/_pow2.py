"""What the Triton pow2 kernels share: the in-register decode of packed codes (the bit
construction of kernels/tvm/_pow2.py, exact and bit-equal to the reference), a chunk's
B row, and the launch arguments."""

from __future__ import annotations

import triton
import triton.language as tl

from ...pow2.format import Pow2Weight


@triton.jit
def decode(words, CODE: tl.constexpr, E_BIAS: tl.constexpr):
    """Float32 values of code ``CODE`` (f | s << 4 in bits 5·CODE..5·CODE+4) of int16 words: 0 for
    f = 0, else (-1)^s·2^(f + E_BIAS - 127)."""
    w = words.to(tl.int32)
    # Shifted left by 27 - 5·CODE, the code's sign is at bit 31 and f at 27..30; the arithmetic
    # shift right by 4 brings f to 23..26; the mask 0x87800000 (as an int32) keeps the sign
    # and f, which is 0 exactly for the zero code; then add the exponent bias.
    bits = ((w << (27 - 5 * CODE)) >> 4) & -2021654528
    return tl.where(bits == 0, 0.0, (bits + (E_BIAS << 23)).to(tl.float32, bitcast=True))


@triton.jit
def load_codes(words_ptr, blk, offs_p, p_mask, P: tl.constexpr, E_BIAS: tl.constexpr):
    """The three decoded rows C[:, i] (over the group's output rows) of block ``blk`` (int64)."""
    words = tl.load(words_ptr + blk * P + offs_p, mask=p_mask, other=0)
    return decode(words, 0, E_BIAS), decode(words, 1, E_BIAS), decode(words, 2, E_BIAS)


@triton.jit
def basis_entry(chunk_ptr, i: tl.constexpr, j: tl.constexpr, offs_p, p_mask, P: tl.constexpr):
    """B[i, j] over the group's output rows, for the chunk's basis at ``chunk_ptr``."""
    return tl.load(chunk_ptr + (i * 3 + j) * P + offs_p, mask=p_mask, other=0.0).to(tl.float32)


def kernel_args(W: Pow2Weight) -> dict:
    return dict(P=W.group, BP=max(16, triton.next_power_of_2(W.group)), CHUNK=W.chunk_rows, E_BIAS=W.exp_range[0] + 126)
