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
- grad-input:   d(rows) = dy @ W by the grad-input kernel, then :func:`col2im` sums
                each pixel's contributions (a TVM kernel, one thread per image)

Why (bench/conv_paths.py; 3x3 s1 p1, batch 32, 90% of 32x32 blocks pruned, forward +
backward, ratios to torch's dense conv in the same run, medians): the im2col path (a
strided view of the padded input copied into rows [B*OH*OW, C*9], then sparse_linear,
col2im by the view's as_strided backward) spent as long in that copy and its backward as
in the three sparse products together. Figures: SparseConv2d's docstring.

col2im: a TVM kernel rather than torch's F.fold on the transposed rows: 10.5 against
36 ms at 256 ch 8x8, 6.6 against 15 ms at 512 ch 4x4 (one thread, same run).

Non-finite inputs: a padded column multiplies a real input element by a zero weight,
so an inf there may turn an output into NaN where the dense conv keeps inf.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from ...formats import BSR
from ._runtime import compiled, kernel_arg
from .bsr_linear import bsr_linear
from .bsr_linear_grad_input import grad_input_padded
from .bsr_linear_grad_weight import bsr_linear_grad_weight

Pair = Tuple[int, int]

__all__ = ["col2im", "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "output_size", "unfold_tables"]

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
    dy: torch.Tensor, W: BSR, x_shape: Sequence[int], kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """dL/dx [B, C, H, W] (NCHW) from dy [B, N, OH, OW]."""
    d_rows = grad_input_padded(_rows_of(dy), W)  # [B*OH*OW, Kp]
    return col2im(d_rows, x_shape, kernel_size, stride, padding, dilation)


def _make_col2im(kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair):
    from tvm.script import tirx as T

    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation

    @T.prim_func
    def col2im(d_h: T.handle, dx_h: T.handle):
        T.func_attr({"tir.noalias": True})
        M, KP, B, C, H, W = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        d = T.match_buffer(d_h, (M, KP), "float32")
        dx = T.match_buffer(dx_h, (B, C, H, W), "float32")
        OH = T.floordiv(H + 2 * ph - dh * (kh - 1) - 1, sh) + 1
        OW = T.floordiv(W + 2 * pw - dw * (kw - 1) - 1, sw) + 1
        # A thread owns whole images: no two threads add into the same pixel, so no
        # atomics. Each row of d is read once, front to back, while the image's gradient
        # (C*H*W floats, 64 KiB at 256 x 8 x 8) stays in cache for the scattered adds.
        # One thread per image channel instead, gathering its taps down d's columns at
        # a stride of C*9 floats, took 16-19 ms against 9.1 at 256 x 8 x 8 (one thread,
        # batch 32; equal at 512 x 4 x 4).
        for b in T.parallel(B):
            for c in T.serial(C):
                for ih in T.serial(H):
                    for iw in T.serial(W):
                        dx[b, c, ih, iw] = T.float32(0)
            for oh in T.serial(OH):
                for ow in T.serial(OW):
                    for c in T.serial(C):
                        for ky in T.unroll(kh):
                            for kx in T.unroll(kw):
                                if (
                                    0 <= oh * sh - ph + ky * dh < H and 0 <= ow * sw - pw + kx * dw < W
                                ):  # taps on the zero padding have nowhere to go
                                    dx[b, c, oh * sh - ph + ky * dh, ow * sw - pw + kx * dw] = (
                                        dx[b, c, oh * sh - ph + ky * dh, ow * sw - pw + kx * dw]
                                        + d[(b * OH + oh) * OW + ow, c * (kh * kw) + ky * kw + kx]
                                    )

    return col2im


def col2im(
    d_rows: torch.Tensor, x_shape: Sequence[int], kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """The adjoint of im2col: dx [B, C, H, W] with each pixel the sum of the entries of
    d_rows [B*OH*OW, >= C*kh*kw] that unfolding copied it to (padding taps dropped)."""
    dx = torch.empty(tuple(x_shape), dtype=d_rows.dtype)
    if dx.numel() == 0:
        return dx
    geometry = tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
    compiled(_make_col2im, *geometry)(kernel_arg(d_rows), dx)
    return dx


