"""A block-sparse 2-D convolution as an implicit GEMM: the linear products on the rows
of im2col, without ever building those rows.

The weight [C_out, C, kh, kw] is the BSR matrix W [N, K] = weight.reshape(C_out, -1),
its columns k = (c, ky, kx). Row m = (b, oh, ow) of the unfolded input holds, at
column k, the element of the zero-padded image xp [B, C, Hp, Wp] at

    row_base[m] + col_off[k]     row_base[m] = b*sB + oh*sh*sH + ow*sw*sW
                                 col_off[k]  = c*sC + ky*dh*sH + kx*dw*sW

(sB, sC, sH, sW: xp's strides, so NCHW and channels-last images both work; columns
past K point at offset 0 and meet zero weights). Any stride, dilation, padding and
block shape.

- forward:      the block-row kernel reading x through the two tables (``gather``)
- grad-weight:  the block-column panels gathered through the tables, then the
                per-block kernel as for a linear layer
- grad-input:   dy @ W tile by tile, each tile added straight into a padded scratch
                image at the addresses the forward read (col2im fused in; one thread
                per image, see :func:`_make_grad_input`)

Why (bench/conv_paths.py; 3x3 s1 p1, batch 32, 90% of 32x32 blocks pruned, forward +
backward, ratios to torch's dense conv in the same run, medians): the im2col path (a
strided view of the padded input copied into rows [B*OH*OW, C*9], then sparse_linear,
col2im by the view's as_strided backward) spent as long in that copy and its backward as
in the three sparse products together. Figures: SparseConv2d's docstring.

Non-finite inputs: a padded column multiplies a real input element by a zero weight,
so an inf there may turn an output into NaN where the dense conv keeps inf.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from ...formats import BSR, pad_columns
from ._block_rows import make_accumulate
from ._runtime import compiled, kernel_arg, threads
from .bsr_linear import bsr_linear
from .bsr_linear_grad_weight import bsr_linear_grad_weight
from .schedule import Schedule, check_fits, check_transposable, heuristic_block_rows, tuned

Pair = Tuple[int, int]

__all__ = ["conv2d", "conv2d_grad_input", "conv2d_grad_weight", "output_size", "unfold_tables"]

_INT32_MAX = 2**31 - 1


def output_size(height: int, width: int, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """(OH, OW) of the convolution of an H x W image (what nn.Conv2d gives)."""
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip((height, width), kernel_size, stride, padding, dilation)
    )


def _padded_image(x: torch.Tensor, padding: Pair) -> torch.Tensor:
    """x [B, C, H, W] zero-padded, dense in memory (NCHW or channels-last, as x is)."""
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    if not (xp.is_contiguous() or xp.is_contiguous(memory_format=torch.channels_last)):
        xp = xp.contiguous()
    if xp.numel() > _INT32_MAX:
        raise ValueError(f"the padded input {tuple(xp.shape)} has more than 2^31 - 1 elements: the kernels index it with int32")
    return xp


def unfold_tables(
    x: torch.Tensor, columns: int, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat, row_base, col_off): the padded image as a flat tensor and the int32 tables
    that read its unfolded rows, ``rows[m, k] = flat[row_base[m] + col_off[k]]``, for
    ``columns`` >= C*kh*kw columns (those past C*kh*kw read offset 0)."""
    xp = _padded_image(x, padding)
    oh, ow = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    row_base, col_off = _tables(
        tuple(xp.shape[:2]), tuple(xp.stride()), (oh, ow), columns, tuple(kernel_size), tuple(stride), tuple(dilation)
    )
    return xp.as_strided((xp.numel(),), (1,)), row_base, col_off


@functools.lru_cache(maxsize=64)
def _tables(batch_channels, strides, out_size, columns, kernel_size, stride, dilation):
    """Built once per layer geometry and batch: a few small torch ops, but ~10 of them, run
    in forward and again in grad-weight."""
    (batch, channels), (s_b, s_c, s_h, s_w), (oh, ow) = batch_channels, strides, out_size
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ar = lambda n, step: torch.arange(n, dtype=torch.int64) * step  # noqa: E731
    row_base = (ar(batch, s_b)[:, None, None] + ar(oh, sh * s_h)[None, :, None] + ar(ow, sw * s_w)[None, None, :]).reshape(-1)
    col_off = torch.zeros(columns, dtype=torch.int64)
    col_off[: channels * kh * kw] = (
        ar(channels, s_c)[:, None, None] + ar(kh, dh * s_h)[None, :, None] + ar(kw, dw * s_w)[None, None, :]
    ).reshape(-1)
    return row_base.to(torch.int32), col_off.to(torch.int32)


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """[B, N, OH, OW] -> the matrix [B*OH*OW, N]: free when t is channels-last, as the
    gradient of our channels-last output usually is."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous()


def conv2d(
    x: torch.Tensor, W: BSR, bias: Optional[torch.Tensor], kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """y [B, N, OH, OW] of x [B, C, H, W] (float32, CPU), channels-last in memory: the
    kernel writes rows [B*OH*OW, N], which are that layout, so no transpose is paid."""
    batch, _, height, width = x.shape
    oh, ow = output_size(height, width, kernel_size, stride, padding, dilation)
    flat, row_base, col_off = unfold_tables(x, W.padded_shape[1], kernel_size, stride, padding, dilation)
    y = bsr_linear(flat, W, bias, gather=(row_base, col_off))
    n = W.shape[0]
    return y.reshape(batch, oh, ow, n).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def conv2d_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, W: BSR, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """Values [nnz_blocks, bn, bk] of dL/dW on W's pattern, from dy [B, N, OH, OW]."""
    flat, row_base, col_off = unfold_tables(x, W.shape[1], kernel_size, stride, padding, dilation)
    return bsr_linear_grad_weight(_rows_of(dy), flat, W, gather=(row_base, col_off))


def conv2d_grad_input(
    dy: torch.Tensor, W: BSR, x_shape: Sequence[int], kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    schedule: Optional[Schedule] = None, channels_last: bool = False,
) -> torch.Tensor:
    """dL/dx [B, C, H, W] from dy [B, N, OH, OW]: see :func:`_make_grad_input`. NCHW in
    memory, or channels-last with ``channels_last`` (pass x's layout: the gradient then
    meets x's own layout in the ops before the conv; ReLU's backward of a 32 x 64 x 32 x 32
    gradient took 4.6 ms with NCHW against a channels-last ReLU output, 0.23 ms with both
    alike)."""
    batch, channels, height, width = (int(d) for d in x_shape)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty(batch, channels, height, width, dtype=dy.dtype, memory_format=layout)
    if dx.numel() == 0:
        return dx
    if W.nnz_blocks == 0 or dy.numel() == 0:
        return dx.zero_()
    bn, bk = W.block
    rows = _rows_of(dy)
    # A schedule tuned on the linear grad-input applies, unless it vectorises along the batch,
    # which needs the rows transposed: this kernel scatters them into the image as it goes.
    sched = schedule
    if sched is None:
        sched = tuned("grad_input", W, rows.shape[0])
        if sched is None or sched.vector != "columns":
            sched = heuristic_block_rows(rows.shape[0], bk, bn, W.block_cols, threads(), transposable=False)
    check_transposable(sched, gathered=True)
    check_fits(sched, bk, bn, "output")
    (ph, pw), image = padding, (channels, height, width)
    padded = (height + 2 * ph, width + 2 * pw)
    out_size = output_size(height, width, kernel_size, stride, padding, dilation)
    # The scatter tables address one padded image (the kernel's scratch) in dx's layout:
    # [C, Hp, Wp], or [Hp, Wp, C] channels-last.
    plane = padded[0] * padded[1]
    strides = (plane * channels, 1, padded[1] * channels, channels) if channels_last else (plane * channels, plane, padded[1], 1)
    row_base, col_off = _tables(
        (1, channels), strides, out_size, W.padded_shape[1], tuple(kernel_size), tuple(stride), tuple(dilation),
    )
    geometry = tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
    fn = compiled(_make_grad_input, bk, bn, sched, image, geometry, channels_last)
    fn(
        kernel_arg(pad_columns(rows, W.padded_shape[0])), kernel_arg(W.values), kernel_arg(W.col_offsets),
        kernel_arg(W.col_order_rows), kernel_arg(W.col_order), row_base, col_off,
        dx.permute(0, 2, 3, 1) if channels_last else dx,  # [B, H, W, C]: a contiguous view of dx
    )
    return dx


def _make_grad_input(P: int, Q: int, sched: Schedule, image: Tuple[int, int, int], geometry, channels_last: bool):
    """dx = col2im(dy @ W) in one pass, the rows d = dy @ W never stored.

    A thread owns whole images, so no two threads add into the same pixel (no atomics).
    For each image it zeroes a padded scratch image [C, Hp, Wp] ([Hp, Wp, C] when dx is
    channels-last; in cache: 296 KiB at 64 x 32 x 32), walks its output pixels in tiles
    of ``rows``; for each of W's block columns that holds a block, the grad-input tile (dy's rows times the column's blocks,
    as in _block_rows.py) is added into the scratch at ``row_base[m] + col_off[k]``, the
    address im2col read it from; then it copies the scratch's interior out to dx.
    Block columns without a block cost nothing (layer 1 of the 90%-pruned ResNet-18
    keeps 22% of them). The scratch's size makes it one build per input geometry
    (C, H, W), not per block shape alone: six for the CIFAR ResNet-18, each built once
    and kept in the disk cache.

    Why fused (batch 32, 90% of 32x32 blocks pruned, 2 threads): writing d [B*OH*OW,
    C*9] and reading it back in a separate col2im took 107 ms at 64 ch 32x32 (d is 75 MB,
    freshly page-faulted each call) against 6 ms for the forward on the same blocks.
    """
    from tvm.script import tirx as T

    channels, height, width = image
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    hp, wp = height + 2 * ph, width + 2 * pw
    oh = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pixels, plane, MT, PT = oh * ow, hp * wp, sched.rows, sched.cols
    accumulate = make_accumulate(P, Q, sched, True, False, False)

    @T.macro
    def tile(dy, row_base, col_off, V, off, idx, ids, scratch, i, m_image, m_local, rows):
        for p0 in T.serial(P // PT):
            acc = T.alloc_buffer((rows, PT), "float32")
            # (no bias: built without one, the macro never reads that argument, here ids)
            accumulate(acc, dy, row_base, col_off, V, off, idx, ids, ids, i, p0, m_image + m_local, rows)
            for mt in T.unroll(rows):
                for p in T.unroll(PT):
                    scratch[row_base[m_local + mt] + col_off[i * P + p0 * PT + p]] = (
                        scratch[row_base[m_local + mt] + col_off[i * P + p0 * PT + p]] + acc[mt, p]
                    )

    @T.prim_func
    def grad_input(dy_h: T.handle, V_h: T.handle, off_h: T.handle, idx_h: T.handle, ids_h: T.handle,
                   row_base_h: T.handle, col_off_h: T.handle, dx_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, NP, NNZ, NOFF, KP, B = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        dy = T.match_buffer(dy_h, (M, NP), "float32")
        V = T.match_buffer(V_h, (NNZ, Q, P), "float32")
        off = T.match_buffer(off_h, (NOFF,), "int32")
        idx = T.match_buffer(idx_h, (NNZ,), "int32")
        ids = T.match_buffer(ids_h, (NNZ,), "int32")
        row_base = T.match_buffer(row_base_h, (pixels,), "int32")
        col_off = T.match_buffer(col_off_h, (KP,), "int32")
        dx = T.match_buffer(dx_h, (B, height, width, channels) if channels_last else (B, channels, height, width), "float32")
        for b in T.parallel(B):
            scratch = T.alloc_buffer((channels * plane,), "float32")
            for e in T.serial(channels * plane):
                scratch[e] = T.float32(0)
            for m0 in T.serial(pixels // MT):
                for i in T.serial(NOFF - 1):
                    if off[i + 1] > off[i]:
                        tile(dy, row_base, col_off, V, off, idx, ids, scratch, i, b * pixels, m0 * MT, MT)
            for m in T.serial(pixels % MT):
                for i in T.serial(NOFF - 1):
                    if off[i + 1] > off[i]:
                        tile(dy, row_base, col_off, V, off, idx, ids, scratch, i, b * pixels, pixels - pixels % MT + m, 1)
            if channels_last:
                for ih in T.serial(height):
                    for iw in T.serial(width):
                        for c in T.serial(channels):
                            dx[b, ih, iw, c] = scratch[((ih + ph) * wp + iw + pw) * channels + c]
            else:
                for c in T.serial(channels):
                    for ih in T.serial(height):
                        for iw in T.serial(width):
                            dx[b, c, ih, iw] = scratch[c * plane + (ih + ph) * wp + iw + pw]

    return grad_input
