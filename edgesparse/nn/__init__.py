"""The PyTorch bridge: block-sparse products as differentiable custom ops, drop-in
sparse layers, and ``sparsify`` to swap a model's layers by name."""

from .functional import WeightGradMask, sparse_linear
from .modules import SparseConv2d, SparseLinear, sparse_layers
from .sparsify import SparseScheme, sparsify

__all__ = ["SparseConv2d", "SparseLinear", "SparseScheme", "WeightGradMask", "sparse_layers", "sparse_linear", "sparsify"]
