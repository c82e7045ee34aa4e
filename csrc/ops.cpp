// The one place every op of the package is declared. Kernels are added per
// backend with TORCH_LIBRARY_IMPL (csrc/cpu/, csrc/cuda/), autograd for all of
// them in csrc/autograd.cpp; fake kernels and autocast are registered from
// Python (stccl_ops/_ops.py). The emulated CUDA library declares the same ops
// in its own namespace (op_namespace.h).
#include <torch/library.h>

#include "op_namespace.h"

STCCL_TORCH_LIBRARY(m) {
  // Every kernel reads operands of any strides, so the compiler may hand them
  // any layout (flexible_layout) instead of pinning eager's stride order.
  const std::vector<at::Tag> any_layout = {at::Tag::flexible_layout};
  // out[n, k, y, x] = <â[n, :, y, x], b̂[n, :, y + dy_k, x + dx_k]>; a and b are
  // (N, C, H, W) or (B, T, C, H, W) with any strides; out is (..., K*K, H, W).
  m.def("local_correlation(Tensor a, Tensor b, int kernel_size, int dilation, bool normalize, "
        "float eps) -> Tensor", any_layout);
  // Gradients for a and b (undefined where not asked for), gathered per pixel.
  m.def("_local_correlation_backward(Tensor grad_out, Tensor a, Tensor b, Tensor out, "
        "int kernel_size, int dilation, bool normalize, float eps, bool need_grad_a, "
        "bool need_grad_b) -> (Tensor, Tensor)", any_layout);
  // local_correlation(x, x), computed on half the offsets by symmetry.
  m.def("self_correlation(Tensor x, int kernel_size, int dilation, bool normalize, float eps) "
        "-> Tensor", any_layout);
  m.def("_self_correlation_backward(Tensor grad_out, Tensor x, Tensor out, int kernel_size, "
        "int dilation, bool normalize, float eps) -> Tensor", any_layout);
  // Frame t of a clip v (B, T, C, H, W) against frame t + frame_stride:
  // (B, T - frame_stride, K*K, H, W). Its backward returns the clip gradient.
  m.def("temporal_correlation(Tensor v, int kernel_size, int dilation, bool normalize, float eps, "
        "int frame_stride) -> Tensor", any_layout);
  m.def("_temporal_correlation_backward(Tensor grad_out, Tensor v, Tensor out, int kernel_size, "
        "int dilation, bool normalize, float eps, int frame_stride) -> Tensor", any_layout);
}
