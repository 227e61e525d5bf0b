"""Describe the CPU we compile for.

TVM 0.27 takes targets as JSON dicts and its LLVM refuses ``mcpu="native"`` (it
silently falls back to generic x86-64 code, without AVX2/AVX-512), so we ask LLVM
which CPU this is and name it.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache"), default: int = 32 << 20) -> int:
    """Size of CPU 0's largest cache, from Linux's sysfs (``default`` where none is
    readable): what a benchmark must exceed for its operands to come from memory."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in Path(cache_dir).glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=default)


@functools.lru_cache(maxsize=None)
def host_cpu_name() -> str:
    """LLVM's name for this CPU (e.g. 'znver3', 'skylake-avx512'), or 'generic'."""
    from tvm.target import codegen

    name = codegen.llvm_get_system_cpu()
    return name or "generic"


@functools.lru_cache(maxsize=None)
def cpu_target() -> str:
    """The TVM target for this machine's CPU, with its core count, as the string the
    kernel builds are keyed by (made once: ``str()`` of a Target takes 3 us, and every
    kernel call looks its build up)."""
    import tvm

    return str(tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": cpu_count()}))


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
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The /proc/cpuinfo flags that change the code LLVM may emit for our kernels. Only
# these enter the fingerprint: the full flag list also carries hypervisor and
# microcode details that differ between hosts of one CPU model.
_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "asimdhp", "sve", "sve2",
)


@dataclass(frozen=True)
class Target:
    """The device the kernels are compiled and tuned for.

    cpu_model  the vendor's name (/proc/cpuinfo 'model name')
    llvm_cpu   LLVM's name, what TVM compiles for ('znver3')
    features   ISA extensions that matter to code generation, sorted
    cores      CPUs this process may use
    machine    'x86_64', 'aarch64', ...
    gpu        the CUDA device's name when torch sees one, else None
    """

    cpu_model: str
    llvm_cpu: str
    features: Tuple[str, ...]
    cores: int
    machine: str
    gpu: Optional[str] = None

    @classmethod
    def detect(cls) -> "Target":
        """This machine (cached: the hardware does not change under a running process)."""
        return _detect()

    @property
    def fingerprint(self) -> str:
        """A stable, readable id: machine, LLVM CPU, ISA features, cores (and GPU).

        Equal on two machines whose tuned schedules and compiled kernels are
        interchangeable; the CPU's marketing name is left out (LLVM's name decides the code).
        """
        parts = [self.machine, self.llvm_cpu, "+".join(self.features) or "baseline", f"{self.cores}c"]
        if self.gpu:
            parts.append(re.sub(r"[^A-Za-z0-9]+", "_", self.gpu).strip("_"))
        return "-".join(parts)

    def tvm_target(self):
        """The TVM (LLVM) target for this CPU and core count."""
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": self.llvm_cpu, "num-cores": self.cores})

    def to_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features), "fingerprint": self.fingerprint}


@functools.lru_cache(maxsize=None)
def _detect() -> Target:
    return Target(
        cpu_model=_cpu_model(),
        llvm_cpu=host_cpu_name(),
        features=tuple(sorted(_cpu_flags() & set(_ISA_FLAGS))),
        cores=cpu_count(),
        machine=platform.machine(),
        gpu=_gpu_name(),
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def versions() -> dict:
    """The package and compiler versions a tuned schedule or a compiled kernel depends on."""
    import tvm

    from .. import __version__

    return {"edgesparse": __version__, "tvm": tvm.__version__}
