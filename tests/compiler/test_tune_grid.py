"""bench/tune_grid.py --recheck: a finished grid's tuned schedules timed again against
its heuristic ones; kernels whose tuned schedule is the heuristic count 1.0, unmeasured."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("tune_grid", Path(__file__).parents[2] / "bench" / "tune_grid.py")
tune_grid = importlib.util.module_from_spec(_spec)
sys.modules["tune_grid"] = tune_grid
_spec.loader.exec_module(tune_grid)


def _row(op, tuned):
    heuristic = {"rows": 4, "cols": 8, "unroll": 4, "parallel": "blocks"}
    return {"op": op, "m": 8, "n": 64, "k": 64, "block": [8, 8], "density": 0.5, "heuristic": heuristic,
            "tuned": tuned or heuristic, "speedup": 1.0 if tuned is None else 1.3}


def test_recheck_times_only_the_kernels_whose_schedule_changed(tmp_path, capsys, monkeypatch):
    from edgesparse.compiler.target import Target

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"rows": [
        _row("forward", {"rows": 2, "cols": 8, "unroll": 2, "parallel": "batch"}),
        _row("grad_input", None),
    ]}))
    timed = []
    real_time = tune_grid._Measurer.time

    def spy(self, schedules, rounds=None):
        timed.append((self.problem.op, tuple(schedules)))
        return real_time(self, schedules, rounds)

    monkeypatch.setattr(tune_grid._Measurer, "time", spy)
    assert tune_grid.recheck(grid, 2, Target.detect()) == 0
    assert [op for op, _ in timed] == ["forward"]
    heuristic, tuned = timed[0][1]
    assert (heuristic.rows, heuristic.parallel, tuned.rows, tuned.parallel) == (4, "blocks", 2, "batch")
    out = capsys.readouterr().out.splitlines()
    forward, grad_input = (line.split() for line in out[1:3])
    assert float(forward[7].rstrip("x")) > 0 and grad_input[7] == "1.00x"  # the rechecked column
    recorded = float(out[-1].split("recorded ")[1].split("x")[0])
    assert recorded == pytest.approx(1.3 ** 0.5, abs=1e-3)
