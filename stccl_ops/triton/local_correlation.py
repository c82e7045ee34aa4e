"""Triton kernels of the local correlation, forward and backward, and their
registration as torch.library triton ops (traceable by torch.compile).

Tiling: a program handles a TILE_H x TILE_W tile of one image's pixels and
walks the channels in blocks of BLOCK_C, accumulating in float32 (float64 for
float64 inputs).
- forward: one program per (tile, group of BLOCK_K offsets, image); all K*K
  offsets in one group up to K = 7. Per channel block it loads the a tile
  once and the b tile with its halo once (one load of BLOCK_C x BLOCK_K x
  tile addresses), and keeps the BLOCK_K x tile sums in registers; the
  inverse norms come from sums of squares of the same loads.
- backward: one program per (tile, channel block, image). It walks the K*K
  offsets in groups, computes each neighbour's weight from grad_out, the
  saved output and the norms (the formulas of the C++ kernels; the norms from
  a tiny pre-pass, one float per pixel), and gathers weight x neighbour into
  its own gradient tile, each group's neighbours one load: no atomics,
  deterministic.
The loads' requested bytes are counted under the interpreter
(stccl_ops.triton.traffic, benchmarks/memory_traffic.py).
Operands are read in place through their strides (4-D maps or 5-D clip views);
offsets are computed in 64 bits.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from typing import Optional

from .._checks import (check_frame_stride, check_pair, check_tensor, check_volume,
                       check_window)
from .._registrations import volume_shape

MODE_A, MODE_B, MODE_SELF = 0, 1, 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# The forward's pixel tiles (TILE_H x TILE_W), default first. A program takes
# BLOCK_K offsets (all K*K up to 64; larger windows in groups of 64) and keeps
# BLOCK_K x tile sums in registers: at most ACCUMULATORS of them (more spill
# on sm_80/sm_90 at 8 warps, and 16 warps cap a thread at 128 registers).
# BLOCK_C, the channels per step, fills B_ELEMENTS values of b (BLOCK_C x
# BLOCK_K x tile) loaded at once.
TILES = [(8, 16), (16, 16), (4, 32), (8, 8)]
ACCUMULATORS, B_ELEMENTS = 4096, 8192
MAX_BLOCK_K = 64
# The backward's: 8 x 8 pixels, 16 channels, offsets in groups of 8 (at least
# 2). Each group's grad_out, out and norms are loaded once per channel block,
# so wide channel blocks read them fewer times; of the tiles and groups
# counted this requested the fewest bytes (docs/triton_kernels.md), and the
# others compiled with a stack frame for some dtype or mode.
BACKWARD_TILE, BACKWARD_BLOCK_C, BACKWARD_BLOCK_K = (8, 8), 16, 8


def forward_configs(kernel_size: int, offsets: int = 0, max_block_k: int = MAX_BLOCK_K,
                    accumulators: int = ACCUMULATORS) -> list:
    """offsets: the offsets a program may take, when not the window's K*K."""
    block = min(max_block_k, triton.next_power_of_2(offsets or kernel_size * kernel_size))
    return [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_K": block,
                           "BLOCK_C": max(1, B_ELEMENTS // (block * th * tw))}, num_warps=8)
            for th, tw in TILES if block * th * tw <= accumulators]


# The spatiotemporal forward keeps each lane's window next to its sums: in
# float64, 64 offsets a program or 4096 sums took every register and a stack
# frame (BLOCK_K, accumulators).
CLIP_LIMITS = {torch.float64: (32, 2048)}


def clip_forward_configs(offsets: int, dtype: torch.dtype) -> list:
    """The spatiotemporal forward's, for `offsets` spatial and temporal offsets."""
    return forward_configs(1, offsets, *CLIP_LIMITS.get(dtype, (MAX_BLOCK_K, ACCUMULATORS)))


def backward_configs(kernel_size: int) -> list:
    """kernel_size: of the largest window the program walks."""
    block = max(2, min(BACKWARD_BLOCK_K, triton.next_power_of_2(kernel_size * kernel_size)))
    th, tw = BACKWARD_TILE
    return [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_K": block,
                           "BLOCK_C": BACKWARD_BLOCK_C}, num_warps=8)]


@triton.jit
def _image_offset(n, inner, outer, batch):
    # n (a program id) and inner are image counts: 32-bit division (a 64-bit
    # one is a function call on GPUs), 64-bit offsets.
    i = tl.cast(inner, tl.int32)  # (an argument equal to 1 arrives as a Python int)
    return (n // i).to(tl.int64) * outer + (n % i).to(tl.int64) * batch


@triton.jit
def _tile(pid_t, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(y, x, inside) of the TILE_H x TILE_W pixels of tile pid_t (tiles
    numbered row-major over the image)."""
    tiles_w = tl.cdiv(W, TILE_W)
    i = tl.arange(0, TILE_H * TILE_W)
    y = (pid_t // tiles_w) * TILE_H + i // TILE_W
    x = (pid_t % tiles_w) * TILE_W + i % TILE_W
    return y, x, (y < H) & (x < W)


@triton.jit
def _neighbours(y, x, p_ok, k, k_ok, K, dilation, H, W):
    """(yq, xq, inside), [offsets, pixels]: pixel p's neighbour at offset k,
    inside when p and k are and the neighbour lies in the image."""
    yq = y[None, :] + (k // K - K // 2)[:, None] * dilation
    xq = x[None, :] + (k % K - K // 2)[:, None] * dilation
    return yq, xq, k_ok[:, None] & p_ok[None, :] & (yq >= 0) & (yq < H) & (xq >= 0) & (xq < W)


@triton.jit
def _inverse_norm_kernel(x_ptr, inv_ptr, pass_ptr, C, H, W, inner, outer, batch, sc, sy, sx,
                         eps_ptr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC: tl.constexpr):
    # eps comes from memory in ACC: a Python float argument would be fp32.
    eps = tl.load(eps_ptr)
    pid, n = tl.program_id(0), tl.program_id(1)
    hw = H * W
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < hw
    y, x = p // W, p % W
    off = _image_offset(n, inner, outer, batch) + y.to(tl.int64) * sy + x.to(tl.int64) * sx
    total = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(x_ptr + off[None, :] + c[:, None].to(tl.int64) * sc,
                    mask=(c < C)[:, None] & p_ok[None, :], other=0.0).to(ACC)
        total += tl.sum(v * v, axis=0)
    norm = tl.sqrt(total)
    dst = n.to(tl.int64) * hw + p
    tl.store(inv_ptr + dst, 1.0 / tl.maximum(norm, eps), mask=p_ok)
    tl.store(pass_ptr + dst, (norm >= eps).to(ACC), mask=p_ok)


@triton.jit
def _correlate_tile(a_ptr, b_ptr, a_off, b_off, a_sc, b_sc, p_ok, q_ok, C, eps_ptr,
                    NORMALIZE: tl.constexpr, PIXELS: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_K, PIXELS] correlations of a tile's pixels (a_off) with their
    neighbours (b_off; q_ok: inside), 0 outside: per channel block the a tile
    is one load and the neighbours of all BLOCK_K offsets another. The norms
    come from sums of squares of the same loads: twice the multiply-adds of
    the products for b, but no pre-pass reading both inputs again (which,
    counted, put K = 7 and 9 at 3.0x the floor bytes instead of 2.2x and
    2.5x)."""
    acc = tl.zeros([BLOCK_K, PIXELS], dtype=ACC)
    sq_a = tl.zeros([PIXELS], dtype=ACC)
    sq_b = tl.zeros([BLOCK_K, PIXELS], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        c_ok = c < C
        av = tl.load(a_ptr + a_off[None, :] + c[:, None] * a_sc,
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        bv = tl.load(b_ptr + b_off[None, :, :] + c[:, None, None] * b_sc,
                     mask=c_ok[:, None, None] & q_ok[None, :, :], other=0.0).to(ACC)
        acc += tl.sum(av[:, None, :] * bv, axis=0)
        if NORMALIZE:
            sq_a += tl.sum(av * av, axis=0)
            sq_b += tl.sum(bv * bv, axis=0)
    if NORMALIZE:
        eps = tl.load(eps_ptr)
        acc = acc / tl.maximum(tl.sqrt(sq_a), eps)[None, :] / tl.maximum(tl.sqrt(sq_b), eps)
    return tl.where(q_ok, acc, 0.0)


@triton.jit
def _local_correlation_fwd_kernel(
        a_ptr, b_ptr, out_ptr, eps_ptr, C, H, W, K, dilation, offsets,
        a_inner, a_outer, a_batch, a_sc, a_sy, a_sx,
        b_inner, b_outer, b_batch, b_sc, b_sy, b_sx,
        NORMALIZE: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """out[n, k, p] for a TILE_H x TILE_W tile of pixels p and BLOCK_K
    consecutive offsets k < `offsets` (K*K; a self-correlation's up to the
    centre, K*K // 2 + 1, the rest mirrored afterwards), the BLOCK_K x tile
    sums in registers (_correlate_tile)."""
    pid_t, pid_k, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hw = H * W
    kk = K * K
    y, x, p_ok = _tile(pid_t, H, W, TILE_H, TILE_W)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < offsets
    yq, xq, q_ok = _neighbours(y, x, p_ok, k, k_ok, K, dilation, H, W)
    a_off = (_image_offset(n, a_inner, a_outer, a_batch) + y.to(tl.int64) * a_sy
             + x.to(tl.int64) * a_sx)
    b_off = (_image_offset(n, b_inner, b_outer, b_batch) + yq.to(tl.int64) * b_sy
             + xq.to(tl.int64) * b_sx)
    acc = _correlate_tile(a_ptr, b_ptr, a_off, b_off, a_sc, b_sc, p_ok, q_ok, C, eps_ptr,
                          NORMALIZE, TILE_H * TILE_W, BLOCK_K, BLOCK_C, ACC)
    dst = (n.to(tl.int64) * kk + k[:, None]) * hw + (y * W + x)[None, :]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & p_ok[None, :])


@triton.jit
def _mirror_kernel(out_ptr, H, W, K, dilation, BLOCK_P: tl.constexpr):
    """A self-correlation's offsets past the centre from those up to it:
    out[n, k, p] = out[n, mirror(k), p + d_k] (0 where p + d_k is outside)."""
    pid, j, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hw = H * W
    kk = K * K
    k = kk // 2 + 1 + j
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    y, x = p // W, p % W
    yq = y + (k // K - K // 2) * dilation
    xq = x + (k % K - K // 2) * dilation
    q_ok = (p < hw) & (yq >= 0) & (yq < H) & (xq >= 0) & (xq < W)
    image = n.to(tl.int64) * kk * hw
    value = tl.load(out_ptr + image + (kk - 1 - k).to(tl.int64) * hw + yq * W + xq, mask=q_ok,
                    other=0.0)
    tl.store(out_ptr + image + k.to(tl.int64) * hw + p, value, mask=p < hw)


@triton.jit
def _gather_window(total, csum, grad_out_ptr, out_ptr, other_ptr, inv_other_ptr, g_img, o_img,
                   x_img, other_base, g_sc, g_sy, g_sx, o_sc, o_sy, o_sx, x_sc, x_sy, x_sx,
                   y, x, p_ok, c, c_ok, K, dilation, H, W, MODE: tl.constexpr,
                   NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """One term of a gradient tile: total += sum_k w[k, p] other[c, p + d_k] and
    csum += sum_k G[p, k] out[p, k], the offsets in groups of BLOCK_K, each
    group's neighbours of the tile one load (the other operand's tile with its
    halo). MODE_A: w = g[p, k] r_q; MODE_B: w = g[q, mirror(k)] r_q (the
    output at q whose mirrored offset points back at p); MODE_SELF: w =
    (g[p, k] + g[q, mirror(k)]) r_q. The inverse norms of the other operand
    are at inv_other_ptr + other_base + pixel."""
    kk = K * K
    y64, x64 = y.to(tl.int64), x.to(tl.int64)
    for k0 in range(0, kk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        yq, xq, q_ok = _neighbours(y, x, p_ok, k, k < kk, K, dilation, H, W)
        yq64, xq64 = yq.to(tl.int64), xq.to(tl.int64)
        mirror = (kk - 1 - k).to(tl.int64)[:, None]
        if MODE == 1:
            g_at = g_img + mirror * g_sc + yq64 * g_sy + xq64 * g_sx
            o_at = o_img + mirror * o_sc + yq64 * o_sy + xq64 * o_sx
        else:
            g_at = g_img + k.to(tl.int64)[:, None] * g_sc + (y64 * g_sy + x64 * g_sx)[None, :]
            o_at = o_img + k.to(tl.int64)[:, None] * o_sc + (y64 * o_sy + x64 * o_sx)[None, :]
        gv = tl.load(grad_out_ptr + g_at, mask=q_ok, other=0.0).to(ACC)
        if MODE == 2:
            g_mirror = g_img + mirror * g_sc + yq64 * g_sy + xq64 * g_sx
            gv += tl.load(grad_out_ptr + g_mirror, mask=q_ok, other=0.0).to(ACC)
        csum += tl.sum(gv * tl.load(out_ptr + o_at, mask=q_ok, other=0.0).to(ACC), axis=0)
        w = gv
        if NORMALIZE:
            w = gv * tl.load(inv_other_ptr + other_base + yq * W + xq, mask=q_ok, other=0.0)
        # Offsets leading: a reduction over the last axes took a stack frame.
        xv = tl.load(other_ptr + x_img + (yq64 * x_sy + xq64 * x_sx)[:, None, :]
                     + c[None, :, None] * x_sc,
                     mask=q_ok[:, None, :] & c_ok[None, :, None], other=0.0).to(ACC)
        total += tl.sum(w[:, None, :] * xv, axis=0)
    return total, csum


@triton.jit
def _finish_gradient(total, csum, own_ptr, inv_own_ptr, pass_own_ptr, grad_ptr, own_img, own_base,
                     y_sc, y_sy, y_sx, n, C, H, W, y, x, p_ok, c, c_ok, NORMALIZE: tl.constexpr,
                     ACC: tl.constexpr):
    """grad[n, c, p] = scale_p * total - shift_p own[c, p] (scale = r_p,
    shift = pass_p r_p^2 csum; raw mode: the total)."""
    hw = H * W
    tile_ok = c_ok[:, None] & p_ok[None, :]
    if NORMALIZE:
        inv = tl.load(inv_own_ptr + own_base + y * W + x, mask=p_ok, other=0.0)
        shift = (tl.load(pass_own_ptr + own_base + y * W + x, mask=p_ok, other=0.0)
                 * inv * inv * csum)
        own_at = own_img + c[:, None] * y_sc + (y.to(tl.int64) * y_sy
                                                 + x.to(tl.int64) * y_sx)[None, :]
        own = tl.load(own_ptr + own_at, mask=tile_ok, other=0.0).to(ACC)
        total = inv[None, :] * total - shift[None, :] * own
    dst = (n.to(tl.int64) * C + c[:, None]) * hw + (y * W + x)[None, :]
    tl.store(grad_ptr + dst, total.to(grad_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _local_correlation_bwd_kernel(
        grad_out_ptr, out_ptr, other_ptr, own_ptr, inv_own_ptr, pass_own_ptr, inv_other_ptr,
        grad_ptr, C, H, W, K, dilation,
        g_inner, g_outer, g_batch, g_sc, g_sy, g_sx,
        o_inner, o_outer, o_batch, o_sc, o_sy, o_sx,
        x_inner, x_outer, x_batch, x_sc, x_sy, x_sx,
        y_inner, y_outer, y_batch, y_sc, y_sy, y_sx,
        MODE: tl.constexpr, NORMALIZE: tl.constexpr, TILE_H: tl.constexpr,
        TILE_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr):
    """grad[c, p] = scale_p * sum_k w[k, p] other[c, p + d_k] - shift_p own[c, p]
    (see _gather_window) for a TILE_H x TILE_W tile of pixels and BLOCK_C
    channels of one image."""
    pid_t, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    y, x, p_ok = _tile(pid_t, H, W, TILE_H, TILE_W)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    base = n.to(tl.int64) * H * W
    total = tl.zeros([BLOCK_C, TILE_H * TILE_W], dtype=ACC)
    csum = tl.zeros([TILE_H * TILE_W], dtype=ACC)
    total, csum = _gather_window(
        total, csum, grad_out_ptr, out_ptr, other_ptr, inv_other_ptr,
        _image_offset(n, g_inner, g_outer, g_batch), _image_offset(n, o_inner, o_outer, o_batch),
        _image_offset(n, x_inner, x_outer, x_batch), base, g_sc, g_sy, g_sx, o_sc, o_sy, o_sx,
        x_sc, x_sy, x_sx, y, x, p_ok, c, c_ok, K, dilation, H, W, MODE, NORMALIZE, BLOCK_K, ACC)
    _finish_gradient(total, csum, own_ptr, inv_own_ptr, pass_own_ptr, grad_ptr,
                     _image_offset(n, y_inner, y_outer, y_batch), base, y_sc, y_sy, y_sx, n, C,
                     H, W, y, x, p_ok, c, c_ok, NORMALIZE, ACC)


@triton.jit
def _spatiotemporal_fwd_kernel(
        v_ptr, spatial_ptr, temporal_ptr, eps_ptr, C, H, W, T, S, K, dilation, Kt, dilation_t,
        inv_K, inv_Kt, offsets, v_inner, v_outer, v_batch, v_sc, v_sy, v_sx,
        NORMALIZE: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Both volumes of frame n of a clip: the spatial offsets up to the centre
    (`offsets` of them, the rest mirrored afterwards) against the frame itself
    and the Kt*Kt temporal offsets against frame n + S, numbered one after the
    other; a program takes BLOCK_K of them, so one load per channel block
    gathers the neighbours of both windows, and the frame's tile (its `a`) is
    read once for both volumes."""
    pid_t, pid_k, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hw = H * W
    t = n % T
    y, x, p_ok = _tile(pid_t, H, W, TILE_H, TILE_W)
    j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    spatial = j < offsets
    kt = j - offsets
    j_ok = spatial | ((kt < Kt * Kt) & (t + S < T))
    # Each lane's offset: of the spatial window in frame n, or of the temporal
    # one in frame n + S.
    # The window row of offset k is floor((k + 0.5) / K), taken as a product
    # with 1 / K: exact for K <= 255 (k + 0.5 lies at least 0.5 / K from a
    # multiple of K), and no division (divisions by both window sizes took a
    # call and a stack frame).
    k = tl.where(spatial, j, kt)
    KW = tl.where(spatial, K, Kt)
    row = ((k.to(tl.float32) + 0.5) * tl.where(spatial, inv_K, inv_Kt)).to(tl.int32)
    DW = tl.where(spatial, dilation, dilation_t)
    dy = (row - KW // 2) * DW
    dx = (k - row * KW - KW // 2) * DW
    yq = y[None, :] + dy[:, None]
    xq = x[None, :] + dx[:, None]
    q_ok = j_ok[:, None] & p_ok[None, :] & (yq >= 0) & (yq < H) & (xq >= 0) & (xq < W)
    own_img = _image_offset(n, v_inner, v_outer, v_batch)
    next_img = _image_offset(n + S, v_inner, v_outer, v_batch)
    a_off = own_img + y.to(tl.int64) * v_sy + x.to(tl.int64) * v_sx
    b_off = (tl.where(spatial, own_img, next_img)[:, None] + yq.to(tl.int64) * v_sy
             + xq.to(tl.int64) * v_sx)
    acc = _correlate_tile(v_ptr, v_ptr, a_off, b_off, v_sc, v_sc, p_ok, q_ok, C, eps_ptr,
                          NORMALIZE, TILE_H * TILE_W, BLOCK_K, BLOCK_C, ACC)
    p = (y * W + x)[None, :]
    tl.store(spatial_ptr + (n.to(tl.int64) * (K * K) + j[:, None]) * hw + p,
             acc.to(spatial_ptr.dtype.element_ty), mask=spatial[:, None] & p_ok[None, :])
    pair = (n // T) * (T - S) + t
    tl.store(temporal_ptr + (pair.to(tl.int64) * (Kt * Kt) + kt[:, None]) * hw + p,
             acc.to(temporal_ptr.dtype.element_ty),
             mask=(j_ok & ~spatial)[:, None] & p_ok[None, :])


@triton.jit
def _spatiotemporal_bwd_kernel(
        gs_ptr, sp_ptr, gt_ptr, tp_ptr, v_ptr, inv_ptr, pass_ptr, grad_ptr,
        C, H, W, T, S, K, dilation, Kt, dilation_t,
        gs_inner, gs_outer, gs_batch, gs_sc, gs_sy, gs_sx,
        sp_inner, sp_outer, sp_batch, sp_sc, sp_sy, sp_sx,
        gt_inner, gt_outer, gt_batch, gt_sc, gt_sy, gt_sx,
        tp_inner, tp_outer, tp_batch, tp_sc, tp_sy, tp_sx,
        v_inner, v_outer, v_batch, v_sc, v_sy, v_sx,
        SPATIAL: tl.constexpr, TEMPORAL: tl.constexpr, NORMALIZE: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The clip gradient of both volumes at frame n, one pass: frame n is both
    operands of its spatial volume (MODE_SELF), the a of pair t against frame
    n + S (MODE_A) and the b of pair t - S (MODE_B); the terms share the scale
    (its inverse norm) and their sums and shifts add up before one store."""
    pid_t, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hw = H * W
    t = n % T
    y, x, p_ok = _tile(pid_t, H, W, TILE_H, TILE_W)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    own_img = _image_offset(n, v_inner, v_outer, v_batch)
    own_base = n.to(tl.int64) * hw
    total = tl.zeros([BLOCK_C, TILE_H * TILE_W], dtype=ACC)
    csum = tl.zeros([TILE_H * TILE_W], dtype=ACC)
    if SPATIAL:
        total, csum = _gather_window(
            total, csum, gs_ptr, sp_ptr, v_ptr, inv_ptr,
            _image_offset(n, gs_inner, gs_outer, gs_batch),
            _image_offset(n, sp_inner, sp_outer, sp_batch), own_img, own_base,
            gs_sc, gs_sy, gs_sx, sp_sc, sp_sy, sp_sx, v_sc, v_sy, v_sx, y, x, p_ok, c, c_ok, K,
            dilation, H, W, 2, NORMALIZE, BLOCK_K, ACC)
    if TEMPORAL:
        pair = (n // T) * (T - S) + t
        if t + S < T:
            total, csum = _gather_window(
                total, csum, gt_ptr, tp_ptr, v_ptr, inv_ptr,
                _image_offset(pair, gt_inner, gt_outer, gt_batch),
                _image_offset(pair, tp_inner, tp_outer, tp_batch),
                _image_offset(n + S, v_inner, v_outer, v_batch), own_base + S * hw,
                gt_sc, gt_sy, gt_sx, tp_sc, tp_sy, tp_sx, v_sc, v_sy, v_sx, y, x, p_ok, c, c_ok,
                Kt, dilation_t, H, W, 0, NORMALIZE, BLOCK_K, ACC)
        if t >= S:
            total, csum = _gather_window(
                total, csum, gt_ptr, tp_ptr, v_ptr, inv_ptr,
                _image_offset(pair - S, gt_inner, gt_outer, gt_batch),
                _image_offset(pair - S, tp_inner, tp_outer, tp_batch),
                _image_offset(n - S, v_inner, v_outer, v_batch), own_base - S * hw,
                gt_sc, gt_sy, gt_sx, tp_sc, tp_sy, tp_sx, v_sc, v_sy, v_sx, y, x, p_ok, c, c_ok,
                Kt, dilation_t, H, W, 1, NORMALIZE, BLOCK_K, ACC)
    _finish_gradient(total, csum, v_ptr, inv_ptr, pass_ptr, grad_ptr, own_img, own_base,
                     v_sc, v_sy, v_sx, n, C, H, W, y, x, p_ok, c, c_ok, NORMALIZE, ACC)


def autotune_enabled():
    """Autotuning picks a configuration per shape on first use; the summation
    order (BLOCK_C) then depends on that choice, so STCCL_TRITON_AUTOTUNE=0
    fixes the first configuration for results reproducible across processes.
    The interpreter never autotunes."""
    return (os.environ.get("STCCL_TRITON_AUTOTUNE", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1")


_TUNED = {}


def _kernel(fn, configs):
    """(kernel, launch kwargs): autotuned over `configs` keyed on the shape, or
    fn with the first (default) configuration."""
    if not autotune_enabled():
        default = configs[0]
        return fn, dict(default.kwargs, num_warps=default.num_warps)
    key = (fn, tuple(str(c) for c in configs))
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=configs, key=["C", "H", "W", "K"])(fn)
    return _TUNED[key], {}


def acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def strides6(t):
    """(inner, outer, batch, c, y, x) strides of a 4-D map or a 5-D clip view."""
    s = t.stride()
    if t.dim() == 5:
        return (max(t.shape[1], 1), s[0], s[1], s[2], s[3], s[4])
    return (1, s[0], 0, s[1], s[2], s[3])


def dims(t):
    n = t.shape[0] * t.shape[1] if t.dim() == 5 else t.shape[0]
    return n, t.shape[-3], t.shape[-2], t.shape[-1]


def inverse_norms(t, eps):
    """(inv, pass): 1 / max(||t[n, :, p]||, eps) and ||t|| >= eps, per pixel."""
    N, C, H, W = dims(t)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    inv = torch.empty(N, H, W, dtype=acc, device=t.device)
    passes = torch.empty_like(inv)
    eps_acc = torch.full((1,), eps, dtype=acc, device=t.device)
    grid = (triton.cdiv(H * W, 128), N)
    wrap_triton(_inverse_norm_kernel)[grid](
        t, inv, passes, C, H, W, *strides6(t), eps_acc, BLOCK_P=128, BLOCK_C=16,
        ACC=acc_dtype(t.dtype))
    return inv, passes


def _check_device(op, name, t):
    if t.device.type in ("cuda", "meta") or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"stccl_ops.{op}: the Triton kernels run on cuda tensors (on CPU tensors "
                     f"only under TRITON_INTERPRET=1), got {name} on {t.device}")


def _check_args(op, window, operands, volumes=()):
    """The checks of the C++ entry points, for callers of torch.ops.stccl_ops.triton_*:
    operands (name, tensor) of one shape, dtype and device; volumes (name,
    tensor) of the correlation's shape (..., K*K, H, W)."""
    (first_name, first), *others = operands
    for name, t in (*operands, *volumes):
        check_tensor(op, name, t, (4, 5))
        _check_device(op, name, t)
    for name, t in others:
        check_pair(op, first, t, first_name, name)
    check_window(op, *window)
    for name, t in volumes:
        check_volume(op, name, t, first, window[0])


def _forward(a, b, kernel_size, dilation, normalize, eps, self_correlation=False):
    out = a.new_empty(volume_shape(a.shape, kernel_size))
    N, C, H, W = dims(a)
    if out.numel() == 0:
        return out
    kk = kernel_size ** 2
    offsets = kk // 2 + 1 if self_correlation else kk
    eps_acc = torch.full((1,), eps, dtype=torch.float64 if a.dtype == torch.float64
                         else torch.float32, device=a.device)
    kernel, launch = _kernel(_local_correlation_fwd_kernel, forward_configs(kernel_size))
    grid = lambda meta: (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]),  # noqa: E731
                         triton.cdiv(offsets, meta["BLOCK_K"]), N)
    wrap_triton(kernel)[grid](
        a, b, out, eps_acc, C, H, W, kernel_size, dilation, offsets, *strides6(a), *strides6(b),
        NORMALIZE=normalize, ACC=acc_dtype(a.dtype), **launch)
    if self_correlation and kk > 1:
        wrap_triton(_mirror_kernel)[(triton.cdiv(H * W, 256), kk - offsets, N)](
            out, H, W, kernel_size, dilation, BLOCK_P=256)
    return out


@triton_op("stccl_ops::triton_local_correlation", mutates_args=())
def triton_local_correlation(a: torch.Tensor, b: torch.Tensor, kernel_size: int, dilation: int,
                             normalize: bool, eps: float) -> torch.Tensor:
    _check_args("triton_local_correlation", (kernel_size, dilation, normalize, eps),
                [("a", a), ("b", b)])
    return _forward(a, b, kernel_size, dilation, normalize, eps)


def _gradient(grad_out, out, other, own, norms_own, inv_other, mode, kernel_size, dilation,
              normalize):
    grad = torch.empty(own.shape, dtype=own.dtype, device=own.device)
    N, C, H, W = dims(own)
    if grad.numel() == 0:
        return grad
    inv_own, pass_own = norms_own if normalize else (grad, grad)
    kernel, launch = _kernel(_local_correlation_bwd_kernel, backward_configs(kernel_size))
    grid = lambda meta: (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]),  # noqa: E731
                         triton.cdiv(C, meta["BLOCK_C"]), N)
    wrap_triton(kernel)[grid](
        grad_out, out, other, own, inv_own, pass_own, inv_other if normalize else grad, grad,
        C, H, W, kernel_size, dilation, *strides6(grad_out), *strides6(out), *strides6(other),
        *strides6(own), MODE=mode, NORMALIZE=normalize, ACC=acc_dtype(own.dtype), **launch)
    return grad


@triton_op("stccl_ops::triton_local_correlation_backward", mutates_args=())
def triton_local_correlation_backward(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                      out: torch.Tensor, kernel_size: int, dilation: int,
                                      normalize: bool, eps: float, need_grad_a: bool,
                                      need_grad_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args("triton_local_correlation_backward", (kernel_size, dilation, normalize, eps),
                [("a", a), ("b", b)], [("grad_out", grad_out), ("out", out)])
    norms_a = inverse_norms(a, eps) if normalize else None
    norms_b = inverse_norms(b, eps) if normalize else None
    inv_a = norms_a[0] if normalize else None
    inv_b = norms_b[0] if normalize else None
    window = (kernel_size, dilation, normalize)
    # Both results are tensors (the schema has no optional returns): an
    # unneeded gradient is an empty tensor, mapped to None by the autograd glue.
    grad_a = (_gradient(grad_out, out, b, a, norms_a, inv_b, MODE_A, *window) if need_grad_a
              else a.new_empty(0))
    grad_b = (_gradient(grad_out, out, a, b, norms_b, inv_a, MODE_B, *window) if need_grad_b
              else b.new_empty(0))
    return grad_a, grad_b


@triton_op("stccl_ops::triton_self_correlation", mutates_args=())
def triton_self_correlation(x: torch.Tensor, kernel_size: int, dilation: int, normalize: bool,
                            eps: float) -> torch.Tensor:
    _check_args("triton_self_correlation", (kernel_size, dilation, normalize, eps), [("x", x)])
    return _forward(x, x, kernel_size, dilation, normalize, eps, self_correlation=True)


@triton_op("stccl_ops::triton_self_correlation_backward", mutates_args=())
def triton_self_correlation_backward(grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                                     kernel_size: int, dilation: int, normalize: bool,
                                     eps: float) -> torch.Tensor:
    _check_args("triton_self_correlation_backward", (kernel_size, dilation, normalize, eps),
                [("x", x)], [("grad_out", grad_out), ("out", out)])
    norms = inverse_norms(x, eps) if normalize else None
    return _gradient(grad_out, out, x, x, norms, norms[0] if normalize else None, MODE_SELF,
                     kernel_size, dilation, normalize)


def _check_clip_args(op, v, windows, frame_stride, volumes=()):
    """The checks of the C++ spatiotemporal entry points: a clip, two windows
    (spatial, temporal), the frame stride and the volumes (name, tensor,
    operand, kernel_size) of their shapes."""
    check_tensor(op, "v", v, (5,))
    _check_device(op, "v", v)
    spatial, temporal = windows
    check_window(op, *spatial)
    check_window(op, *temporal, prefix="temporal_")
    check_frame_stride(op, frame_stride, v.shape[1])
    for name, t, operand, kernel_size in volumes:
        check_tensor(op, name, t, (5,))
        check_volume(op, name, t, operand, kernel_size)


@triton_op("stccl_ops::triton_spatiotemporal_correlation", mutates_args=())
def triton_spatiotemporal_correlation(v: torch.Tensor, kernel_size: int, dilation: int,
                                      temporal_kernel_size: int, temporal_dilation: int,
                                      frame_stride: int, normalize: bool,
                                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_clip_args("triton_spatiotemporal_correlation",
                     v, ((kernel_size, dilation, normalize, eps),
                         (temporal_kernel_size, temporal_dilation, normalize, eps)), frame_stride)
    B, T, C, H, W = v.shape
    spatial = v.new_empty(B, T, kernel_size ** 2, H, W)
    temporal = v.new_empty(B, T - frame_stride, temporal_kernel_size ** 2, H, W)
    if spatial.numel() == 0:
        return spatial, temporal
    offsets = kernel_size ** 2 // 2 + 1
    eps_acc = torch.full((1,), eps, dtype=torch.float64 if v.dtype == torch.float64
                         else torch.float32, device=v.device)
    kernel, launch = _kernel(_spatiotemporal_fwd_kernel,
                             clip_forward_configs(offsets + temporal_kernel_size ** 2, v.dtype))
    grid = lambda meta: (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]),  # noqa: E731
                         triton.cdiv(offsets + temporal_kernel_size ** 2, meta["BLOCK_K"]), B * T)
    wrap_triton(kernel)[grid](
        v, spatial, temporal, eps_acc, C, H, W, T, frame_stride, kernel_size, dilation,
        temporal_kernel_size, temporal_dilation, 1.0 / kernel_size, 1.0 / temporal_kernel_size,
        offsets, *strides6(v), NORMALIZE=normalize,
        ACC=acc_dtype(v.dtype), **launch)
    if kernel_size > 1:
        wrap_triton(_mirror_kernel)[(triton.cdiv(H * W, 256), kernel_size ** 2 - offsets, B * T)](
            spatial, H, W, kernel_size, dilation, BLOCK_P=256)
    return spatial, temporal


@triton_op("stccl_ops::triton_spatiotemporal_correlation_backward", mutates_args=())
def triton_spatiotemporal_correlation_backward(
        grad_spatial: Optional[torch.Tensor], grad_temporal: Optional[torch.Tensor],
        v: torch.Tensor, spatial: torch.Tensor, temporal: torch.Tensor, kernel_size: int,
        dilation: int, temporal_kernel_size: int, temporal_dilation: int, frame_stride: int,
        normalize: bool, eps: float) -> torch.Tensor:
    pairs = v[:, frame_stride:]
    volumes = [("spatial", spatial, v, kernel_size),
               ("temporal", temporal, pairs, temporal_kernel_size)]
    if grad_spatial is not None:
        volumes.append(("grad_spatial", grad_spatial, v, kernel_size))
    if grad_temporal is not None:
        volumes.append(("grad_temporal", grad_temporal, pairs, temporal_kernel_size))
    _check_clip_args("triton_spatiotemporal_correlation_backward",
                     v, ((kernel_size, dilation, normalize, eps),
                         (temporal_kernel_size, temporal_dilation, normalize, eps)), frame_stride,
                     volumes)
    grad = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    B, T, C, H, W = v.shape
    if grad.numel() == 0:
        return grad
    inv, passes = inverse_norms(v, eps) if normalize else (grad, grad)
    has_spatial, has_temporal = grad_spatial is not None, grad_temporal is not None
    gs = grad_spatial if has_spatial else spatial
    gt = grad_temporal if has_temporal else temporal
    kernel, launch = _kernel(_spatiotemporal_bwd_kernel,
                             backward_configs(max(kernel_size, temporal_kernel_size)))
    grid = lambda meta: (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]),  # noqa: E731
                         triton.cdiv(C, meta["BLOCK_C"]), B * T)
    wrap_triton(kernel)[grid](
        gs, spatial, gt, temporal, v, inv, passes, grad, C, H, W, T, frame_stride, kernel_size,
        dilation, temporal_kernel_size, temporal_dilation, *strides6(gs), *strides6(spatial),
        *strides6(gt), *strides6(temporal), *strides6(v), SPATIAL=has_spatial,
        TEMPORAL=has_temporal, NORMALIZE=normalize, ACC=acc_dtype(v.dtype), **launch)
    return grad
