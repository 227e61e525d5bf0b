"""`edgesparse bench`: the rows it writes agree with their own timings and with the
machine stamp; the ratios are derived from times measured in the same run."""

import json
import math

import pytest
import torch

from edgesparse import bench, cli
from tests._oracle import assert_close


def test_quick_bench_writes_consistent_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--rounds", "2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"date", "processor", "torch", "tvm", "edgesparse"} <= payload["environment"].keys()
    rows = payload["rows"]
    assert [r["op"] for r in rows] == ["forward", "grad_input", "grad_weight"]
    for r in rows:
        assert r["ours_ms"] > 0 and r["dense_ms"] > 0
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ours_ms"])
        assert r["speedup_vs_torch_sparse"] == pytest.approx(r["torch_sparse_ms"] / r["ours_ms"])
        flops = 2 * r["m"] * r["n"] * r["k"] * r["density"]  # 10% of 400 blocks is exactly 40
        assert r["gflops_nnz"] == pytest.approx(flops / (r["ours_ms"] * 1e-3) / 1e9)
        dense_rate = 2 * r["m"] * r["n"] * r["k"] / (r["dense_ms"] * 1e-3) / 1e9
        assert r["pct_of_dense_rate"] == pytest.approx(100 * r["gflops_nnz"] / dense_rate)
    csv_lines = out.with_suffix(".csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "grad_weight" in printed and "x t.sparse" in printed


def test_bench_rejects_bad_rounds(capsys):
    assert cli.main(["bench", "--quick", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_bench_reports_an_unavailable_backend(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton then cannot take CPU tensors
    assert cli.main(["bench", "--quick", "--rounds", "1", "--backend", "triton"]) == 2
    assert "backend 'triton' was requested but cannot run" in capsys.readouterr().err


def test_quick_training_section_writes_steps_with_hand_counted_flop_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--section", "training", "--rounds", "1", "--out", str(out)]) == 0
    assert not out.exists(), "--section training must not run the kernel rows"
    rows = json.loads((tmp_path / "bench-training.json").read_text())["rows"]
    assert [r["what"] for r in rows] == ["step", "fwd+bwd"]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    # MLP 256-256-256-10, batch 64, layers.0 and layers.1 keep 16 of their 64 32x32 blocks. The
    # first layer's input is data (forward + weight gradient), the others also pass a gradient on.
    dense_weights, sparse_weights = [256 * 256, 256 * 256, 10 * 256], [16 * 32 * 32, 16 * 32 * 32, 10 * 256]
    products = [2, 3, 3]
    flops = lambda weights: sum(p * 2 * 64 * w for p, w in zip(products, weights))  # noqa: E731
    assert rows[0]["flop_ratio"] == pytest.approx(flops(dense_weights) / flops(sparse_weights))
    # conv 64 -> 64 channels 3x3: a 64 x 576 matrix of 4 x 36 16x16 blocks, 36 kept; the
    # input asks for a gradient, so every product runs on both sides: the ratio is 144 / 36.
    assert rows[1]["flop_ratio"] == pytest.approx(4.0)
    assert (tmp_path / "bench-training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FLOP ratio" in capsys.readouterr().out


def test_cold_pow2_case_cycles_through_copies_of_the_same_weight(monkeypatch):
    """A cold row's providers read a different copy at each call, as many copies as fill
    twice the (here fake) cache in their own format, and every copy holds the weight:
    ours, the fp32 BSR and the rebuilt W agree call after call."""
    import edgesparse.compiler.target as target
    import edgesparse.pow2.ops as pow2_ops

    case = bench.Case(4, 64, 96, (32, 3), 0.5, "pow2_forward", cold=True)
    values_bytes = 32 * 3 * 4 * 32  # half of the 2 x 32 row blocks of 32 x 3: 32 blocks
    cache = int(0.75 * values_bytes)
    monkeypatch.setattr(target, "last_level_cache_bytes", lambda: cache)
    read = {"ours": [], "bsr": []}
    real_pow2, real_bsr = pow2_ops.pow2_linear, bench.ops.bsr_linear
    monkeypatch.setattr(pow2_ops, "pow2_linear", lambda x, W: read["ours"].append(W.words.data_ptr()) or real_pow2(x, W))
    monkeypatch.setattr(bench.ops, "bsr_linear", lambda x, W: read["bsr"].append(W.values.data_ptr()) or real_bsr(x, W))
    fns, nnz_blocks, _ = bench.pow2_providers(case, torch.Generator().manual_seed(0))
    assert nnz_blocks == 32
    for _ in range(12):
        expected = fns["rebuild"]().double()
        assert_close(fns["ours"](), expected, torch.float32, "pow2 product")
        assert_close(fns["bsr"](), expected, torch.float32, "fp32 BSR product")
    # Copies by hand: ceil(2 x cache / bytes), the bytes of words + index + basis, and of
    # values + index.
    index = 4 * 3 + 4 * 32
    pow2_copies = math.ceil(2 * cache / (32 * 32 * 2 + index + 2 * 1 * 9 * 32 * 4))
    bsr_copies = math.ceil(2 * cache / (values_bytes + index))
    assert (pow2_copies, bsr_copies) == (5, 2)
    assert len(set(read["ours"])) == pow2_copies and read["ours"][:pow2_copies] == read["ours"][pow2_copies:2 * pow2_copies]
    assert len(set(read["bsr"])) == bsr_copies and read["bsr"][:bsr_copies] == read["bsr"][bsr_copies:2 * bsr_copies]


def test_median_times_runs_before_ahead_of_each_timed_call_outside_the_timing():
    """``before`` (the mapper's cache flush) runs once before every timed call, and its
    20 ms are not in the median; the warm-up calls get none."""
    import time

    events = []

    def slow_setup():
        events.append("before")
        time.sleep(0.02)

    times = bench._median_times({"fast": lambda: events.append("call"), "plain": lambda: None}, rounds=2, calls=3,
                                before={"fast": slow_setup})
    assert times["fast"] < 0.005
    timed = [i for i, e in enumerate(events) if e == "before"]
    assert len(timed) == 2 * 3 and all(events[i + 1] == "call" for i in timed)
    assert events.count("call") > 2 * 3  # the warm-up calls ran too, without it


def test_layer_step_fn_runs_forward_backward_and_one_sgd_update():
    """One call: the input gradient dy @ W, and W, b moved by -lr times dy^T x and the
    column sums of dy (lr 1e-3), computed here in float64 from the weights before; the
    parameters' gradients are dropped after the update."""
    from edgesparse.bench_training import layer_step_fn

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6, generator=g).requires_grad_()
    dy = torch.randn(5, 4, generator=g)
    w0, b0 = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    step = layer_step_fn(layer, x, dy)
    step()
    assert_close(x.grad, dy.double() @ w0, torch.float32, "input gradient")
    assert_close(layer.weight.detach(), w0 - 1e-3 * dy.double().T @ x.detach().double(), torch.float32, "weight")
    assert_close(layer.bias.detach(), b0 - 1e-3 * dy.double().sum(0), torch.float32, "bias")
    assert layer.weight.grad is None and layer.bias.grad is None  # dead after the update: dropped
    step()  # gradients are cleared between calls, not summed
    assert_close(x.grad, dy.double() @ (w0 - 1e-3 * dy.double().T @ x.detach().double()), torch.float32)
