"""Target.detect(): what it reads from this machine, and a fingerprint built only from
the fields that decide the generated code."""

import os
import platform

from edgesparse.compiler.target import Target, cpu_count, last_level_cache_bytes


def _proc_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    return set()


def test_detect_reads_this_machine():
    t = Target.detect()
    assert t.machine == platform.machine()
    assert t.cores == len(os.sched_getaffinity(0)) == cpu_count()
    assert t.llvm_cpu and t.llvm_cpu != "native"
    assert list(t.features) == sorted(t.features)
    if os.path.exists("/proc/cpuinfo"):
        assert set(t.features) <= _proc_flags()
        if "avx2" in _proc_flags():
            assert "avx2" in t.features
    assert t.gpu is None or isinstance(t.gpu, str)


def test_fingerprint_is_stable_and_names_what_decides_the_code():
    a = Target("Some CPU", "znver3", ("avx", "avx2", "fma"), 2, "x86_64")
    assert a.fingerprint == "x86_64-znver3-avx+avx2+fma-2c"
    # The marketing name does not enter; the LLVM CPU, features, cores and GPU do.
    assert Target("Other name", "znver3", ("avx", "avx2", "fma"), 2, "x86_64").fingerprint == a.fingerprint
    assert Target("Some CPU", "znver4", ("avx", "avx2", "fma"), 2, "x86_64").fingerprint != a.fingerprint
    assert Target("Some CPU", "znver3", ("avx", "avx2", "fma"), 4, "x86_64").fingerprint != a.fingerprint
    gpu = Target("Some CPU", "znver3", ("avx",), 2, "x86_64", gpu="NVIDIA H200 (141 GB)")
    assert gpu.fingerprint.endswith("-NVIDIA_H200_141_GB")
    assert Target.detect().fingerprint == Target.detect().fingerprint


def test_tvm_target_names_the_cpu():
    t = Target.detect()
    spec = t.tvm_target().export()
    assert spec["mcpu"] == t.llvm_cpu and spec["num-cores"] == t.cores


def test_last_level_cache_is_the_largest_readable_cache(tmp_path):
    for name, size in [("index0", "32K"), ("index2", "512K"), ("index3", "32768K"), ("index4", "garbled")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "index5").mkdir()  # no size file
    assert last_level_cache_bytes(tmp_path) == 32768 * 1024
    assert last_level_cache_bytes(tmp_path / "missing", default=123) == 123
