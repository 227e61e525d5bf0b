"""The tuner: its candidates are valid, its result computes the right product, it
measures through a local TVM RPC server, and `edgesparse tune` fills the database."""

import json
import socket

import pytest
import torch

from edgesparse.compiler.target import vector_unit
from edgesparse.compiler.target import Target
from edgesparse.compiler.tuner import Problem, _Measurer, RPCRunner, build, candidates, heuristic, kernel_args, \
    layout_seeds, tune_layer, tune_problem
from edgesparse.compiler.tuning import TuningDatabase
from edgesparse.kernels.tvm import bsr_linear, bsr_linear_grad_input, bsr_linear_grad_weight
from edgesparse import BSR
from tests._oracle import masked_dense, top_blocks_mask


@pytest.mark.parametrize("op", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize("block", [(32, 32), (8, 4), (1, 4), (16, 64)])
def test_candidates_fit_the_kernel(op, block):
    p = Problem(op, 64, 128, 256, block, 0.2)
    cands = candidates(p)
    assert cands and len(set(cands)) == len(cands)
    bn, bk = block
    width, reduced = {"forward": (bn, bk), "grad_input": (bk, bn), "grad_weight": (bk, None)}[op]
    lanes, registers = vector_unit().lanes, vector_unit().registers
    for s in cands:
        # fp32 accumulators of one tile: TVM puts 1 KiB or more in the workspace, not on the stack
        accumulators = s.rows * s.cols * (lanes if s.vector == "batch" else 1)
        assert 4 * accumulators < 1024, s
        if s.vector == "batch" and op == "grad_weight":  # a tile of the block, one vector accumulator per entry
            assert bn % s.rows == 0 and bk % s.cols == 0 and s.parallel == "blocks"
            assert s.rows * s.cols + s.rows + s.cols <= registers
            continue
        if s.vector == "batch":  # rows batch vectors x cols output columns, plus a load and a broadcast each
            assert width % s.cols == 0 and s.cols <= lanes and reduced % s.unroll == 0
            assert s.rows * (s.cols + 1) + 1 <= registers
            continue
        assert width % s.cols == 0
        assert reduced is None or reduced % s.unroll == 0
        assert s.rows * -(-s.cols // lanes) <= registers - 2
        if op == "grad_weight":
            assert bn % s.rows == 0 and s.parallel == "blocks"
    assert heuristic(p) in cands or op == "grad_weight"
    seeds = layout_seeds(p)  # the search starts each layout from a tile the kernel takes
    assert [s.vector for s in seeds] == ["columns", "batch"]
    assert seeds[1] in cands and (seeds[0] in cands or op == "grad_weight")


def test_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="op must be one of"):
        Problem("backward", 8, 8, 8, (4, 4), 0.5)
    with pytest.raises(ValueError, match="density"):
        Problem("forward", 8, 8, 8, (4, 4), 1.5)
    with pytest.raises(ValueError, match="m must be a positive int"):
        Problem("forward", 0, 8, 8, (4, 4), 0.5)


def _oracle(op, m, n, k, block, density):
    g = torch.Generator().manual_seed(0)  # as kernel_args draws them
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    dy = torch.randn(m, n, generator=g)
    wd = masked_dense(w, top_blocks_mask(w, block, density), block)
    return {"forward": lambda: x.double() @ wd.T, "grad_input": lambda: dy.double() @ wd,
            "grad_weight": lambda: dy.double().T @ x.double()}[op](), (w, x, dy)


def test_tuned_schedule_computes_the_product():
    m, n, k, block, density = 13, 48, 40, (16, 8), 0.5
    results = tune_layer(m, n, k, block, density, budget_s=5, save=False, progress=False, rounds=2)
    assert [r.problem.op for r in results] == ["forward", "grad_input", "grad_weight"]
    for r in results:
        assert r.best in candidates(r.problem) or r.best == r.heuristic
        assert r.tried >= 1 and r.best_s > 0 and r.heuristic_s > 0
        expected, (w, x, dy) = _oracle(r.problem.op, m, n, k, block, density)
        W = BSR.from_dense(w, block, density=density)
        if r.problem.op == "forward":
            got = bsr_linear(x, W, schedule=r.best)
        elif r.problem.op == "grad_input":
            got = bsr_linear_grad_input(dy, W, schedule=r.best)
        else:
            mask = top_blocks_mask(w, block, density)
            got = torch.zeros(-(-n // 16) * 16, -(-k // 8) * 8, dtype=torch.float64)
            vals = bsr_linear_grad_weight(dy, x, W, schedule=r.best)
            rows, cols = mask.nonzero(as_tuple=True)  # row-major, the order the BSR stores its blocks
            for v, i, j in zip(vals, rows.tolist(), cols.tolist()):
                got[i * 16:(i + 1) * 16, j * 8:(j + 1) * 8] = v.double()
            got = got[:n, :k]
            expected = expected * masked_dense(torch.ones(n, k), mask, block)
        assert torch.allclose(got.double(), expected, atol=1e-4), r.problem.op


def test_the_tuner_builds_the_batch_vectorised_grad_weight():
    """What the tuner times for a batch-vectorised schedule is the whole product: built
    from the same recipe as the wrapper, on the arguments the wrapper passes."""
    from edgesparse.compiler.tuner import LocalRunner
    from edgesparse.kernels.tvm.schedule import Schedule

    m, n, k, block, density = 13, 48, 40, (8, 4), 0.5
    p = Problem("grad_weight", m, n, k, block, density)
    runner = LocalRunner()
    args = runner.tensors(kernel_args(p))
    runner.load(build(p, Schedule(4, 2, 3, "blocks", "batch")))["main"](*args)
    expected, (w, _, _) = _oracle("grad_weight", m, n, k, block, density)
    mask = top_blocks_mask(w, block, density)
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.from_numpy(args[-2].numpy()).double()
    for v, i, j in zip(values, rows.tolist(), cols.tolist()):
        assert torch.allclose(v, expected[i * 8:(i + 1) * 8, j * 4:(j + 1) * 4], atol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tuning_through_a_local_rpc_server():
    from tvm import rpc

    port = _free_port()
    server = rpc.Server(host="127.0.0.1", port=port, port_end=port + 50)
    try:
        runner = RPCRunner("127.0.0.1", server.port)
        p = Problem("forward", 9, 40, 24, (8, 8), 0.5)
        # The remote device computes the product: read its output back and check it.
        module = runner.load(build(p, heuristic(p)))
        args = runner.tensors(kernel_args(p))
        module["main"](*args)
        expected, _ = _oracle("forward", 9, 40, 24, (8, 8), 0.5)
        assert torch.allclose(torch.from_numpy(args[-1].numpy()).double(), expected, atol=1e-4)
        # Two schedules timed remotely, interleaved; then the whole search (its budget may
        # allow only the heuristic on a loaded machine, so no count is asserted).
        other = next(s for s in candidates(p) if s != heuristic(p))
        measurer = _Measurer(p, runner, Target.detect(), rounds=2)
        for s in (heuristic(p), other):
            measurer.add(s)
        measurer.calibrate(other)
        times = measurer.time([heuristic(p), other])
        assert set(times) == {heuristic(p), other} and min(times.values()) > 0
        result = tune_problem(p, budget_s=3, runner=runner, rounds=2, progress=False)
        assert result.best in candidates(p) and result.best_s > 0
    finally:
        server.terminate()


def test_cli_tune_fills_the_database(tmp_path, capsys):
    from edgesparse.cli import main

    db = tmp_path / "db.json"
    rc = main(["tune", "--layer", "8,32,48", "--block", "8x16", "--density", "0.5", "--budget", "4",
               "--ops", "forward,grad_weight", "--db", str(db)])
    assert rc == 0
    records = json.loads(db.read_text())["records"]
    assert sorted(r["op"] for r in records.values()) == ["forward", "grad_weight"]
    assert all(r["shape"] == {"batch": 8, "n": 32, "k": 48, "density": 0.5} for r in records.values())
    assert "geometric mean" in capsys.readouterr().out
    assert main(["tune", "--layer", "8,32,48", "--ops", "backward", "--db", str(db)]) == 2
    assert TuningDatabase(db).load() == records


def test_other_load_counts_other_processes_not_ours():
    """A busy child process is other load; the same busy loop in this process is not."""
    import subprocess
    import sys
    import time

    from edgesparse.compiler.tuner import OtherLoad

    spin = "import time\nend = time.perf_counter() + 1.0\nwhile time.perf_counter() < end: pass"
    with OtherLoad() as child:
        subprocess.run([sys.executable, "-c", spin], check=True)
    with OtherLoad() as own:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
    # The child kept a core busy for most of the block (its start-up included); our own
    # loop is subtracted, so it counts a core less whatever else the machine runs.
    assert child.cores > 0.6
    assert own.cores < child.cores - 0.5


def test_local_tuning_records_the_other_load(tmp_path, capsys, monkeypatch):
    import edgesparse.compiler.tuner as tuner

    db = TuningDatabase(tmp_path / "db.json")
    results = tune_layer(16, 32, 32, (8, 8), 0.5, budget_s=2, ops=["forward"], db=db, progress=False, rounds=1)
    assert results[0].other_load is not None and results[0].other_load >= 0
    (record,) = db.load().values()
    assert record["other_load_cores"] == results[0].other_load
    monkeypatch.setattr(tuner, "BUSY_CORES", -1.0)  # any load at all counts as busy
    tune_layer(16, 32, 32, (8, 8), 0.5, budget_s=2, ops=["forward"], save=False, progress=False, rounds=1)
    assert "schedules chosen under load may lose on an idle machine" in capsys.readouterr().err
