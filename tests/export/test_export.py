"""`edgesparse export` and the C++ host (runtime/): the array format against hand-computed
bytes, the exported weights against the layers' dense weights, the C++ outputs against
a float64 dense oracle when cmake and a C++ compiler are on the machine. ctest (the MLP
and conv net against Python's outputs, and the broken inputs) is run by the README's
test command after pytest, not from here, so CI does not run it twice."""

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesparse import cli
from edgesparse.export import export, load_checkpoint, read_arrays, save_checkpoint, write_arrays
from edgesparse.nn import SparseConv2d, SparseLinear, sparsify
from tests._oracle import assert_close, to64

REPO = Path(__file__).resolve().parents[2]


def ragged_mlp() -> nn.Sequential:
    """Sizes that are no multiple of the blocks, a dense classifier."""
    model = nn.Sequential(nn.Linear(45, 40), nn.ReLU(), nn.Linear(40, 7))
    return sparsify(model, {"0": {"block": (16, 8), "density": 0.4}})


def small_conv() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.MaxPool2d(2, padding=1),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
    model[0] = SparseConv2d.from_dense(model[0], (8, 9), density=0.67)
    return model


def dense_oracle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model in float64 (eval mode) with each sparse layer replaced by its dense equivalent."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (SparseLinear, SparseConv2d)):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, module.to_dense())
    with torch.no_grad():
        return dense.double().eval()(to64(x))


# ---------------------------------------------------------------- array format
def test_array_file_bytes_by_hand(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([7, -1, 0, 2**31 - 1], dtype=torch.int32)
    write_arrays(tmp_path / "x.bin", {"a": a, "bb": b})
    data = (tmp_path / "x.bin").read_bytes()
    assert data[:16] == b"ESAR" + struct.pack("<III", 1, 2, 0)
    # a: name at 16..21, dtype, ndim, two i64 dims -> 45, data aligned to 64
    assert data[16:45] == struct.pack("<I", 1) + b"a" + struct.pack("<IIqq", 1, 2, 2, 3)
    assert data[45:64] == bytes(19)
    assert data[64:88] == struct.pack("<6f", *range(6))
    # bb: header 88..110, data at 128
    assert data[88:110] == struct.pack("<I", 2) + b"bb" + struct.pack("<IIq", 2, 1, 4)
    assert data[128:] == struct.pack("<4i", 7, -1, 0, 2**31 - 1)
    back = read_arrays(tmp_path / "x.bin")
    assert list(back) == ["a", "bb"] and torch.equal(back["a"], a) and torch.equal(back["bb"], b)


def test_array_file_errors(tmp_path):
    with pytest.raises(TypeError, match=r"arrays\['w'\] must be a float32 or int32 tensor, got torch.float64"):
        write_arrays(tmp_path / "x.bin", {"w": torch.zeros(2, dtype=torch.float64)})
    (tmp_path / "bad.bin").write_bytes(b"NOPE" + bytes(12))
    with pytest.raises(ValueError, match="not an edgesparse array file"):
        read_arrays(tmp_path / "bad.bin")
    (tmp_path / "v2.bin").write_bytes(b"ESAR" + struct.pack("<III", 2, 0, 0))
    with pytest.raises(ValueError, match="version 2"):
        read_arrays(tmp_path / "v2.bin")
    write_arrays(tmp_path / "ok.bin", {"w": torch.ones(4)})
    (tmp_path / "short.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_arrays(tmp_path / "short.bin")
    (tmp_path / "header.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated"):
        read_arrays(tmp_path / "header.bin")


# ---------------------------------------------------------------- export
def rebuilt_weight(arrays, layer: dict) -> torch.Tensor:
    """The padded dense weight from the exported arrays, block by block."""
    (np_, kp), (bn, bk) = layer["padded_shape"], layer["block"]
    values, off, cols = (arrays[layer[k]] for k in ("values", "row_offsets", "col_indices"))
    dense = torch.zeros(np_, kp)
    for i in range(np_ // bn):
        for b in range(int(off[i]), int(off[i + 1])):
            j = int(cols[b])
            dense[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = values[b].T  # stored transposed
    return dense


@pytest.fixture(scope="module")
def exported_mlp(tmp_path_factory):
    torch.manual_seed(1)
    model = ragged_mlp().eval()
    return model, export(model, tmp_path_factory.mktemp("mlp") / "out", [45])


def test_export_writes_the_layers_weights(exported_mlp):
    model, out = exported_mlp
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["input_shape"] == [45] and manifest["output_shape"] == [7]
    assert [layer["op"] for layer in manifest["layers"]] == ["linear", "relu", "linear"]
    arrays = read_arrays(out / manifest["weights"])
    for layer, module in zip(manifest["layers"][::2], (model[0], model[2])):
        n, k = layer["shape"]
        dense_module = module.to_dense() if isinstance(module, SparseLinear) else module
        w = rebuilt_weight(arrays, layer)
        assert torch.equal(w[:n, :k], dense_module.weight.detach())
        assert not w[n:].any() and not w[:, k:].any()
        bias = arrays[layer["bias"]]
        assert torch.equal(bias[:n], dense_module.bias.detach()) and not bias[n:].any()
    assert manifest["layers"][0]["block"] == [16, 8] and manifest["layers"][2]["block"] == [8, 8]
    assert manifest["layers"][0]["nnz_blocks"] == model[0].nnz_blocks
    import tvm

    library = tvm.runtime.load_module(str(out / manifest["library"]))
    for layer in manifest["layers"][::2]:
        assert library[layer["kernel"]] is not None


@pytest.mark.parametrize("model, shape, error, match", [
    (nn.Sequential(nn.Linear(4, 4), nn.Tanh()), [4], TypeError, r"layer '1': Tanh is not exportable"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), [4, 5, 5], TypeError, "groups=1"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Linear(3, 2)), [2, 5, 5], ValueError, "put an nn.Flatten before it"),
    (nn.Sequential(nn.Linear(4, 4)), [5], ValueError, r"layer '0' \(Linear\) rejects its input of per-sample shape \[5\]"),
    (nn.Sequential(nn.Linear(4, 4)), [0], ValueError, "input_shape must be a sequence of positive ints"),
    (nn.Sequential(nn.ReLU()), [4], ValueError, "nothing to export"),
    (nn.Sequential(nn.Linear(4, 4).double()), [4], TypeError, "float32"),
], ids=["unsupported", "grouped-conv", "no-flatten", "wrong-shape", "bad-shape", "no-product", "fp64"])
def test_export_rejects(tmp_path, model, shape, error, match):
    with pytest.raises(error, match=match):
        export(model, tmp_path / "out", shape)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_export_rejects_an_unknown_target(tmp_path):
    with pytest.raises(ValueError, match="target must be 'host' or 'aarch64', got 'riscv'"):
        export(nn.Sequential(nn.Linear(4, 4)), tmp_path, [4], target="riscv")


def test_aarch64_library(tmp_path):
    """An aarch64 ELF when a cross g++ is installed, else the object files to link on the device."""
    out = export(nn.Sequential(nn.Linear(20, 8)), tmp_path / "a64", [20], target="aarch64")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["mtriple"] == "aarch64-linux-gnu"
    library = out / manifest["library"]
    if shutil.which("aarch64-linux-gnu-g++"):
        header = library.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == 183  # EM_AARCH64
    else:
        assert library.name == "kernels.tar"


# ---------------------------------------------------------------- checkpoints and CLI
def test_checkpoint_round_trip_and_cli(tmp_path, capsys):
    torch.manual_seed(2)
    model = small_conv().eval()
    save_checkpoint(model, tmp_path / "model.pt", [3, 10, 10])
    loaded, shape = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert shape == [3, 10, 10] and torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].col_indices, model[0].col_indices)
    assert cli.main(["export", str(tmp_path / "model.pt"), str(tmp_path / "out"), "--report"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert (tmp_path / "out" / "kernels.so").exists()


def test_training_run_checkpoint(tmp_path):
    """A continual-learning run's checkpoint (its MLP's state_dict under "model") exports as
    the MLP it holds: same function, same pattern."""
    cl_model = pytest.importorskip("edgesparse.cl.model")
    torch.manual_seed(4)
    model = cl_model.build_mlp(40, 5, [64, 48], densities=[0.3], block=(16, 16)).eval()
    torch.save({"version": 1, "config": {}, "model": model.state_dict()}, tmp_path / "run.pt")
    loaded, shape = load_checkpoint(tmp_path / "run.pt")
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert shape == [40] and torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[2].col_indices, model.layers[1].col_indices)
    assert cli.main(["export", str(tmp_path / "run.pt"), str(tmp_path / "out")]) == 0


def test_cli_reports_a_bad_checkpoint(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert cli.main(["export", str(tmp_path / "other.pt"), str(tmp_path / "out")]) == 2
    assert "not an edgesparse model checkpoint" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err


# ---------------------------------------------------------------- the C++ host
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("cmake and a C++ compiler are needed to build runtime/")
    build = tmp_path_factory.mktemp("build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}", *generator],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build


@pytest.mark.parametrize("batch", [1, 6])
def test_host_matches_a_dense_oracle(build_dir, exported_mlp, tmp_path, batch):
    model, out = exported_mlp
    x = torch.randn(batch, 45)
    write_arrays(tmp_path / "in.bin", {"input": x})
    subprocess.run([str(build_dir / "edgesparse-run"), str(out), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True)
    assert_close(read_arrays(tmp_path / "out.bin")["output"], dense_oracle(model, x), torch.float32, "C++ MLP")


def test_host_density_zero_and_one(build_dir, tmp_path):
    """A layer with no kept block (its output is the bias) and one keeping every block."""
    torch.manual_seed(6)
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(24, 16), (8, 8), density=0.0), nn.ReLU(),
                          SparseLinear.from_dense(nn.Linear(16, 5), (4, 8), density=1.0))
    assert model[0].nnz_blocks == 0 and model[2].density == 1.0
    out = export(model.eval(), tmp_path / "edge", [24])
    x = torch.randn(2, 24)
    write_arrays(tmp_path / "in.bin", {"input": x})
    subprocess.run([str(build_dir / "edgesparse-run"), str(out), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True)
    assert_close(read_arrays(tmp_path / "out.bin")["output"], dense_oracle(model, x), torch.float32, "C++ edge densities")


def test_host_conv_matches_a_dense_oracle(build_dir, tmp_path):
    torch.manual_seed(3)
    model = small_conv().eval()
    out = export(model, tmp_path / "conv", [3, 10, 10])
    x = torch.randn(3, 3, 10, 10)
    write_arrays(tmp_path / "in.bin", {"input": x})
    subprocess.run([str(build_dir / "edgesparse-run"), str(out), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True)
    assert_close(read_arrays(tmp_path / "out.bin")["output"], dense_oracle(model, x), torch.float32, "C++ conv net")


def test_host_runs_the_package_mlp(build_dir, tmp_path):
    """edgesparse.models.MLP (inputs flattened, ReLU between its ``layers``) is exported as
    that sequence of layers."""
    models = pytest.importorskip("edgesparse.models")
    torch.manual_seed(5)
    model = models.MLP([2 * 3 * 5, 40, 6])
    sparsify(model, {"layers.0": {"block": (8, 8), "density": 0.5}})
    out = export(model.eval(), tmp_path / "mlp", [2, 3, 5])
    x = torch.randn(4, 2, 3, 5)
    write_arrays(tmp_path / "in.bin", {"input": x})
    subprocess.run([str(build_dir / "edgesparse-run"), str(out), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True)
    oracle = nn.Sequential(nn.Flatten(), model.layers[0].to_dense(), nn.ReLU(), model.layers[1])
    assert_close(read_arrays(tmp_path / "out.bin")["output"], dense_oracle(oracle, x), torch.float32, "C++ MLP")


def test_host_runs_the_package_resnet(build_dir, tmp_path):
    """edgesparse.models.ResNet18: BatchNorm folded into the (sparse and dense) convs,
    residual adds, shortcuts, global average pool; against the float64 dense model."""
    models = pytest.importorskip("edgesparse.models")
    torch.manual_seed(7)
    model = models.ResNet18(num_classes=6, width=8)
    sparsify(model, models.resnet18_sparse_config({"block": (8, 18), "density": 0.4}))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    out = export(model.eval(), tmp_path / "resnet", [3, 12, 12])
    x = torch.randn(3, 3, 12, 12)
    write_arrays(tmp_path / "in.bin", {"input": x})
    subprocess.run([str(build_dir / "edgesparse-run"), str(out), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True)
    assert_close(read_arrays(tmp_path / "out.bin")["output"], dense_oracle(model, x), torch.float32, "C++ ResNet-18")


def test_export_needs_batchnorm_statistics(tmp_path):
    models = pytest.importorskip("edgesparse.models")
    model = models.ResNet18(num_classes=2, width=4)
    model.bn1 = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(TypeError, match="cannot fold a BatchNorm2d without running statistics"):
        export(model, tmp_path / "out", [3, 8, 8])


def test_host_usage_errors(build_dir, exported_mlp, tmp_path):
    _, out = exported_mlp
    run = str(build_dir / "edgesparse-run")
    usage = subprocess.run([run, str(out)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: edgesparse-run" in usage.stderr
    write_arrays(tmp_path / "two.bin", {"a": torch.zeros(1, 45), "b": torch.zeros(1, 45)})
    two = subprocess.run([run, str(out), str(tmp_path / "two.bin"), str(tmp_path / "o.bin")], capture_output=True, text=True)
    assert two.returncode == 1 and "exactly one array, found 2" in two.stderr
    write_arrays(tmp_path / "int.bin", {"a": torch.zeros(1, 45, dtype=torch.int32)})
    ints = subprocess.run([run, str(out), str(tmp_path / "int.bin"), str(tmp_path / "o.bin")], capture_output=True, text=True)
    assert ints.returncode == 1 and "must be float32, got int32" in ints.stderr
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.skipif(not os.environ.get("EDGESPARSE_AARCH64_SITE"),
                    reason="opt-in: set EDGESPARSE_AARCH64_SITE to the unpacked aarch64 wheels (runtime/aarch64-linux-gnu.cmake)")
def test_aarch64_under_qemu(tmp_path):
    """Cross-build edgesparse-run for aarch64 and run the ctest models under qemu-aarch64."""
    missing = [tool for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake") if not shutil.which(tool)]
    assert not missing, f"EDGESPARSE_AARCH64_SITE is set but {missing} are not installed"
    build = tmp_path / "build-a64"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={REPO}/runtime/aarch64-linux-gnu.cmake",
                    f"-DEDGESPARSE_SITE_PACKAGES={os.environ['EDGESPARSE_AARCH64_SITE']}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    result = subprocess.run([str(REPO / "runtime/tests/aarch64_qemu.sh"), str(build), str(tmp_path / "work"), sys.executable],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("max relative error") == 3
