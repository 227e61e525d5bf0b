"""edgesparse: block-sparse kernels that turn sparse training's FLOP savings into wall-clock time.

Importing the package loads neither TVM nor Triton; a backend is imported the first
time an op is dispatched to it.
"""

from . import nn, ops, pow2
from .formats import BSR
from .kernels.dispatch import BackendUnavailableError, use_backend
from .pow2 import Pow2Weight

__version__ = "0.1.0"
__all__ = ["BSR", "Pow2Weight", "nn", "ops", "pow2", "use_backend", "BackendUnavailableError", "__version__"]
