// The entry points of every op of csrc/ops.h, written once: argument checks
// (for callers of torch.ops.stccl_ops.* that skip the Python API) in front of
// a backend's kernels. A backend provides
//   forward(a, b, window, self) -> out
//   temporal_forward(v, window, frame_stride) -> out
//   backward(grad_out, a, b, out, window, need_a, need_b, self) -> (grad_a, grad_b)
//   temporal_backward(grad_out, v, out, window, frame_stride) -> grad_v
//   spatiotemporal_forward(v, spatial_window, temporal_window, frame_stride)
//       -> (spatial, temporal)
//   spatiotemporal_backward(grad_spatial, grad_temporal, v, spatial, temporal,
//       spatial_window, temporal_window, frame_stride) -> grad_v (an undefined
//       grad_*: that volume contributes nothing)
// and registers EntryPoints<Backend>::kernels for its dispatch key.
#pragma once

#include <torch/library.h>

#include "checks.h"
#include "ops.h"
#include "window.h"

namespace stccl {

template <typename Backend>
struct EntryPoints {
  static at::Tensor local_correlation(const at::Tensor& a, const at::Tensor& b,
                                      int64_t kernel_size, int64_t dilation, bool normalize,
                                      double eps) {
    const char* op = "local_correlation";
    const Window w{kernel_size, dilation, normalize, eps};
    check_operand(a, op, "a");
    check_operand(b, op, "b");
    check_same(b, a, op, "b", "a");
    check_window(w, op);
    return Backend::forward(a, b, w, /*self=*/false);
  }

  static at::Tensor self_correlation(const at::Tensor& x, int64_t kernel_size, int64_t dilation,
                                     bool normalize, double eps) {
    const char* op = "self_correlation";
    const Window w{kernel_size, dilation, normalize, eps};
    check_operand(x, op, "x");
    check_window(w, op);
    return Backend::forward(x, x, w, /*self=*/true);
  }

  static at::Tensor temporal_correlation(const at::Tensor& v, int64_t kernel_size,
                                         int64_t dilation, bool normalize, double eps,
                                         int64_t frame_stride) {
    const char* op = "temporal_correlation";
    const Window w{kernel_size, dilation, normalize, eps};
    check_clip(v, frame_stride, op);
    check_window(w, op);
    return Backend::temporal_forward(v, w, frame_stride);
  }

  static std::tuple<at::Tensor, at::Tensor> _local_correlation_backward(
      const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
      int64_t kernel_size, int64_t dilation, bool normalize, double eps, bool need_grad_a,
      bool need_grad_b) {
    const char* op = "_local_correlation_backward";
    const Window w{kernel_size, dilation, normalize, eps};
    check_operand(a, op, "a");
    check_same(b, a, op, "b", "a");
    check_window(w, op);
    check_volume(grad_out, a, kernel_size, op, "grad_out");
    check_volume(out, a, kernel_size, op, "out");
    return Backend::backward(grad_out, a, b, out, w, need_grad_a, need_grad_b, /*self=*/false);
  }

  static at::Tensor _self_correlation_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& out, int64_t kernel_size,
                                               int64_t dilation, bool normalize, double eps) {
    const char* op = "_self_correlation_backward";
    const Window w{kernel_size, dilation, normalize, eps};
    check_operand(x, op, "x");
    check_window(w, op);
    check_volume(grad_out, x, kernel_size, op, "grad_out");
    check_volume(out, x, kernel_size, op, "out");
    return std::get<0>(Backend::backward(grad_out, x, x, out, w, /*need_a=*/true,
                                         /*need_b=*/false, /*self=*/true));
  }

  static at::Tensor _temporal_correlation_backward(const at::Tensor& grad_out,
                                                   const at::Tensor& v, const at::Tensor& out,
                                                   int64_t kernel_size, int64_t dilation,
                                                   bool normalize, double eps,
                                                   int64_t frame_stride) {
    const char* op = "_temporal_correlation_backward";
    const Window w{kernel_size, dilation, normalize, eps};
    check_clip(v, frame_stride, op);
    check_window(w, op);
    const auto pairs = frame_pairs(v, frame_stride);
    check_volume(grad_out, pairs.first, kernel_size, op, "grad_out");
    check_volume(out, pairs.first, kernel_size, op, "out");
    return Backend::temporal_backward(grad_out, v, out, w, frame_stride);
  }

  static std::tuple<at::Tensor, at::Tensor> spatiotemporal_correlation(
      const at::Tensor& v, int64_t kernel_size, int64_t dilation, int64_t temporal_kernel_size,
      int64_t temporal_dilation, int64_t frame_stride, bool normalize, double eps) {
    const char* op = "spatiotemporal_correlation";
    const Window ws{kernel_size, dilation, normalize, eps};
    const Window wt{temporal_kernel_size, temporal_dilation, normalize, eps};
    check_clip(v, frame_stride, op);
    check_window(ws, op);
    check_window(wt, op, "temporal_");
    return Backend::spatiotemporal_forward(v, ws, wt, frame_stride);
  }

  static at::Tensor _spatiotemporal_correlation_backward(
      const std::optional<at::Tensor>& grad_spatial, const std::optional<at::Tensor>& grad_temporal,
      const at::Tensor& v, const at::Tensor& spatial, const at::Tensor& temporal,
      int64_t kernel_size, int64_t dilation, int64_t temporal_kernel_size,
      int64_t temporal_dilation, int64_t frame_stride, bool normalize, double eps) {
    const char* op = "_spatiotemporal_correlation_backward";
    const Window ws{kernel_size, dilation, normalize, eps};
    const Window wt{temporal_kernel_size, temporal_dilation, normalize, eps};
    check_clip(v, frame_stride, op);
    check_window(ws, op);
    check_window(wt, op, "temporal_");
    const auto pairs = frame_pairs(v, frame_stride);
    check_volume(spatial, v, kernel_size, op, "spatial");
    check_volume(temporal, pairs.first, temporal_kernel_size, op, "temporal");
    const at::Tensor none;
    const at::Tensor& gs = grad_spatial.has_value() ? *grad_spatial : none;
    const at::Tensor& gt = grad_temporal.has_value() ? *grad_temporal : none;
    if (gs.defined()) check_volume(gs, v, kernel_size, op, "grad_spatial");
    if (gt.defined()) check_volume(gt, pairs.first, temporal_kernel_size, op, "grad_temporal");
    return Backend::spatiotemporal_backward(gs, gt, v, spatial, temporal, ws, wt, frame_stride);
  }

  static void kernels(torch::Library& m) { STCCL_FOR_EACH_OP(STCCL_IMPL_OP) }
};

}  // namespace stccl
