// Every op of the package, written once: X(name, schema) for each. ops.cpp
// declares them from this list; the Autograd kernels (autograd.cpp) and each
// backend's kernels (entry_points.h) are registered through it, so an op
// cannot be left out of either.
//
// local_correlation: out[n, k, y, x] = <â[n, :, y, x], b̂[n, :, y + dy_k, x + dx_k]>,
//   a and b (N, C, H, W) or (B, T, C, H, W) with any strides, out (..., K*K, H, W).
// self_correlation: local_correlation(x, x), computed on half the offsets by
//   symmetry.
// temporal_correlation: frame t of a clip v (B, T, C, H, W) against frame
//   t + frame_stride: (B, T - frame_stride, K*K, H, W).
// spatiotemporal_correlation: both STCCL volumes of a clip from one pass,
//   (self_correlation(v) with the first window, temporal_correlation(v) with
//   the second).
// The backward ops (leading underscore) return the inputs' gradients,
// gathered per pixel; _local_correlation_backward leaves a gradient that was
// not asked for undefined, _temporal_correlation_backward returns the clip's,
// _spatiotemporal_correlation_backward the clip's of both volumes (a grad_*
// left undefined: that volume gets no gradient).
#pragma once

#define STCCL_WINDOW_ARGS "int kernel_size, int dilation, bool normalize, float eps"
#define STCCL_TWO_WINDOW_ARGS                                                                   \
  "int kernel_size, int dilation, int temporal_kernel_size, int temporal_dilation, "            \
  "int frame_stride, bool normalize, float eps"

#define STCCL_FOR_EACH_OP(X)                                                                    \
  X(local_correlation, "(Tensor a, Tensor b, " STCCL_WINDOW_ARGS ") -> Tensor")                 \
  X(self_correlation, "(Tensor x, " STCCL_WINDOW_ARGS ") -> Tensor")                            \
  X(temporal_correlation, "(Tensor v, " STCCL_WINDOW_ARGS ", int frame_stride) -> Tensor")      \
  X(_local_correlation_backward, "(Tensor grad_out, Tensor a, Tensor b, Tensor out, "           \
                                 STCCL_WINDOW_ARGS ", bool need_grad_a, bool need_grad_b) "     \
                                 "-> (Tensor, Tensor)")                                          \
  X(_self_correlation_backward,                                                                 \
    "(Tensor grad_out, Tensor x, Tensor out, " STCCL_WINDOW_ARGS ") -> Tensor")                 \
  X(_temporal_correlation_backward, "(Tensor grad_out, Tensor v, Tensor out, "                  \
                                    STCCL_WINDOW_ARGS ", int frame_stride) -> Tensor")         \
  X(spatiotemporal_correlation, "(Tensor v, " STCCL_TWO_WINDOW_ARGS ") -> (Tensor, Tensor)")    \
  X(_spatiotemporal_correlation_backward,                                                       \
    "(Tensor? grad_spatial, Tensor? grad_temporal, Tensor v, Tensor spatial, Tensor temporal, " \
    STCCL_TWO_WINDOW_ARGS ") -> Tensor")

// Registers each op's kernel: a function of the op's name in the current scope.
#define STCCL_IMPL_OP(name, schema) m.impl(#name, &name);
