"""bench/cl_seeds.py: configurations parse to typed RunConfig fields (or are refused by
name), the table's means and deviations match a hand computation, and a tiny sweep
writes one line per run and skips runs already recorded."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("cl_seeds", Path(__file__).parents[2] / "bench" / "cl_seeds.py")
cl_seeds = importlib.util.module_from_spec(_spec)
sys.modules["cl_seeds"] = cl_seeds  # the worker processes find _run_one by module name
_spec.loader.exec_module(cl_seeds)


def test_configurations_parse_to_typed_fields():
    name, settings = cl_seeds.parse_config("sparcl:sparsity=0.9,tdm=1,ddr=0,block=16x8,epochs=2,stream=split-digits")
    assert name == "sparcl"
    assert settings == {"sparsity": 0.9, "tdm": True, "ddr": False, "block": (16, 8), "epochs": 2, "stream": "split-digits"}
    with pytest.raises(ValueError, match="'learning_rate' is not a RunConfig field"):
        cl_seeds.parse_config("x:learning_rate=0.1")
    with pytest.raises(ValueError, match="name:key=value"):
        cl_seeds.parse_config("sparsity=0.9")
    with pytest.raises(ValueError, match="sparse model"):  # RunConfig's own validation, before any run
        cl_seeds.parse_config("x:tdm=1")


def test_table_gives_mean_and_sample_deviation():
    records = [{"name": "a", "seed": s, "avg_class_il": v} for s, v in [(0, 50.0), (1, 52.0), (2, 57.0)]]
    records.append({"name": "b", "seed": 0, "avg_class_il": 40.0})
    lines = cl_seeds.table(records, ["a", "b"], [0, 1, 2]).splitlines()
    assert lines[1].split() == ["a", "50.00", "52.00", "57.00", "53.00", "3.61"]  # stdev of 50, 52, 57
    assert lines[2].split() == ["b", "40.00", "-", "-", "40.00", "-"]


def test_a_tiny_sweep_records_each_run_once(tmp_path, capsys):
    out = tmp_path / "seeds.jsonl"
    tiny = "tiny:stream=split-digits,hidden=32x32,block=8x8,sparsity=0.5,epochs=1,buffer_size=20,buffer_batch=4"
    assert cl_seeds.main([tiny, "--seeds", "0", "1", "--workers", "1", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["seed"] for r in lines) == [0, 1] and all(0 <= r["avg_class_il"] <= 100 for r in lines)
    assert cl_seeds.main([tiny, "--seeds", "0", "1", "--workers", "1", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2, "finished runs are not run again"
    assert "tiny" in capsys.readouterr().out
