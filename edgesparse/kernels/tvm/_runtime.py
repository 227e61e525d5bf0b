"""Building and calling the TVM kernels: one in-process cache of compiled kernels,
and the conversion of torch tensors into kernel arguments."""

from __future__ import annotations

import functools
import gc
from typing import Callable, Hashable

import torch

# TVM's generated code may use aligned vector loads on buffer starts: it assumes the
# 64-byte alignment that torch's allocator gives but a view into a tensor may lack.
_ALIGNMENT = 64


@functools.lru_cache(maxsize=None)
def _compile(key: Hashable, make_prim_func: Callable, target_json: str):
    import tvm

    from ...compiler.cache import load_or_build  # built kernels persist on disk (compiler issue)

    def build():
        kernel = tvm.compile(tvm.IRModule({"main": make_prim_func(*key[1:])}), target=tvm.target.Target(target_json))
        # TVMScript's parser keeps inspect.stack() frame records in reference cycles, and
        # those frames reach our callers': a kernel first built inside a backward pass kept
        # that step's autograd graph (activations, and the values' gradient accumulator,
        # which then rejected a resized pattern) alive until the next garbage collection.
        # Collecting once per build (tens of ms, against seconds of compiling) frees them
        # now. A kernel loaded from the disk cache is never parsed, so it needs none: the
        # default `edgesparse train` spent 2.3 s of its sparse run's 13.6 s in 11 such
        # collections (0.2 s each over the stream's data) with every kernel on disk.
        gc.collect()
        return kernel

    return load_or_build(f"{make_prim_func.__module__}.{key[0]}", key[1:], target_json, build)


def compiled(make_prim_func: Callable, *params: Hashable):
    """The compiled kernel ``make_prim_func(*params)`` for this machine's CPU, built once
    per process for each distinct ``params`` (block shape, knobs, flags)."""
    from ...compiler.target import cpu_target

    if not _openmp_checked:
        _warn_if_openmp_spins()
    key = (make_prim_func.__qualname__,) + params
    return _compile(key, make_prim_func, cpu_target())


_openmp_checked = False


def _warn_if_openmp_spins() -> None:
    """Warn once per process when torch's OpenMP workers keep spinning after each op.

    Without OMP_WAIT_POLICY they spin for milliseconds on the cores TVM's pool needs for
    the next kernel. A forward of 2048 x 2048 at 30% took 6.4 ms after another kernel and
    14.5 ms right after a torch matmul; the MLP map's training step took 42-53 ms against
    29-31 ms with OMP_WAIT_POLICY=PASSIVE (the dense step ~200 ms under both). OpenMP
    reads the variable when torch loads, so it cannot be changed from here."""
    import os
    import warnings

    global _openmp_checked
    _openmp_checked = True
    if "OMP_WAIT_POLICY" not in os.environ and threads() > 1 and torch.get_num_threads() > 1:
        warnings.warn(
            "OMP_WAIT_POLICY is not set, so torch's OpenMP threads spin after every op on the cores that "
            "edgesparse's TVM kernels run on: a sparse training step ran up to 1.7x slower. Set "
            "OMP_WAIT_POLICY=PASSIVE in the environment before Python starts (the edgesparse train, bench, "
            "map and tune commands set it themselves), or OMP_WAIT_POLICY=ACTIVE to keep the spinning "
            "and silence this warning.", RuntimeWarning, stacklevel=3)


def kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """A contiguous, 64-byte-aligned tensor with t's data (t itself when it already is)."""
    if not t.is_contiguous() or t.data_ptr() % _ALIGNMENT:
        t = t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: aligned
    return t


def placeholder(dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a kernel argument that this build never reads."""
    t = _placeholders.get(dtype)
    if t is None:
        t = _placeholders[dtype] = torch.zeros(1, dtype=dtype)
    return t


_placeholders: dict = {}


def threads() -> int:
    """Threads TVM's pool runs kernels on (TVM_NUM_THREADS, else the CPUs we may use)."""
    import os

    from ...compiler.target import cpu_count

    return int(os.environ.get("TVM_NUM_THREADS", 0)) or cpu_count()


_derived = None


def cached_on(t: torch.Tensor, name: str, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``derive(t)``, recomputed only when t's storage or version (in-place writes) changed."""
    global _derived
    if _derived is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _derived = WeakTensorKeyDictionary()
    entries = _derived.setdefault(t, {})
    stamp = (t._version, t.data_ptr())
    hit = entries.get(name)
    if hit is None or hit[0] != stamp:
        hit = entries[name] = (stamp, derive(t))
    return hit[1]


def transposing_copy(lanes: int):
    """A TIR macro for the batch-vectorised kernels (``Schedule.vector == 'batch'``):
    ``copy(src, dst, src_cols, src_rows, dst_cols, first, last)`` writes dst's rows
    first..last-1 as dst[r, m] = src[m, r], zero where r or m lies outside src; each
    row of dst is stored a vector at a time, gathered from a column of src."""
    from tvm.script import tirx as T

    @T.macro
    def copy(src, dst, src_cols, src_rows, dst_cols, first, last):
        for r in T.serial(first, last):
            if r < src_cols:
                for m0 in T.serial(src_rows // lanes):
                    for lane in T.vectorized(lanes):
                        dst[r, m0 * lanes + lane] = src[m0 * lanes + lane, r]
                for m in T.serial(src_rows // lanes * lanes, dst_cols):
                    dst[r, m] = T.if_then_else(m < src_rows, src[T.min(m, src_rows - 1), r], T.float32(0))
            else:
                for m in T.serial(dst_cols):
                    dst[r, m] = T.float32(0)

    return copy


def rows_operand(gather: bool):
    """How a kernel reads its row operand ``inp[m, k]``, fixed when it is built: the
    buffer's shape from (M, width, flat length), and the element at (m, k).

    Plain: inp is the matrix [M, width]. Gathered (a convolution's implicit im2col):
    inp is the flat zero-padded image and element (m, k) of the unfolded rows lies at
    ``row_base[m] + col_off[k]`` (see ``bsr_conv2d.py``), so the rows are never built.
    """
    if gather:
        return (lambda m, width, flat: (flat,)), (lambda inp, row_base, col_off, m, k: inp[row_base[m] + col_off[k]])
    return (lambda m, width, flat: (m, width)), (lambda inp, row_base, col_off, m, k: inp[m, k])
