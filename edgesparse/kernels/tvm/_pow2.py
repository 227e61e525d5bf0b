"""What the TVM pow2 kernels share: the in-register decode of an int8 code, and the
schedule heuristic.

A code is ``s << 7 | f`` (see :mod:`edgesparse.pow2.format`): its value is 0 for f = 0,
else (-1)^s · 2^(e_min + f - 1), whose float32 bits are the sign at bit 31 and the
biased exponent e_min + f - 1 + 127 at bits 23..30 with a zero mantissa. Sign-extended
to 32 bits and shifted left by 23, the code already has s at bit 31 and f at bits
23..26; one mask (bit 30 is a copy of s) and one add of the bias make the bits. Then a
select for zero: 6 vector ops per 8 codes on AVX2, against 9 for a sign stored at bit 4.
Exact, no table, no ldexp call, and bit-equal to the reference decode.
"""

from __future__ import annotations


def decode_expr(code, e_min: int):
    """The float32 value of an int8 code expression (TensorIR)."""
    from tvm.script import tirx as T

    c = T.Cast("int32", code)
    bits = ((c << 23) & T.int32(0x87800000 - (1 << 32))) + T.int32((e_min + 126) << 23)
    return T.Select((c & 15) == 0, T.float32(0), T.reinterpret("float32", bits))


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
