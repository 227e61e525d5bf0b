"""What the TVM pow2 kernels share: the in-register decode of a code from its packed
word, and the schedule heuristic.

Code i of a word (see :mod:`edgesparse.pow2.format`) is f | s << 4 in bits 5i..5i+4;
its value is 0 for f = 0, else (-1)^s · 2^(e_min + f - 1), whose float32 bits are the
sign at bit 31 and the biased exponent e_min + f - 1 + 127 at bits 23..30 with a zero
mantissa. Shifted left by 27 - 5i, the word has s at bit 31 and f at bits 27..30; an
arithmetic shift right by 4 keeps s at 31 (copying it into 28..30) and brings f to
23..26; one mask and one add of the bias make the bits. Then a select for zero (the
masked word is 0 exactly when f is: zero has no sign). 6 vector ops per 8 codes on
AVX2, as many as one int8 code took; exact, no table, no ldexp call, and bit-equal to
the reference decode.
"""

from __future__ import annotations

import functools

# The float32 sign bit and a 4-bit exponent field at bits 23..26, as an int32.
SIGN_AND_FIELD = 0x87800000 - (1 << 32)


def decode_expr(word, i: int, e_min: int):
    """The float32 value of code ``i`` (0, 1 or 2) of an int16 word expression (TensorIR)."""
    from tvm.script import tirx as T

    bits = ((T.Cast("int32", word) << (27 - 5 * i)) >> 4) & T.int32(SIGN_AND_FIELD)
    return T.Select(bits == 0, T.float32(0), T.reinterpret("float32", bits + T.int32((e_min + 126) << 23)))


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
