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

}  // namespace stccl::cuda
