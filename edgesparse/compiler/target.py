"""Describe the CPU we compile for.

TVM 0.27 takes targets as JSON dicts and its LLVM refuses ``mcpu="native"`` (it
silently falls back to generic x86-64 code, without AVX2/AVX-512), so we ask LLVM
which CPU this is and name it.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass


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


@dataclass(frozen=True)
class VectorUnit:
    """What the schedule heuristics need to know of the CPU's SIMD unit (fp32)."""

    lanes: int  # fp32 lanes per vector register
    registers: int  # architectural vector registers


@functools.lru_cache(maxsize=None)
def vector_unit() -> VectorUnit:
    """AVX-512: 16 lanes x 32 registers; AVX/AVX2: 8 x 16; aarch64 NEON: 4 x 32; else SSE 4 x 16."""
    if platform.machine() in ("aarch64", "arm64"):
        return VectorUnit(4, 32)
    flags = _cpu_flags()
    if "avx512f" in flags:
        return VectorUnit(16, 32)
    if "avx" in flags:
        return VectorUnit(8, 16)
    return VectorUnit(4, 16)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
