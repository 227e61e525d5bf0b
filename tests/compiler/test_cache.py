"""The on-disk kernel cache: reuse, rebuild of a corrupt entry, one build when two
processes ask at once, and keys that separate what must not share a build."""

import multiprocessing
import time

import numpy as np
import pytest

from edgesparse.compiler import cache


@pytest.fixture(autouse=True)
def _cache_on(monkeypatch):
    """The suite builds kernels in memory (conftest); these tests are about the cache."""
    monkeypatch.setenv(cache.BUILD_CACHE_ENV, "1")


def _add_one():
    """A tiny TVM kernel (not one of ours, so the test checks the cache alone): b = a + 1."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def main(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
        for i in range(16):
            b[i] = a[i] + T.float32(1)

    return tvm.compile(tvm.IRModule({"main": main}), target=tvm.target.Target({"kind": "llvm"}))


def _run(kernel):
    import tvm

    a = np.arange(16, dtype=np.float32)
    b = tvm.runtime.tensor(np.zeros(16, np.float32), tvm.cpu())
    kernel(tvm.runtime.tensor(a, tvm.cpu()), b)
    return b.numpy(), a + 1


def _counting(builds):
    def build():
        builds.append(1)
        return _add_one()
    return build


def test_second_request_loads_from_disk(tmp_path):
    builds = []
    first = cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    second = cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    assert len(builds) == 1
    for kernel in (first, second):
        got, expected = _run(kernel)
        np.testing.assert_array_equal(got, expected)
    assert len(list(tmp_path.glob("*.so"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1


def test_different_params_or_target_are_different_entries(tmp_path):
    builds = []
    for params, target in (((16,), "llvm"), ((17,), "llvm"), ((16,), "llvm -other")):
        cache.load_or_build("test.add_one", params, target, _counting(builds), tmp_path)
    assert len(builds) == 3 and len(list(tmp_path.glob("*.so"))) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete_meta"])
def test_corrupt_entry_is_rebuilt(tmp_path, damage):
    builds = []
    cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    so = next(tmp_path.glob("*.so"))
    # A new file in its place (as a crashed or foreign writer leaves it): rewriting the
    # one this process has mapped would fault on its pages, which no cache can help.
    data = so.read_bytes()
    if damage == "truncate":
        so.unlink()
        so.write_bytes(data[:100])
    elif damage == "garbage":
        so.unlink()
        so.write_bytes(b"\x7fELF" + b"\0" * 5000)
    else:
        next(tmp_path.glob("*.json")).unlink()
    if damage == "delete_meta":  # no record of the .so: built again without complaint
        kernel = cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    else:
        with pytest.warns(UserWarning, match="unusable.*rebuilding"):
            kernel = cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    assert len(builds) == 2
    got, expected = _run(kernel)
    np.testing.assert_array_equal(got, expected)


def _build_in_child(directory, log):
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # widen the window in which the other process asks too
        return _add_one()

    kernel = cache.load_or_build("test.add_one", (16,), "llvm", build, directory)
    got, expected = _run(kernel)
    assert (got == expected).all()


def test_two_processes_build_once(tmp_path):
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")  # neither has started TVM's thread pool yet
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path / "kernels", log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert log.read_text() == "built\n"


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.BUILD_CACHE_ENV, "0")
    builds = []
    cache.load_or_build("test.add_one", (16,), "llvm", _counting(builds), tmp_path)
    assert builds == [1] and not list(tmp_path.iterdir())
