"""The CL tests run many tiny training steps, each a string of small torch ops between
TVM kernels. Under torch's default OpenMP policy its idle workers spin, and on a busy
2-core machine that made a tiny run 6x slower (26 s against 4 s with one torch thread;
OMP_WAIT_POLICY=PASSIVE, which `edgesparse train` sets, cannot be set once torch is
loaded). One torch thread here; the kernels keep TVM's own threads."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
