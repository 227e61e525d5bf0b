"""edgesparse.kernels.dispatch: which backend runs an op.

Rules under test (module docstring of dispatch.py and docs/design.md): automatic choice is
cpu -> tvm, cuda -> triton, else reference, and an automatically chosen backend that
cannot run falls back to reference; a backend asked for explicitly (EDGESPARSE_BACKEND or
use_backend, the context manager winning) raises BackendUnavailableError instead.
"""

import importlib
import sys
import warnings

import pytest
import torch

import edgesparse
from edgesparse import BSR, BackendUnavailableError, ops
from edgesparse.kernels import dispatch

CPU = torch.device("cpu")
ENV = "EDGESPARSE_BACKEND"


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def problem(dtype, device="cpu"):
    """A small product and its dense oracle, computed from a weight that has every block."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(13, 7, generator=g, dtype=torch.float64)  # 4x4 blocks: all hold nonzeros
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ref = x @ w.T
    return x.to(dtype).to(device), BSR.from_dense(w.to(dtype).to(device), (4, 4)), ref


def spy(monkeypatch, module_name, fn="bsr_linear"):
    """Count calls of a backend module's op (and still run it)."""
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
    calls = []
    original = getattr(module, fn)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, fn, wrapper)
    return calls


# ------------------------------------------------------------------ automatic choice
def test_auto_cpu_fp32_picks_tvm():
    assert dispatch.requested_backend() is None
    assert dispatch.select(CPU, torch.float32).__name__ == "edgesparse.kernels.tvm"


def test_auto_cpu_fp32_op_runs_on_tvm(monkeypatch):
    calls = spy(monkeypatch, "edgesparse.kernels.tvm")
    x, W, ref = problem(torch.float32)
    y = ops.bsr_linear(x, W)
    assert len(calls) == 1
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_auto_cpu_float64_falls_back_to_reference(monkeypatch):
    assert dispatch.unavailable_reason("tvm", CPU, torch.float64) is not None  # tvm is fp32 only
    assert dispatch.select(CPU, torch.float64).__name__ == "edgesparse.kernels.reference"
    calls = spy(monkeypatch, "edgesparse.kernels.reference")
    x, W, ref = problem(torch.float64)
    y = ops.bsr_linear(x, W)
    assert len(calls) == 1
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_auto_falls_back_when_the_backend_cannot_be_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "edgesparse.kernels.tvm", None)  # `import` now raises ImportError
    assert "could not be imported" in dispatch.unavailable_reason("tvm", CPU, torch.float32)
    assert dispatch.select(CPU, torch.float32).__name__ == "edgesparse.kernels.reference"
    with edgesparse.use_backend("tvm"), pytest.raises(BackendUnavailableError, match="could not be imported"):
        dispatch.select(CPU, torch.float32)


def test_auto_other_devices_use_reference():
    assert dispatch.select(torch.device("meta"), torch.float32).__name__ == "edgesparse.kernels.reference"


def test_reference_is_always_available():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert dispatch.unavailable_reason("reference", CPU, dtype) is None


# ------------------------------------------------------------------ explicit choice raises
def test_explicit_tvm_with_float64_raises():
    x, W, _ = problem(torch.float64)
    with edgesparse.use_backend("tvm"):
        with pytest.raises(BackendUnavailableError, match="'tvm' was requested"):
            ops.bsr_linear(x, W)
        with pytest.raises(BackendUnavailableError):
            dispatch.select(CPU, torch.float64)


def test_explicit_tvm_with_fp32_uses_tvm():
    with edgesparse.use_backend("tvm"):
        assert dispatch.select(CPU, torch.float32).__name__ == "edgesparse.kernels.tvm"


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(BackendUnavailableError, RuntimeError)


# ------------------------------------------------------------------ environment variable
def test_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv(ENV, "reference")
    assert dispatch.select(CPU, torch.float32).__name__ == "edgesparse.kernels.reference"  # auto would say tvm
    calls = spy(monkeypatch, "edgesparse.kernels.reference")
    x, W, ref = problem(torch.float32)
    y = ops.bsr_linear(x, W)
    assert len(calls) == 1
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_env_var_surrounding_whitespace_is_ignored(monkeypatch):
    monkeypatch.setenv(ENV, " reference\n")
    assert dispatch.requested_backend() == "reference"


def test_empty_env_var_means_automatic(monkeypatch):
    monkeypatch.setenv(ENV, "")
    assert dispatch.requested_backend() is None
    assert dispatch.select(CPU, torch.float64).__name__ == "edgesparse.kernels.reference"


def test_env_var_request_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv(ENV, "tvm")
    x, W, _ = problem(torch.float64)
    with pytest.raises(BackendUnavailableError, match="tvm"):
        ops.bsr_linear(x, W)


@pytest.mark.parametrize("value", ["bogus", "TVM", "cuda", "torch"])
def test_invalid_env_var_raises_value_error_naming_it(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        dispatch.select(CPU, torch.float32)
    x, W, _ = problem(torch.float32)
    with pytest.raises(ValueError, match=ENV):
        ops.bsr_linear(x, W)


# ------------------------------------------------------------------ context manager
def test_context_manager_wins_over_env(monkeypatch):
    monkeypatch.setenv(ENV, "tvm")
    x, W, ref = problem(torch.float64)
    with edgesparse.use_backend("reference"):
        assert dispatch.select(CPU, torch.float64).__name__ == "edgesparse.kernels.reference"
        torch.testing.assert_close(ops.bsr_linear(x, W), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(BackendUnavailableError):  # outside the block the variable applies again
        ops.bsr_linear(x, W)


def test_context_manager_wins_over_an_invalid_env(monkeypatch):
    monkeypatch.setenv(ENV, "bogus")
    with edgesparse.use_backend("reference"):
        assert dispatch.requested_backend() == "reference"


def test_use_backend_invalid_name_raises_value_error():
    with pytest.raises(ValueError, match=r"use_backend"):
        with edgesparse.use_backend("bogus"):
            pass
    assert dispatch.requested_backend() is None


def test_use_backend_nests_and_restores():
    with edgesparse.use_backend("tvm"):
        assert dispatch.requested_backend() == "tvm"
        with edgesparse.use_backend("reference"):
            assert dispatch.requested_backend() == "reference"
        assert dispatch.requested_backend() == "tvm"
    assert dispatch.requested_backend() is None


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with edgesparse.use_backend("reference"):
            raise KeyError("boom")
    assert dispatch.requested_backend() is None


# ------------------------------------------------------------------ triton on CPU
def test_triton_on_cpu_runs_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.unavailable_reason("triton", CPU, torch.float32) is None
    with edgesparse.use_backend("triton"):
        assert dispatch.select(CPU, torch.float32).__name__ == "edgesparse.kernels.triton"


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.unavailable_reason("triton", CPU, torch.float32) is not None
    x, W, _ = problem(torch.float32)
    with edgesparse.use_backend("triton"), pytest.raises(BackendUnavailableError, match="triton"):
        ops.bsr_linear(x, W)


def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, W, _ = problem(torch.float64)
    with edgesparse.use_backend("triton"), pytest.raises(BackendUnavailableError, match="triton"):
        ops.bsr_linear(x, W)


# ------------------------------------------------------------------ OpenMP wait policy
@pytest.fixture
def openmp_unchecked(monkeypatch):
    """A process that has not yet run a TVM kernel, on two torch and two TVM threads."""
    runtime = importlib.import_module("edgesparse.kernels.tvm._runtime")
    monkeypatch.setattr(runtime, "_openmp_checked", False)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_spinning_openmp_is_warned_about_once(monkeypatch, openmp_unchecked):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    x, W, ref = problem(torch.float32)
    with pytest.warns(RuntimeWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        y = ops.bsr_linear(x, W)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.bsr_linear(x, W)


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
def test_a_set_openmp_policy_is_not_warned_about(monkeypatch, openmp_unchecked, policy):
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    x, W, _ = problem(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.bsr_linear(x, W)
