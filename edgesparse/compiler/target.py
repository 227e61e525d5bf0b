"""Describe the CPU we compile for.

TVM 0.27 takes targets as JSON dicts and its LLVM refuses ``mcpu="native"`` (it
silently falls back to generic x86-64 code, without AVX2/AVX-512), so we ask LLVM
which CPU this is and name it.
"""

from __future__ import annotations

import functools
import os


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def host_cpu_name() -> str:
    """LLVM's name for this CPU (e.g. 'znver3', 'skylake-avx512'), or 'generic'."""
    from tvm.target import codegen

    name = codegen.llvm_get_system_cpu()
    return name or "generic"


@functools.lru_cache(maxsize=None)
def cpu_target():
    """The TVM target for this machine's CPU, with its core count."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": cpu_count()})
