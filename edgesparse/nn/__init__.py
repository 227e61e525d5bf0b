"""The PyTorch bridge: block-sparse products as differentiable custom ops, drop-in
sparse layers, and ``sparsify`` to swap a model's layers by name."""

from .functional import WeightGradMask, sparse_linear
from .modules import SparseConv2d, SparseLinear, sparse_layers
from .pow2 import Pow2Conv2d, Pow2Linear, Pow2Scheme
from .sparsify import SparseScheme, sparsify

__all__ = ["Pow2Conv2d", "Pow2Linear", "Pow2Scheme", "SparseConv2d", "SparseLinear", "SparseScheme", "WeightGradMask", "sparse_layers", "sparse_linear", "sparsify"]
