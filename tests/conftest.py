"""Fixtures shared by the whole suite.

Backends: every kernel test runs on each of ``BACKENDS``. None is skipped when it is
missing: CI has all three, so a backend that cannot run is a failure, not a skip.
Triton runs on CUDA when there is one, otherwise on the CPU under its interpreter;
set TRITON_INTERPRET=0 in the environment to run compiled kernels on a GPU.
"""

import os

# Must precede any import of triton (the interpreter flag is read from the environment).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernels are built in memory: storing each in the on-disk build cache costs ~0.7 s of
# export per build, hundreds of builds here. tests/compiler/test_cache.py turns it on.
os.environ.setdefault("EDGESPARSE_BUILD_CACHE", "0")
# As the edgesparse commands run (see cli.TIMED_COMMANDS); read when torch loads, below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._oracle import device_for  # noqa: E402

BACKENDS = ("reference", "tvm", "triton")


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Anything that draws from torch's global generator is reproducible too."""
    torch.manual_seed(0)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: reproducible, different per parametrization."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)
