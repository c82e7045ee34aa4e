// Argument checks shared by the CPU and CUDA entry points, for callers that
// use torch.ops.stccl_ops.* directly (the Python API checks the same things
// first, with friendlier messages).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "index_math.h"
#include "window.h"

namespace stccl {

inline void check_operand(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "stccl_ops.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "stccl_ops.", op, ": ", name,
              " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "stccl_ops.", op, ": ", name,
              " must be (N, C, H, W) or (B, T, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "stccl_ops.", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "stccl_ops.", op, ": ", name, " must have the shape of ",
              ref_name, " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "stccl_ops.", op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "stccl_ops.", op, ": ", name,
              " must be on the device of ", ref_name, " (", ref.device(), "), got ", t.device());
}

// prefix: "temporal_" for the second window of spatiotemporal_correlation.
inline void check_window(const Window& w, const char* op, const char* prefix = "") {
  TORCH_CHECK(w.kernel_size >= 1 && w.kernel_size % 2 == 1, "stccl_ops.", op, ": ", prefix,
              "kernel_size must be a positive odd integer, got ", w.kernel_size);
  TORCH_CHECK(w.kernel_size <= MAX_KERNEL_SIZE, "stccl_ops.", op, ": ", prefix,
              "kernel_size must be <= ", MAX_KERNEL_SIZE, ", got ", w.kernel_size);
  TORCH_CHECK(w.dilation >= 1, "stccl_ops.", op, ": ", prefix, "dilation must be >= 1, got ",
              w.dilation);
  TORCH_CHECK(w.eps > 0, "stccl_ops.", op, ": eps must be > 0, got ", w.eps);
}

// The output of a correlation of `t`: (..., K*K, H, W).
inline std::vector<int64_t> correlation_shape(const at::Tensor& t, int64_t kernel_size) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[shape.size() - 3] = kernel_size * kernel_size;
  return shape;
}

// grad_out and the saved output: (..., K*K, H, W) in the operand's dtype and device.
inline void check_volume(const at::Tensor& volume, const at::Tensor& operand, int64_t kernel_size,
                         const char* op, const char* name) {
  const auto expected = correlation_shape(operand, kernel_size);
  TORCH_CHECK(volume.sizes() == at::IntArrayRef(expected), "stccl_ops.", op, ": ", name,
              " must have shape ", at::IntArrayRef(expected), ", got ", volume.sizes());
  TORCH_CHECK(volume.scalar_type() == operand.scalar_type() && volume.device() == operand.device(),
              "stccl_ops.", op, ": ", name, " must match the inputs' dtype and device");
}

inline void check_clip(const at::Tensor& v, int64_t frame_stride, const char* op) {
  check_operand(v, op, "v");
  TORCH_CHECK(v.dim() == 5, "stccl_ops.", op, ": v must be (B, T, C, H, W), got shape ", v.sizes());
  TORCH_CHECK(frame_stride >= 1 && frame_stride < v.size(1), "stccl_ops.", op,
              ": frame_stride must be in [1, T-1] = [1, ", v.size(1) - 1, "], got ", frame_stride);
}

// The two views a temporal correlation compares: frames [0, T-s) and [s, T).
inline std::pair<at::Tensor, at::Tensor> frame_pairs(const at::Tensor& v, int64_t frame_stride) {
  const int64_t T = v.size(1);
  return {v.slice(1, 0, T - frame_stride), v.slice(1, frame_stride, T)};
}

}  // namespace stccl
