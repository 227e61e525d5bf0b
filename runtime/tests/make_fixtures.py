"""Write the ctest fixtures: three exported models (an MLP, a small conv net, the package's
ResNet-18 at width 8) with an input and the Python output,
and broken copies of them (``runtime/tests/tests.cmake`` lists what each must report).

    python make_fixtures.py <out dir> [host|aarch64]

With ``aarch64`` only the three models are written, their kernels compiled for aarch64
(``runtime/tests/aarch64_qemu.sh`` runs them under qemu-user).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from edgesparse.export import export, write_arrays
from edgesparse.models import ResNet18, resnet18_sparse_config
from edgesparse.nn import SparseConv2d, sparsify


def mlp() -> nn.Sequential:
    """Ragged sizes (100, 67: no multiple of the blocks), two block shapes, a dense classifier."""
    model = nn.Sequential(nn.Linear(100, 96), nn.ReLU(), nn.Linear(96, 67), nn.ReLU(), nn.Linear(67, 10))
    return sparsify(model, {"0": {"block": (32, 32), "density": 0.5}, "2": {"block": (16, 8), "density": 0.3}})


def conv() -> nn.Sequential:
    """Padding, stride, dilation, a block-punched layer, max-pooling and a dense classifier."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(24 * 4 * 4, 10),
    )
    sparsify(model, {"0": {"block": (8, 9), "density": 0.6}})
    model[3] = SparseConv2d.block_punched(model[3], density=0.5)
    return model


def resnet() -> nn.Module:
    """The package's ResNet-18 at width 8, its 3x3 convs block-punched at half density, with
    BatchNorm statistics that make folding them into the convs matter."""
    model = ResNet18(num_classes=10, width=8)
    sparsify(model, resnet18_sparse_config({"block": (8, 36), "density": 0.5}))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model


def write_case(out: Path, name: str, model: nn.Module, input_shape, batch: int, target: str) -> None:
    model.eval()
    x = torch.randn(batch, *input_shape)
    with torch.no_grad():
        y = model(x)
    export(model, out / name, input_shape, target=target)
    write_arrays(out / name / "input.bin", {"input": x})
    write_arrays(out / name / "expected.bin", {"expected": y})


def broken_copy(out: Path, name: str, edit) -> None:
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out / "mlp", target)
    edit(target)


def edit_manifest(change):
    def edit(d: Path):
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
    return edit


def main(out: Path, target: str) -> None:
    torch.manual_seed(0)
    write_case(out, "mlp", mlp(), [100], batch=3, target=target)
    write_case(out, "conv", conv(), [3, 16, 16], batch=2, target=target)
    write_case(out, "resnet", resnet(), [3, 16, 16], batch=2, target=target)
    if target != "host":
        return
    broken_copy(out, "bad_schema", edit_manifest(lambda m: m.update(schema_version=99)))
    broken_copy(out, "kernel_args", edit_manifest(lambda m: m.update(kernel_args=["inp", "V"])))
    broken_copy(out, "bad_inputs", edit_manifest(lambda m: m["layers"][0].update(inputs=["layer9"])))
    broken_copy(out, "bad_layer", edit_manifest(lambda m: m["layers"][0].update(output_shape=[95])))
    broken_copy(out, "weights_mismatch", edit_manifest(lambda m: m["layers"][0].update(nnz_blocks=5)))
    broken_copy(out, "bad_json", lambda d: (d / "manifest.json").write_text('{"format": "edgesparse-export",'))
    broken_copy(out, "missing_weights", lambda d: (d / "weights.bin").unlink())
    broken_copy(out, "missing_library", lambda d: (d / "kernels.so").unlink())
    write_arrays(out / "bad_input.bin", {"input": torch.randn(3, 99)})


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "host")
