"""TensorIR kernels for CPUs, compiled by TVM's LLVM backend (fp32).

Imported only when dispatch picks this backend; importing it imports tvm.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ...compiler.target import cpu_count

# Thread-pool settings, read when TVM starts its pool, i.e. at our first kernel call.
# TVM sizes its thread pool as if every CPU had a hyperthread sibling: on the 2-CPU dev
# machine it ran our kernels on ONE thread (forward at 10% of 32x32: 4.7 ms, against
# 2.4-3.1 ms with both). Ask for every CPU we may use, unless the user chose a number.
os.environ.setdefault("TVM_NUM_THREADS", str(cpu_count()))
# TVM's idle workers spin before they sleep, and in a training step our kernels alternate
# with torch ops whose OpenMP threads then find the cores busy: on 2 CPUs, a step of a
# 2048-wide 3-layer sparse MLP took 77-86 ms with the default spin and 54 ms without,
# its SGD step alone 68 ms against 1.8 ms. A sleeping worker costs ~0.1 ms to wake,
# which only small batches notice (forward at M=8: 0.2 -> 0.35 ms).
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

from .bsr_linear import bsr_linear  # noqa: E402
from .bsr_linear_grad_input import bsr_linear_grad_input  # noqa: E402
from .bsr_linear_grad_weight import bsr_linear_grad_weight  # noqa: E402

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
