"""SmartDeal power-of-two weights: W = C·B with 5-bit exponent codes for C, the
decomposition that builds them, and the products that read the codes directly."""

from .decompose import Decomposition, decompose, rounding_kept_energy, sqnr_db
from .format import DEFAULT_EXP_RANGE, Pow2Weight, decode, encode, pack, quantize, unpack
from .ops import pow2_linear, pow2_linear_grad_input, pow2_linear_grad_weight

__all__ = [
    "DEFAULT_EXP_RANGE", "Decomposition", "Pow2Weight", "decode", "decompose", "encode", "pow2_linear",
    "pack", "pow2_linear_grad_input", "pow2_linear_grad_weight", "quantize", "rounding_kept_energy", "sqnr_db",
    "unpack",
]
