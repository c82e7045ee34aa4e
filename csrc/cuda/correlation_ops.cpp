// CUDA entry points of the ops of csrc/ops.h: the device guard, the current
// stream, allocation, and the launchers of forward.cu and backward.cu. Copy policy as on the CPU: operands are read in place
// with their strides; only outputs, gradients and a workspace are allocated.
//
// Built twice: for CUDA tensors in stccl_ops._C, and with STCCL_CUDA_EMULATION
// for CPU tensors in stccl_ops._C_cuda_emulated, where the same launchers run
// the kernels under the emulator. Only the device guard, the stream and the
// error check differ.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "../op_namespace.h"
#include "../tensor_args.h"
#include "launch.h"

#if defined(STCCL_CUDA_EMULATION)
#include "emulation/emulator.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace stccl::cuda {
namespace {

#if defined(STCCL_CUDA_EMULATION)
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "stccl_ops (cuda_emulated): kernel launch failed: ",
              emu::last_error());
}
#define STCCL_DISPATCH_KEY CPU
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }
#define STCCL_DISPATCH_KEY CUDA
#endif

Problem problem(const at::Tensor& t, const Window& w) {
  DType dtype;
  switch (t.scalar_type()) {
    case at::kHalf: dtype = DType::Float16; break;
    case at::kBFloat16: dtype = DType::BFloat16; break;
    case at::kFloat: dtype = DType::Float32; break;
    case at::kDouble: dtype = DType::Float64; break;
    default: TORCH_CHECK(false, "stccl_ops: unsupported dtype ", t.scalar_type());
  }
  const auto d = dims(t);
  return {dtype, d[0], d[1], d[2], d[3], w};
}

at::Tensor forward(const at::Tensor& a, const at::Tensor& b, const Window& w, bool self) {
  const DeviceGuard guard(a.device());
  auto out = at::empty(correlation_shape(a, w.kernel_size), a.options());
  if (out.numel() == 0) return out;
  const Problem p = problem(a, w);
  check_launch(launch_forward(p, a.const_data_ptr(), strides4(a), b.const_data_ptr(),
                              strides4(b), self, out.mutable_data_ptr(), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& a,
                                            const at::Tensor& b, const at::Tensor& out,
                                            const Window& w, bool need_a, bool need_b,
                                            bool self) {
  const DeviceGuard guard(a.device());
  at::Tensor grad_a = need_a ? at::empty(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? at::empty(b.sizes(), b.options()) : at::Tensor();
  if (a.numel() == 0 || (!need_a && !need_b)) return {grad_a, grad_b};
  const Problem p = problem(a, w);
  const auto stream = current_stream();
  auto workspace = at::empty({backward_workspace_bytes(p)}, a.options().dtype(at::kByte));
  const Strides4 sa = strides4(a), sb = strides4(b), sg = strides4(grad_out),
                 so = strides4(out);
  if (w.normalize) {
    check_launch(launch_backward_norms(p, a.const_data_ptr(), sa, b.const_data_ptr(), sb, self,
                                       workspace.mutable_data_ptr(), stream));
  }
  auto run = [&](Grad which, at::Tensor& grad) {
    check_launch(launch_backward(p, which, grad_out.const_data_ptr(), sg, out.const_data_ptr(),
                                 so, a.const_data_ptr(), sa, b.const_data_ptr(), sb,
                                 grad.mutable_data_ptr(), workspace.mutable_data_ptr(), stream));
  };
  if (need_a) run(self ? Grad::Self : Grad::A, grad_a);
  if (need_b) run(Grad::B, grad_b);
  return {grad_a, grad_b};
}

// The two frame views correlated like any a and b.
at::Tensor temporal_forward(const at::Tensor& v, const Window& w, int64_t frame_stride) {
  const auto [a, b] = frame_pairs(v, frame_stride);
  return forward(a, b, w, /*self=*/false);
}

// The gradients of the two frame views, summed into the clip gradient.
at::Tensor temporal_backward(const at::Tensor& grad_out, const at::Tensor& v,
                             const at::Tensor& out, const Window& w, int64_t frame_stride) {
  const auto [a, b] = frame_pairs(v, frame_stride);
  const DeviceGuard guard(v.device());
  auto [grad_a, grad_b] = backward(grad_out, a, b, out, w, true, true, /*self=*/false);
  auto grad = at::zeros(v.sizes(), v.options());
  if (grad.numel() == 0) return grad;
  const int64_t T = v.size(1);
  grad.slice(1, 0, T - frame_stride).add_(grad_a);
  grad.slice(1, frame_stride, T).add_(grad_b);
  return grad;
}

// Both volumes of a clip, each frame's tile staged once for both windows;
// halos beyond shared memory: the self and temporal passes one after the other.
std::tuple<at::Tensor, at::Tensor> spatiotemporal_forward(const at::Tensor& v,
                                                          const Window& spatial_window,
                                                          const Window& temporal_window,
                                                          int64_t frame_stride) {
  const Problem p = problem(v, spatial_window);
  if (!clip_kernels_fit(p, temporal_window))
    return {forward(v, v, spatial_window, /*self=*/true),
            temporal_forward(v, temporal_window, frame_stride)};
  const DeviceGuard guard(v.device());
  auto spatial = at::empty(correlation_shape(v, spatial_window.kernel_size), v.options());
  auto temporal = at::empty(
      correlation_shape(frame_pairs(v, frame_stride).first, temporal_window.kernel_size),
      v.options());
  if (spatial.numel() == 0) return {spatial, temporal};
  check_launch(launch_spatiotemporal_forward(p, temporal_window, v.size(1), frame_stride,
                                             v.const_data_ptr(), strides4(v),
                                             spatial.mutable_data_ptr(),
                                             temporal.mutable_data_ptr(), current_stream()));
  return {spatial, temporal};
}

// The clip gradient of both volumes in one gather per frame (an undefined
// grad_* contributes nothing); halos beyond shared memory: the self and
// temporal gradients, summed.
at::Tensor spatiotemporal_backward(const at::Tensor& grad_spatial,
                                   const at::Tensor& grad_temporal, const at::Tensor& v,
                                   const at::Tensor& spatial, const at::Tensor& temporal,
                                   const Window& spatial_window, const Window& temporal_window,
                                   int64_t frame_stride) {
  const Problem p = problem(v, spatial_window);
  const DeviceGuard guard(v.device());
  if (!clip_kernels_fit(p, temporal_window)) {
    at::Tensor grad = at::zeros(v.sizes(), v.options());
    if (grad_spatial.defined())
      grad.add_(std::get<0>(backward(grad_spatial, v, v, spatial, spatial_window, true, false,
                                     /*self=*/true)));
    if (grad_temporal.defined())
      grad.add_(temporal_backward(grad_temporal, v, temporal, temporal_window, frame_stride));
    return grad;
  }
  auto grad = at::empty(v.sizes(), v.options());
  if (grad.numel() == 0) return grad;
  auto workspace = at::empty({clip_backward_workspace_bytes(p, temporal_window)},
                             v.options().dtype(at::kByte));
  auto pointer = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  auto strides = [](const at::Tensor& t) { return t.defined() ? strides4(t) : Strides4{}; };
  check_launch(launch_spatiotemporal_backward(
      p, temporal_window, v.size(1), frame_stride, pointer(grad_spatial), strides(grad_spatial),
      spatial.const_data_ptr(), strides4(spatial), pointer(grad_temporal),
      strides(grad_temporal), temporal.const_data_ptr(), strides4(temporal), v.const_data_ptr(),
      strides4(v), grad.mutable_data_ptr(), workspace.mutable_data_ptr(), current_stream()));
  return grad;
}

struct Cuda {
  static constexpr auto forward = stccl::cuda::forward;
  static constexpr auto temporal_forward = stccl::cuda::temporal_forward;
  static constexpr auto backward = stccl::cuda::backward;
  static constexpr auto temporal_backward = stccl::cuda::temporal_backward;
  static constexpr auto spatiotemporal_forward = stccl::cuda::spatiotemporal_forward;
  static constexpr auto spatiotemporal_backward = stccl::cuda::spatiotemporal_backward;
};

}  // namespace

STCCL_TORCH_LIBRARY_IMPL(STCCL_DISPATCH_KEY, m) { EntryPoints<Cuda>::kernels(m); }

}  // namespace stccl::cuda
