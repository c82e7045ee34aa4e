// The CPU passes of every op, as one table per vector width (vector_passes.h,
// compiled once per width), for the entry points to pick the processor's from
// (correlation_ops.cpp); and the allocation of their results.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../window.h"

namespace stccl::cpu {

// What a backend provides to EntryPoints (see entry_points.h).
struct Passes {
  at::Tensor (*forward)(const at::Tensor& a, const at::Tensor& b, const Window& w, bool self);
  at::Tensor (*temporal_forward)(const at::Tensor& v, const Window& w, int64_t frame_stride);
  std::tuple<at::Tensor, at::Tensor> (*backward)(const at::Tensor& grad_out, const at::Tensor& a,
                                                 const at::Tensor& b, const at::Tensor& out,
                                                 const Window& w, bool need_a, bool need_b,
                                                 bool self);
  at::Tensor (*temporal_backward)(const at::Tensor& grad_out, const at::Tensor& v,
                                  const at::Tensor& out, const Window& w, int64_t frame_stride);
  std::tuple<at::Tensor, at::Tensor> (*spatiotemporal_forward)(const at::Tensor& v,
                                                               const Window& spatial_window,
                                                               const Window& temporal_window,
                                                               int64_t frame_stride);
  at::Tensor (*spatiotemporal_backward)(const at::Tensor& grad_spatial,
                                        const at::Tensor& grad_temporal, const at::Tensor& v,
                                        const at::Tensor& spatial, const at::Tensor& temporal,
                                        const Window& spatial_window,
                                        const Window& temporal_window, int64_t frame_stride);
};

// The passes built with VECTOR_BYTES-byte vectors: 32 (the AVX2+FMA build and
// the portable one) or 64 (AVX-512; x86-64 only, call only where it runs).
template <int VECTOR_BYTES>
const Passes& passes();

// A result of its own (output or gradient), for the kernels to write once:
// every element (a result may hold an earlier one's values).
at::Tensor result(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace stccl::cpu
