// The interface between the torch-facing CUDA entry points (correlation_ops.cpp)
// and the kernels (forward.cu, backward.cu): raw pointers, sizes, strides and a
// stream, no torch types, so the .cu files compile without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../index_math.h"
#include "../window.h"

namespace stccl::cuda {

enum class DType { Float16, BFloat16, Float32, Float64 };

struct Problem {
  DType dtype;
  int64_t N, C, H, W;  // N: images (a clip's B * T)
  Window window;
};

// out (contiguous (N, K*K, H, W)) = correlation of a with b; a == b with
// self = true computes half of the offsets and mirrors the rest.
cudaError_t launch_forward(const Problem& p, const void* a, Strides4 sa, const void* b,
                           Strides4 sb, bool self, void* out, cudaStream_t stream);

// Scratch of the backward pass, in bytes: inverse norms, clamp masks,
// per-pixel scale and shift (O(N*H*W)) and the gathered weights (N*K*K*H*W).
int64_t backward_workspace_bytes(const Problem& p);

// The inverse norms of a and b (of a alone when self), once for both grads.
cudaError_t launch_backward_norms(const Problem& p, const void* a, Strides4 sa, const void* b,
                                  Strides4 sb, bool self, void* workspace, cudaStream_t stream);

enum class Grad { A, B, Self };

// grad (contiguous (N, C, H, W)) of operand `own` (a for Grad::A, b for
// Grad::B, x for Grad::Self), gathered per pixel: no atomics, deterministic.
cudaError_t launch_backward(const Problem& p, Grad which, const void* grad_out, Strides4 sg,
                            const void* out, Strides4 so, const void* a, Strides4 sa,
                            const void* b, Strides4 sb, void* grad, void* workspace,
                            cudaStream_t stream);

// The clip kernels of spatiotemporal_correlation: p holds the clip's frames
// as images (N = B * T) and the spatial window; `temporal` the second window,
// frame t against t + S. Whether their tiles (both windows' halo) fit shared
// memory; when not, the self and temporal launches run one after the other.
bool clip_kernels_fit(const Problem& p, const Window& temporal);

// spatial (contiguous (B, T, K*K, H, W)) and temporal ((B, T - S, Kt*Kt, H, W))
// of the clip v, each frame's tile staged once per chunk for both.
cudaError_t launch_spatiotemporal_forward(const Problem& p, const Window& temporal, int64_t T,
                                          int64_t S, const void* v, Strides4 sv, void* spatial,
                                          void* temporal_out, cudaStream_t stream);

// Scratch of the clip backward, in bytes: the frames' inverse norms, scale,
// shift and every term's weights (N * (K*K + 2 Kt*Kt) * H * W).
int64_t clip_backward_workspace_bytes(const Problem& p, const Window& temporal);

// grad (contiguous (B, T, C, H, W)) of the clip from both volumes, one gather
// per frame: the spatial self term (grad_spatial, may be null), the terms of
// the pairs the frame is the a and the b of (grad_temporal, may be null).
cudaError_t launch_spatiotemporal_backward(const Problem& p, const Window& temporal, int64_t T,
                                           int64_t S, const void* grad_spatial, Strides4 sgs,
                                           const void* spatial, Strides4 ss,
                                           const void* grad_temporal, Strides4 sgt,
                                           const void* temporal_out, Strides4 st, const void* v,
                                           Strides4 sv, void* grad, void* workspace,
                                           cudaStream_t stream);

}  // namespace stccl::cuda
