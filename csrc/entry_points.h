// The entry points of every op, written once: argument checks (for callers of
// torch.ops.stccl_ops.* that skip the Python API) in front of a backend's
// kernels. A backend provides
//   forward(a, b, K, dilation, normalize, eps, self) -> out
//   temporal_forward(v, K, dilation, normalize, eps, frame_stride) -> out
//   backward(grad_out, a, b, out, K, dilation, normalize, eps, need_a, need_b, self)
//       -> (grad_a, grad_b)
//   temporal_backward(grad_out, v, out, K, dilation, normalize, eps, frame_stride) -> grad_v
// and registers EntryPoints<Backend>::kernels for its dispatch key.
#pragma once

#include <torch/library.h>

#include "checks.h"

namespace stccl {

template <typename Backend>
struct EntryPoints {
  static at::Tensor local_correlation(const at::Tensor& a, const at::Tensor& b,
                                      int64_t kernel_size, int64_t dilation, bool normalize,
                                      double eps) {
    check_operand(a, "local_correlation", "a");
    check_operand(b, "local_correlation", "b");
    check_same(b, a, "local_correlation", "b", "a");
    check_window(kernel_size, dilation, eps, "local_correlation");
    return Backend::forward(a, b, kernel_size, dilation, normalize, eps, /*self=*/false);
  }

  static at::Tensor self_correlation(const at::Tensor& x, int64_t kernel_size, int64_t dilation,
                                     bool normalize, double eps) {
    check_operand(x, "self_correlation", "x");
    check_window(kernel_size, dilation, eps, "self_correlation");
    return Backend::forward(x, x, kernel_size, dilation, normalize, eps, /*self=*/true);
  }

  static at::Tensor temporal_correlation(const at::Tensor& v, int64_t kernel_size,
                                         int64_t dilation, bool normalize, double eps,
                                         int64_t frame_stride) {
    check_clip(v, frame_stride, "temporal_correlation");
    check_window(kernel_size, dilation, eps, "temporal_correlation");
    return Backend::temporal_forward(v, kernel_size, dilation, normalize, eps, frame_stride);
  }

  static std::tuple<at::Tensor, at::Tensor> local_correlation_backward(
      const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
      int64_t kernel_size, int64_t dilation, bool normalize, double eps, bool need_grad_a,
      bool need_grad_b) {
    const char* op = "_local_correlation_backward";
    check_operand(a, op, "a");
    check_same(b, a, op, "b", "a");
    check_window(kernel_size, dilation, eps, op);
    check_volume(grad_out, a, kernel_size, op, "grad_out");
    check_volume(out, a, kernel_size, op, "out");
    return Backend::backward(grad_out, a, b, out, kernel_size, dilation, normalize, eps,
                             need_grad_a, need_grad_b, /*self=*/false);
  }

  static at::Tensor self_correlation_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& out, int64_t kernel_size,
                                              int64_t dilation, bool normalize, double eps) {
    const char* op = "_self_correlation_backward";
    check_operand(x, op, "x");
    check_window(kernel_size, dilation, eps, op);
    check_volume(grad_out, x, kernel_size, op, "grad_out");
    check_volume(out, x, kernel_size, op, "out");
    return std::get<0>(Backend::backward(grad_out, x, x, out, kernel_size, dilation, normalize,
                                         eps, /*need_a=*/true, /*need_b=*/false, /*self=*/true));
  }

  static at::Tensor temporal_correlation_backward(const at::Tensor& grad_out, const at::Tensor& v,
                                                  const at::Tensor& out, int64_t kernel_size,
                                                  int64_t dilation, bool normalize, double eps,
                                                  int64_t frame_stride) {
    const char* op = "_temporal_correlation_backward";
    check_clip(v, frame_stride, op);
    check_window(kernel_size, dilation, eps, op);
    const auto pairs = frame_pairs(v, frame_stride);
    check_volume(grad_out, pairs.first, kernel_size, op, "grad_out");
    check_volume(out, pairs.first, kernel_size, op, "out");
    return Backend::temporal_backward(grad_out, v, out, kernel_size, dilation, normalize, eps,
                                      frame_stride);
  }

  static void kernels(torch::Library& m) {
    m.impl("local_correlation", &local_correlation);
    m.impl("self_correlation", &self_correlation);
    m.impl("temporal_correlation", &temporal_correlation);
    m.impl("_local_correlation_backward", &local_correlation_backward);
    m.impl("_self_correlation_backward", &self_correlation_backward);
    m.impl("_temporal_correlation_backward", &temporal_correlation_backward);
  }
};

}  // namespace stccl
