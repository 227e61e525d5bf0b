"""What the TVM pow2 kernels share: the in-register decode of a code from its packed
word, and the schedule heuristic.

Code i of a word (see :mod:`edgesparse.pow2.format`) is f | s << 4 in bits 5i..5i+4;
its value is 0 for f = 0, else (-1)^s · 2^(e_min + f - 1). Shifted left by 27 - 5i, the
word has s at bit 31 and f at bits 27..30; an arithmetic shift right by 4 keeps s at 31
(copying it into 28..30) and brings f to 23..26, and one mask leaves the float32 bits
of (-1)^s · 2^(f - 127): a normal number for f >= 1, and +0.0 for f = 0 (zero has no
sign). One multiply by 2^(e_min + 126) makes it the code's value, exactly (a product of
powers of two, inside float32's normal range) and bit-equal to the reference decode.

4 vector ops per 8 codes on AVX2. The first version added the exponent bias to the
bits and then selected 0.0 where f = 0: 6 ops, and two more constant registers, which
made the forward's 8 x 8 tile spill two accumulators to the stack. The forward's inner
loop went from 102 to 91 instructions with no spills (generated assembly, Zen 3); its
time moved within the shared machine's noise (M = 8, 2048 x 2048, cold weights, three
alternating runs: 0.83-1.01 ms against 0.93-1.04 ms).
"""

from __future__ import annotations

import functools

# The float32 sign bit and a 4-bit exponent field at bits 23..26, as an int32.
SIGN_AND_FIELD = 0x87800000 - (1 << 32)


def _power_of_two_factors(exponent: int):
    """float32 factors whose product is 2^exponent, each a normal number (2^(e_min + 126)
    overflows float32 once e_min > 1)."""
    factors = []
    while exponent > 127:
        factors.append(2.0 ** 127)
        exponent -= 127
    return factors + [2.0 ** exponent]


def decode_expr(word, i: int, e_min: int):
    """The float32 value of code ``i`` (0, 1 or 2) of an int16 word expression (TensorIR)."""
    from tvm.script import tirx as T

    bits = ((T.Cast("int32", word) << (27 - 5 * i)) >> 4) & T.int32(SIGN_AND_FIELD)
    value = T.reinterpret("float32", bits)
    for factor in _power_of_two_factors(e_min + 126):
        value = value * T.float32(factor)
    return value


@functools.lru_cache(maxsize=1024)  # asked on every call, as heuristic_block_rows
def heuristic_pow2(batch: int, group: int, rows: int = 8, simd=None):
    """Knobs of the pow2 forward and grad-input kernels: one vector of output rows wide,
    up to ``rows`` batch rows tall, threads over the block rows.

    One vector, because the tile then fits AVX2's 16 registers with the 3 decoded codes
    and 3 rebuilt W vectors beside its accumulators; 8 x 16 spilled accumulators to the
    stack (seen in the generated assembly). Timed at M = 8, 2048 x 2048, half the rows
    kept, 8 x 8, 8 x 16, 4 x 16 and 6 x 16 tiles were within the noise of one another on
    the shared 2-core machine (1.2-8 ms for the same call), so the model, not a timing,
    decides."""
    from ...compiler.target import vector_unit
    from .schedule import Schedule, _largest_divisor_at_most, _rows_for_batch

    simd = simd or vector_unit()
    return Schedule(_rows_for_batch(batch, rows), _largest_divisor_at_most(group, simd.lanes), 1, "blocks")
