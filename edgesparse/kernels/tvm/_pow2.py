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

The forward leaves the multiply out (``code_bits_expr``): it reads the basis scaled by
2^(e_min + 126) once per weight (``scaled_basis``), so the mixing products c·(sB) are the
reference's (c·s)·B exactly, one rounding of the same real number. The multiply out of
the decode was 4% of the forward's time (see pow2_linear.py).
"""

from __future__ import annotations

import functools
import math

import torch

from ._runtime import cached_on

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


def code_bits_expr(word, i: int):
    """Code ``i`` (0, 1 or 2) of an int16 word expression (TensorIR) as the float32
    (-1)^s · 2^(f - 127), or +0.0: its value divided by 2^(e_min + 126)."""
    from tvm.script import tirx as T

    return T.reinterpret("float32", ((T.Cast("int32", word) << (27 - 5 * i)) >> 4) & T.int32(SIGN_AND_FIELD))


def decode_expr(word, i: int, e_min: int):
    """The float32 value of code ``i`` (0, 1 or 2) of an int16 word expression (TensorIR)."""
    from tvm.script import tirx as T

    value = code_bits_expr(word, i)
    for factor in _power_of_two_factors(e_min + 126):
        value = value * T.float32(factor)
    return value


def scaled_basis(basis: torch.Tensor, e_min: int):
    """(basis · 2^k, 2^(e_min + 126 - k)): the basis that turns ``code_bits_expr`` values
    into the codes' products with B, and the factor left over for the product's output.

    k is e_min + 126 unless the scaled basis would reach 2^127 (max |B| >= 2^(1 - e_min):
    256 for the default range); the leftover factor is then applied to the output, which
    is exact while the output's terms stay normal numbers. Cached per basis tensor and
    version: a training step that changes B rescales it once."""
    return cached_on(basis, f"pow2_scaled_basis_{e_min}", lambda b: _scale_basis(b, e_min))


def _scale_basis(basis: torch.Tensor, e_min: int):
    basis = basis.detach()  # the cache must not hold an autograd graph
    exponent = e_min + 126
    largest = float(basis.abs().max()) if basis.numel() else 0.0
    if 0.0 < largest < math.inf:
        exponent = max(0, min(exponent, 127 - math.frexp(largest)[1]))  # largest < 2^frexp
    scaled = basis
    for factor in _power_of_two_factors(exponent):
        scaled = scaled * factor
    return scaled.contiguous(), 2.0 ** (e_min + 126 - exponent)


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
