"""`import edgesparse` and a reference-backend op load neither TVM nor Triton (both are
heavy; a backend is imported only when dispatch first picks it)."""

import json
import os
import subprocess
import sys
import textwrap

HEAVY = ("tvm", "tvm_ffi", "triton")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch

    def heavy():
        return sorted(m for m in sys.modules
                      if m.split(".")[0] in {heavy_names!r}
                      or m in ("edgesparse.kernels.tvm", "edgesparse.kernels.triton"))

    before = heavy()  # torch on its own must not have loaded them either
    import edgesparse
    from edgesparse import ops

    g = torch.Generator().manual_seed(0)
    w = torch.randn(13, 7, generator=g, dtype=torch.float64)  # every 4x4 block holds nonzeros
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    W = edgesparse.BSR.from_dense(w, (4, 4))
    with edgesparse.use_backend("reference"):
        y = ops.bsr_linear(x, W)
    err = float((y - x @ w.T).abs().max())
    print(json.dumps({{"before": before, "after": heavy(), "err": err}}))
    """
).format(heavy_names=set(HEAVY))


def test_import_and_reference_op_load_neither_tvm_nor_triton():
    env = {k: v for k, v in os.environ.items() if k != "EDGESPARSE_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] == [], f"torch itself loaded {result['before']}"
    assert result["err"] < 1e-12, "the reference op in the subprocess gave a wrong result"
    assert result["after"] == [], f"import edgesparse + a reference op loaded {result['after']}"
