"""Triton kernels for CUDA GPUs (and, for tests, CPU tensors under ``TRITON_INTERPRET=1``).

Importing this subpackage imports triton; :mod:`edgesparse.kernels.dispatch` does so only
when it picks this backend, so ``import edgesparse`` never loads triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._launch import TritonLaunch, default_launch, interpreting
from .bsr_linear import bsr_linear
from .bsr_linear_grad_input import bsr_linear_grad_input
from .bsr_linear_grad_weight import bsr_linear_grad_weight

__all__ = [
    "bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_weight",
    "TritonLaunch", "default_launch", "unavailable_reason",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device, dtype: torch.dtype) -> Optional[str]:
    """Why these kernels cannot run tensors of this device and dtype, or None if they can."""
    device = torch.device(device)
    if dtype not in _DTYPES:
        return f"the Triton kernels take float32, float16 and bfloat16, not {dtype}"
    if device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return "bfloat16 tl.dot needs a GPU of compute capability 8.0 (Ampere) or newer"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (set before triton is imported)"
    return f"Triton runs on CUDA tensors, not on {device.type}"
