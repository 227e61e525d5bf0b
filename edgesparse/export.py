"""Export a trained sparse model for the C++ host in ``runtime/`` (no Python at run time).

``export(model, out_dir, input_shape)`` writes a directory of three files:

``kernels.so``     a TVM shared library holding the compiled forward kernel
                   (``_block_rows.py``) of every distinct (block shape, schedule, bias?)
                   among the layers, each exported under its own name
``weights.bin``    every layer's BSR arrays, in the array format below
``manifest.json``  layer order, shapes, kernel names, activations (schema below)

A model is an ``nn.Sequential`` (nested ones are flattened) of ``SparseLinear``,
``SparseConv2d``, ``nn.Linear``, ``nn.Conv2d`` (groups=1, zero padding), ``nn.ReLU``,
``nn.MaxPool2d`` (dilation 1, floor mode), ``nn.Flatten`` (from dim 1) and the
inference no-ops ``nn.Dropout`` / ``nn.Identity``; or one of the package's model
families: the MLPs (``edgesparse.models.MLP``, ``edgesparse.cl.model.MLP``) and
``edgesparse.models.ResNet18`` (each BatchNorm folded into the conv before it, eval-mode
statistics; residual sums as ``add`` layers). A dense Linear or Conv2d is exported
as a BSR that keeps every ``_DENSE_BLOCK`` block and runs on the same kernel. A conv is
im2col (done by the host) followed by the kernel; ReLU, max-pooling, flatten, add and
global average pooling are loops in the host (``runtime/src/model.cc``): they are not products and TVM would add a
call per op for nothing.

Array format (``weights.bin``, and the host's input and output files), little-endian::

    offset 0   4 bytes  magic b"ESAR"
           4   u32      format version (1)
           8   u32      number of arrays
          12   u32      0 (reserved)
    then per array, in order:
               u32      length of the name in bytes, then the name (UTF-8)
               u32      dtype: 1 = float32, 2 = int32
               u32      ndim, then ndim x i64 dims
               zero bytes up to the next multiple of 64 from the file start
               the data, row-major (prod(dims) x 4 bytes)

The 64-byte alignment lets the host hand arrays to the kernels in place (TVM's code
may use aligned vector loads on buffer starts; see ``kernels/tvm/_runtime.py``).

Per linear / conv layer ``<name>``, ``weights.bin`` holds, in the kernel's layout:

``<name>.values``       float32 [nnz_blocks, bk, bn]  the kept blocks *transposed* (the
                        forward kernel vectorises along the output), zero past the
                        logical shape
``<name>.row_offsets``  int32 [block_rows + 1]
``<name>.col_indices``  int32 [nnz_blocks]
``<name>.bias``         float32 [block_rows * bn]     zero-padded (absent without bias)

Manifest (schema_version 1)::

    {"format": "edgesparse-export", "schema_version": 1, "library": "kernels.so",
     "weights": "weights.bin", "target": {...TVM target...}, "dtype": "float32",
     "kernel_args": [...],        # the kernels' parameter names, in call order
     "input_shape": [...], "output_shape": [...],          # per sample, without batch
     "layers": [{"name", "op", "inputs", "input_shape", "output_shape", ...op fields}, ...]}

Layers run in list order; ``inputs`` names the layers whose outputs a layer reads
("input": the model's input), one per op but two for ``add``; the last layer's output is
the model's. ``input_shape`` / ``output_shape`` are per sample, without the batch.

ops: ``linear`` and ``conv2d`` (``kernel``, ``shape`` [N, K], ``block`` [bn, bk],
``padded_shape``, ``nnz_blocks``, ``values``, ``row_offsets``, ``col_indices``,
``bias`` (array names, bias null when absent); conv2d adds ``in_channels``,
``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``), ``relu``,
``max_pool2d`` (``kernel_size``, ``stride``, ``padding``), ``flatten``, ``add``,
``global_avg_pool`` ([C, H, W] -> [C], the mean of each channel).

Checkpoints that ``edgesparse export`` reads (``load_checkpoint``; ``torch.load`` with
``weights_only=True``, no pickled classes): ``save_checkpoint``'s, a model's layer list as
JSON beside its state_dict; or a continual-learning run's, whose MLP is rebuilt from the
state_dict under its "model" key.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .compiler.target import VectorUnit, host_cpu_name, vector_unit
from .formats import BSR
from .nn import SparseConv2d, SparseLinear

__all__ = [
    "ARRAY_MAGIC", "SCHEMA_VERSION", "dense_state_dict_bytes", "export", "load_checkpoint", "read_arrays",
    "save_checkpoint", "size_report", "write_arrays",
]

ARRAY_MAGIC = b"ESAR"
ARRAY_VERSION = 1
SCHEMA_VERSION = 1
_ALIGN = 64
_DTYPE_CODES = {torch.float32: 1, torch.int32: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_LITTLE_ENDIAN = {torch.float32: "<f4", torch.int32: "<i4"}
# A dense layer becomes a BSR keeping all of its blocks. 8x8: one AVX2 vector (8 fp32
# lanes) of outputs per block row, and at most 7 padded rows / columns per layer.
_DENSE_BLOCK = (8, 8)
_CHECKPOINT_FORMAT = "edgesparse-model"


# ---------------------------------------------------------------- array files
def _atomic_write(path: Path, write) -> None:
    """write(f) into a temp file beside ``path``, then os.replace it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_arrays(path, arrays: Mapping[str, torch.Tensor]) -> None:
    """Write ``arrays`` (float32 or int32 CPU tensors) to ``path`` in the array format."""
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_CODES:
            raise TypeError(f"arrays[{name!r}] must be a float32 or int32 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")

    def write(f):
        f.write(ARRAY_MAGIC + struct.pack("<III", ARRAY_VERSION, len(arrays), 0))
        for name, t in arrays.items():
            encoded = name.encode()
            f.write(struct.pack("<I", len(encoded)) + encoded)
            f.write(struct.pack(f"<II{t.dim()}q", _DTYPE_CODES[t.dtype], t.dim(), *t.shape))
            f.write(b"\0" * (-f.tell() % _ALIGN))
            f.write(t.detach().cpu().contiguous().numpy().astype(_LITTLE_ENDIAN[t.dtype]).tobytes())

    _atomic_write(Path(path), write)


def read_arrays(path) -> Dict[str, torch.Tensor]:
    """The arrays of a file in the array format, by name, in file order."""
    data = Path(path).read_bytes()
    if data[:4] != ARRAY_MAGIC:
        raise ValueError(f"{path} is not an edgesparse array file (magic {data[:4]!r}, expected {ARRAY_MAGIC!r})")
    try:
        return _parse_arrays(data, path)
    except struct.error as err:  # a header field cut off
        raise ValueError(f"{path}: truncated ({err})") from err


def _parse_arrays(data: bytes, path) -> Dict[str, torch.Tensor]:
    version, count, _ = struct.unpack_from("<III", data, 4)
    if version != ARRAY_VERSION:
        raise ValueError(f"{path}: array format version {version}, this reader knows {ARRAY_VERSION}")
    pos, out = 16, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<I", data, pos)
        name = data[pos + 4 : pos + 4 + length].decode()
        code, ndim = struct.unpack_from("<II", data, pos + 4 + length)
        pos += 12 + length
        dims = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        pos += -pos % _ALIGN
        if code not in _CODE_DTYPES:
            raise ValueError(f"{path}: array {name!r} has dtype code {code} (expected 1 = float32 or 2 = int32)")
        numel = 1
        for d in dims:
            numel *= d
        if pos + 4 * numel > len(data):
            raise ValueError(f"{path}: truncated (array {name!r} needs {4 * numel} bytes at offset {pos})")
        out[name] = torch.frombuffer(bytearray(data[pos : pos + 4 * numel]), dtype=_CODE_DTYPES[code]).reshape(dims)
        pos += 4 * numel
    return out


# ---------------------------------------------------------------- model walk
def _flat_layers(model: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """(qualified name, layer) of each layer, nested nn.Sequentials flattened and the
    package's MLPs spelled out (:func:`_mlp_layers`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mlp = _mlp_layers(model)
    if mlp is not None:
        return mlp
    if not isinstance(model, nn.Sequential):
        return [(prefix or type(model).__name__, model)]
    return [pair for name, child in model.named_children()
            for pair in _flat_layers(child, f"{prefix}.{name}" if prefix else name)]


def _mlp_layers(model: nn.Module) -> Optional[List[Tuple[str, nn.Module]]]:
    """The layers of the package's MLP families (``edgesparse.models.MLP``,
    ``edgesparse.cl.model.MLP``: Linear layers ``layers[i]`` with ReLU between, inputs
    flattened), or None for another module. Matched by shape, not imported: both classes
    compute ``flatten -> layers[0] -> relu -> ... -> layers[-1]``."""
    layers = getattr(model, "layers", None)
    if type(model).__name__ != "MLP" or not isinstance(layers, nn.ModuleList):
        return None
    out: List[Tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i, layer in enumerate(layers):
        out += [(f"relu{i}", nn.ReLU())] if i else []
        out.append((f"layers.{i}", layer))
    return out


def _mlp_from_state_dict(state: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """The MLP a state_dict of the MLP families holds (``layers.<i>.weight`` / ``.bias``, or a
    SparseLinear's ``values`` / ``row_offsets`` / ``col_indices`` / ``bias``), as the
    nn.Sequential computing the same function."""
    layers: List[nn.Module] = []
    width, i = None, 0
    while any(f"layers.{i}.{key}" in state for key in ("weight", "values")):
        prefix = f"layers.{i}."
        own = {key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}
        if "weight" in own:
            n, k = own["weight"].shape
            layer = nn.Linear(k, n, bias="bias" in own)
        elif "bias" in own and width is not None:
            n, k = own["bias"].numel(), width  # a sparse layer's N from its bias, K from the layer before
            layer = SparseLinear(k, n, tuple(own["values"].shape[1:]), density=1.0)  # load adopts the pattern
        else:
            raise ValueError(f"cannot size the sparse layer {prefix.rstrip('.')}: it needs a bias and a layer before it")
        layer.load_state_dict(own)
        layers += [nn.ReLU(), layer] if layers else [layer]
        width, i = n, i + 1
    if not layers:
        raise ValueError("the state_dict holds no MLP layers (layers.0.weight or layers.0.values)")
    return nn.Sequential(*layers)


class _Add(nn.Module):
    """The residual sum of a ResNet block (manifest op ``add``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _GlobalAvgPool(nn.Module):
    """``adaptive_avg_pool2d(x, 1).flatten(1)``: [C, H, W] -> [C] (manifest op ``global_avg_pool``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _fold_batchnorm(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """A copy of ``conv`` (dense or sparse) computing bn(conv(x)) in eval mode: each output
    channel's weights scaled by s = gamma / sqrt(running_var + eps), bias b * s + beta -
    running_mean * s. A row scale keeps a sparse weight's pattern."""
    if bn.running_mean is None or not bn.affine:
        raise TypeError("cannot fold a BatchNorm2d without running statistics and affine parameters")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale + (conv.bias * scale if conv.bias is not None else 0)
        folded = copy.deepcopy(conv)
        if isinstance(folded, SparseConv2d):
            bn_ = folded.block[0]
            rows = folded.row_indices.long()[:, None] * bn_ + torch.arange(bn_)  # output channel of each stored row
            padded = torch.nn.functional.pad(scale, (0, (folded.row_offsets.numel() - 1) * bn_ - scale.numel()))
            folded.values.mul_(padded[rows][..., None])
        else:
            folded.weight.mul_(scale[:, None, None, None])
        folded.bias = nn.Parameter(bias.detach().clone())
    return folded


def _resnet_graph(model: nn.Module) -> Optional[List[Tuple[str, nn.Module, Optional[List[str]]]]]:
    """The layers of ``edgesparse.models.ResNet18`` (stem, four stages of two basic blocks,
    global average pool, classifier) with BatchNorm folded into the convs and each block's
    residual sum as an ``add`` of the second conv and the shortcut; None for another module."""
    if type(model).__name__ != "ResNet18" or not all(hasattr(model, a) for a in ("conv1", "bn1", "layer4", "linear")):
        return None
    nodes: List[Tuple[str, nn.Module, Optional[List[str]]]] = [
        ("conv1", _fold_batchnorm(model.conv1, model.bn1), None), ("relu", nn.ReLU(), None)]
    for stage in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{stage}")):
            p, block_input = f"layer{stage}.{b}", nodes[-1][0]
            nodes += [(f"{p}.conv1", _fold_batchnorm(block.conv1, block.bn1), None), (f"{p}.relu1", nn.ReLU(), None),
                      (f"{p}.conv2", _fold_batchnorm(block.conv2, block.bn2), None)]
            shortcut = block_input
            if len(block.shortcut):
                shortcut = f"{p}.shortcut"
                nodes.append((shortcut, _fold_batchnorm(block.shortcut[0], block.shortcut[1]), [block_input]))
            nodes += [(f"{p}.add", _Add(), [f"{p}.conv2", shortcut]), (f"{p}.relu2", nn.ReLU(), None)]
    return nodes + [("pool", _GlobalAvgPool(), None), ("linear", model.linear, None)]


def _graph(model: nn.Module) -> List[Tuple[str, nn.Module, Optional[List[str]]]]:
    """(name, layer, its inputs' names or None for the layer before) in execution order."""
    return _resnet_graph(model) or [(name, layer, None) for name, layer in _flat_layers(model)]


def _check_supported(name: str, layer: nn.Module) -> None:
    supported = (SparseLinear, SparseConv2d, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten,
                 nn.Dropout, nn.Identity, _Add, _GlobalAvgPool)
    problem = None
    if not isinstance(layer, supported):
        problem = (f"{type(layer).__name__} is not exportable (supported: nn.Sequential of SparseLinear, "
                   "SparseConv2d, Linear, Conv2d, ReLU, MaxPool2d, Flatten, Dropout, Identity)")
    elif isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros" or layer.padding == "same"):
        problem = "Conv2d must have groups=1, zero padding and explicit padding"
    elif isinstance(layer, nn.MaxPool2d) and (layer.ceil_mode or layer.dilation not in (1, (1, 1)) or layer.return_indices):
        problem = "MaxPool2d must have dilation=1, ceil_mode=False, return_indices=False"
    elif isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
        problem = f"Flatten must flatten dims 1..-1, got start_dim={layer.start_dim}, end_dim={layer.end_dim}"
    elif any(p.dtype != torch.float32 for p in layer.parameters()):
        problem = f"export writes float32 kernels, the layer holds {next(layer.parameters()).dtype} parameters"
    if problem:
        raise TypeError(f"cannot export layer {name!r}: {problem}")


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _weight(layer: nn.Module) -> BSR:
    """The layer's weight matrix as a float32 BSR, zero past the logical shape."""
    if isinstance(layer, (SparseLinear, SparseConv2d)):
        W = layer.weight_bsr()
    else:
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        grid = [-(-s // b) for s, b in zip(w.shape, _DENSE_BLOCK)]
        W = BSR.from_mask(w, torch.ones(grid, dtype=torch.bool), _DENSE_BLOCK)
    return W.with_values(W.zero_padding_(W.values.detach().cpu().clone()))


# ---------------------------------------------------------------- targets
def _target(target: str, cores: int) -> Tuple[dict, VectorUnit]:
    """(TVM target as a JSON dict, vector unit for the schedule heuristic) for 'host' or 'aarch64'."""
    if target == "host":
        return {"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": cores}, vector_unit()
    if target == "aarch64":
        # NEON: 4 fp32 lanes, 32 vector registers (compiler/target.py's vector_unit).
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": cores}, VectorUnit(4, 32)
    raise ValueError(f"target must be 'host' or 'aarch64', got {target!r}")


def _aarch64_compiler() -> Optional[str]:
    return shutil.which("aarch64-linux-gnu-g++")


# ---------------------------------------------------------------- export
def _product(name: str, layer: nn.Module, in_shape: List[int], rows_per_call: int, simd: VectorUnit,
             arrays: Dict[str, torch.Tensor], kernels: Dict[str, tuple]) -> dict:
    """The manifest fields of a linear or conv layer; adds its arrays to ``arrays`` and
    its kernel's build parameters to ``kernels``."""
    from .kernels.tvm._runtime import threads
    from .kernels.tvm.bsr_linear import transposed_values
    from .kernels.tvm.schedule import check_fits, heuristic_block_rows

    conv = isinstance(layer, (nn.Conv2d, SparseConv2d))
    if not conv and len(in_shape) != 1:
        raise ValueError(f"layer {name!r}: a linear layer must see flat samples, got per-sample shape "
                         f"{in_shape}; put an nn.Flatten before it")
    W = _weight(layer)
    bn, bk = W.block
    # The C++ host runs the kernel that vectorises along the output (_make_block_rows).
    sched = heuristic_block_rows(rows_per_call, bn, bk, W.block_rows, threads(), simd, transposable=False)
    check_fits(sched, bn, bk, "output")
    has_bias = layer.bias is not None
    kernel = f"bsr_linear_{bn}x{bk}_r{sched.rows}c{sched.cols}u{sched.unroll}_{sched.parallel}" + ("_bias" if has_bias else "")
    kernels[kernel] = (bn, bk, sched, has_bias)
    arrays[f"{name}.values"] = transposed_values(W)
    arrays[f"{name}.row_offsets"] = W.row_offsets.cpu()
    arrays[f"{name}.col_indices"] = W.col_indices.cpu()
    if has_bias:
        bias = layer.bias.detach().cpu()
        arrays[f"{name}.bias"] = torch.nn.functional.pad(bias, (0, W.padded_shape[0] - bias.numel()))
    entry = dict(op="conv2d" if conv else "linear", kernel=kernel, shape=list(W.shape), block=[bn, bk],
                 padded_shape=list(W.padded_shape), nnz_blocks=W.nnz_blocks, values=f"{name}.values",
                 row_offsets=f"{name}.row_offsets", col_indices=f"{name}.col_indices",
                 bias=f"{name}.bias" if has_bias else None)
    if conv:
        entry.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                     kernel_size=_pair(layer.kernel_size), stride=_pair(layer.stride),
                     padding=_pair(layer.padding), dilation=_pair(layer.dilation))
    return entry


def export(model: nn.Module, out_dir, input_shape: Sequence[int], target: str = "host",
           batch_hint: int = 32, progress=None) -> Path:
    """Write ``model`` (see the module docstring for what it may hold) to ``out_dir`` as
    kernels + weights + manifest for inputs of per-sample shape ``input_shape``.

    ``batch_hint``: the batch the kernels' schedules are chosen for (every batch runs;
    the register tile only changes below 4 rows per call). ``target``: 'host' (this CPU)
    or 'aarch64' (aarch64-linux-gnu; linked with aarch64-linux-gnu-g++ when it is on the
    PATH, else written as ``kernels.tar`` of object files to link on the device).
    Returns the directory.
    """
    import tvm

    from .kernels.tvm._block_rows import _make_block_rows
    from .kernels.tvm._runtime import threads

    if isinstance(input_shape, int) or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape must be a sequence of positive ints (one sample's shape), got {input_shape!r}")
    if not isinstance(batch_hint, int) or batch_hint < 1:
        raise ValueError(f"batch_hint must be a positive int, got {batch_hint!r}")
    tvm_target, simd = _target(target, threads())
    nodes = _graph(model)
    for name, layer, _ in nodes:
        _check_supported(name, layer)

    say = progress or (lambda msg: None)
    arrays: Dict[str, torch.Tensor] = {}
    entries, kernels = [], {}
    outputs = {"input": torch.zeros(1, *input_shape)}  # each layer's output, by name
    previous = "input"
    with torch.no_grad():
        for name, layer, inputs in nodes:
            inputs = inputs or [previous]
            args = [outputs[i] for i in inputs]
            in_shape = list(args[0].shape[1:])
            try:
                x = layer(*args)  # shapes only: no layer exported here differs between train and eval
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"layer {name!r} ({type(layer).__name__}) rejects its input of per-sample "
                                 f"shape {in_shape}: {err}") from err
            if isinstance(layer, (nn.Dropout, nn.Identity)):
                continue  # the next layer reads the one before
            outputs[name], previous = x, name
            entry = {"name": name, "inputs": inputs, "input_shape": in_shape, "output_shape": list(x.shape[1:])}
            if isinstance(layer, nn.ReLU):
                entry["op"] = "relu"
            elif isinstance(layer, nn.Flatten):
                entry["op"] = "flatten"
            elif isinstance(layer, _Add):
                entry["op"] = "add"
            elif isinstance(layer, _GlobalAvgPool):
                entry["op"] = "global_avg_pool"
            elif isinstance(layer, nn.MaxPool2d):
                entry.update(op="max_pool2d", kernel_size=_pair(layer.kernel_size),
                             stride=_pair(layer.stride), padding=_pair(layer.padding))
            else:
                rows_per_sample = x.shape[2] * x.shape[3] if x.dim() == 4 else 1  # a conv: one row per pixel
                entry.update(_product(name, layer, in_shape, batch_hint * rows_per_sample, simd, arrays, kernels))
            entries.append(entry)
    if not kernels:
        raise ValueError("model has no Linear or Conv2d layer: nothing to export")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"compiling {len(kernels)} kernel(s) for {target}")
    # Not indirect (blk(b) = b), no gather (the host builds the im2col rows itself).
    funcs = {name: _make_block_rows(bn, bk, sched, False, bias, False).with_attr("global_symbol", name)
             for name, (bn, bk, sched, bias) in kernels.items()}
    # The argument order the host must pass, checked by it on load: a kernel built with
    # other parameters than the host was written for fails with a message, not a crash.
    kernel_args = [param.name for param in next(iter(funcs.values())).params]
    executable = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(tvm_target))
    library = _write_library(executable, out, target)
    write_arrays(out / "weights.bin", arrays)
    manifest = {
        "format": "edgesparse-export", "schema_version": SCHEMA_VERSION, "library": library,
        "weights": "weights.bin", "target": tvm_target, "kernel_args": kernel_args,
        "dtype": "float32", "input_shape": list(input_shape), "output_shape": list(x.shape[1:]),
        "layers": entries,
    }
    _atomic_write(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    say(f"wrote {out}: {library}, weights.bin, manifest.json")
    return out


def _write_library(executable, out: Path, target: str) -> str:
    """Link the compiled kernels into ``out``; returns the library's file name."""
    if target == "host":
        name, kwargs = "kernels.so", {}
    elif _aarch64_compiler():
        from tvm.support import cc

        name, kwargs = "kernels.so", {"fcompile": cc.cross_compiler(_aarch64_compiler())}
    else:
        name, kwargs = "kernels.tar", {}  # object files: no aarch64 linker here
    tmp = out / f".{name}.tmp{Path(name).suffix}"
    executable.export_library(str(tmp), **kwargs)
    os.replace(tmp, out / name)
    return name


def dense_state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the fp32 dense equivalent's state_dict (sparse layers as
    their ``to_dense()``, pruned blocks stored as zeros)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):  # these have no child modules
            own = module.to_dense().state_dict()
        else:
            own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        state.update({f"{name}.{key}": t.detach().float() if t.is_floating_point() else t for key, t in own.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def size_report(model: nn.Module, out_dir) -> str:
    """One line: the exported directory's size, per file, against the dense fp32 state_dict."""
    files = {p.name: p.stat().st_size for p in sorted(Path(out_dir).iterdir()) if p.is_file()}
    total, dense = sum(files.values()), dense_state_dict_bytes(model)
    parts = ", ".join(f"{name} {size / 1e6:.3f}" for name, size in files.items())
    return (f"exported {out_dir}: {total / 1e6:.3f} MB ({parts}); fp32 dense state_dict {dense / 1e6:.3f} MB; "
            f"ratio {total / dense:.3f}")


# ---------------------------------------------------------------- checkpoints
def _layer_spec(name: str, layer: nn.Module) -> dict:
    _check_supported(name, layer)
    spec = {"type": type(layer).__name__}
    if isinstance(layer, (SparseLinear, nn.Linear)):
        spec.update(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
    elif isinstance(layer, (SparseConv2d, nn.Conv2d)):
        spec.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=_pair(layer.kernel_size), stride=_pair(layer.stride), padding=_pair(layer.padding),
                    dilation=_pair(layer.dilation), bias=layer.bias is not None)
    elif isinstance(layer, nn.MaxPool2d):
        spec.update(kernel_size=_pair(layer.kernel_size), stride=_pair(layer.stride), padding=_pair(layer.padding))
    if isinstance(layer, (SparseLinear, SparseConv2d)):
        spec["block"] = list(layer.block)
    return spec


def _build_layer(spec: Mapping) -> nn.Module:
    kind = spec.get("type")
    args = {k: v for k, v in spec.items() if k != "type"}
    simple = {"ReLU": nn.ReLU, "Flatten": nn.Flatten, "Dropout": nn.Dropout, "Identity": nn.Identity,
              "MaxPool2d": nn.MaxPool2d, "Linear": nn.Linear, "Conv2d": nn.Conv2d}
    if kind in simple:
        return simple[kind](**args)
    if kind == "SparseLinear":
        # density 1 for now: load_state_dict then adopts the saved pattern.
        return SparseLinear(args.pop("in_features"), args.pop("out_features"), density=1.0, **args)
    if kind == "SparseConv2d":
        return SparseConv2d(args.pop("in_channels"), args.pop("out_channels"), args.pop("kernel_size"),
                            density=1.0, **args)
    raise ValueError(f"checkpoint spec names an unknown layer type {kind!r}")


def save_checkpoint(model: nn.Module, path, input_shape: Sequence[int]) -> None:
    """Save an exportable ``model`` (an nn.Sequential as :func:`export` takes) as a
    checkpoint that :func:`load_checkpoint` and ``edgesparse export`` read."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    layers = [(name, layer) for name, layer in model.named_children()]
    for name, layer in layers:
        if isinstance(layer, nn.Sequential):
            raise TypeError(f"save_checkpoint takes a flat nn.Sequential; {name!r} is nested")
    spec = {"layers": [_layer_spec(n, layer) for n, layer in layers], "input_shape": list(input_shape)}
    buffer = io.BytesIO()
    torch.save({"format": _CHECKPOINT_FORMAT, "spec": json.dumps(spec), "state_dict": model.state_dict()}, buffer)
    _atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path) -> Tuple[nn.Sequential, List[int]]:
    """(model, per-sample input shape) from a checkpoint: one :func:`save_checkpoint`
    wrote, or one of a continual-learning run (``edgesparse train``: its trained MLP, under
    the key "model")."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == _CHECKPOINT_FORMAT:
        spec = json.loads(payload["spec"])
        model = nn.Sequential(*[_build_layer(s) for s in spec["layers"]])
        model.load_state_dict(payload["state_dict"])
        return model.eval(), list(spec["input_shape"])
    if isinstance(payload, dict) and isinstance(payload.get("model"), Mapping):
        model = _mlp_from_state_dict(payload["model"])
        return model.eval(), [model[0].in_features]
    raise ValueError(f"{path} is not an edgesparse model checkpoint (expected a dict with format="
                     f"{_CHECKPOINT_FORMAT!r}, as save_checkpoint writes, or a training run's checkpoint)")
