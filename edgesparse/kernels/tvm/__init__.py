"""TensorIR kernels for CPUs, compiled by TVM's LLVM backend (fp32).

Imported only when dispatch picks this backend; importing it imports tvm.
"""

from __future__ import annotations

from typing import Optional

import torch

from .bsr_linear import bsr_linear
from .bsr_linear_grad_input import bsr_linear_grad_input
from .bsr_linear_grad_weight import bsr_linear_grad_weight

__all__ = ["bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight", "unavailable_reason"]


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"the TVM kernels run on CPU tensors, these are on {device}"
    if dtype != torch.float32:
        return f"the TVM kernels are built for float32, got {dtype}"
    try:
        import tvm  # noqa: F401
    except ImportError as err:
        return f"apache-tvm is not installed ({err}); pip install apache-tvm==0.27.0.post1"
    return None
