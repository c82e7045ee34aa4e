// Index, offset and bounds math shared by the CPU and CUDA kernels.
//
// Every kernel reaches a neighbour through these helpers, so the CPU tests
// exercise the same arithmetic the device code runs. All offsets are int64_t:
// N*C*H*W can pass 2^31 on realistic video batches.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STCCL_HD __host__ __device__ __forceinline__
#else
#define STCCL_HD inline
#endif

namespace stccl {

// Channel k = i*K + j of the output is the offset
// (dy, dx) = ((i - K/2) * dilation, (j - K/2) * dilation), row-major like F.unfold.
// kernel_size is at most MAX_KERNEL_SIZE, so k and K fit 32 bits: the
// divisions below are 32-bit (a 64-bit division is a function call on GPUs).
constexpr int64_t MAX_KERNEL_SIZE = 255;

STCCL_HD int64_t offset_dy(int64_t k, int64_t K, int64_t dilation) {
  return (int32_t(k) / int32_t(K) - int32_t(K) / 2) * dilation;
}

STCCL_HD int64_t offset_dx(int64_t k, int64_t K, int64_t dilation) {
  return (int32_t(k) % int32_t(K) - int32_t(K) / 2) * dilation;
}

// The channel whose offset is the negation of channel k's: out[p, mirror(k)]
// = out[p + d_mirror(k), k] for a self-correlation.
STCCL_HD int64_t mirror_offset(int64_t k, int64_t K) { return K * K - 1 - k; }

STCCL_HD bool in_image(int64_t y, int64_t x, int64_t H, int64_t W) {
  return y >= 0 && y < H && x >= 0 && x < W;
}

// Element offset of (n, c, y, x) for a tensor whose batch index n is split
// into (n / inner, n % inner) with strides (stride_outer, stride_inner): a 5-D
// clip view such as v[:, 1:] is addressed without a copy. A 4-D tensor uses
// inner = 1.
struct Strides4 {
  int64_t inner;  // size of the inner batch dimension (1 for 4-D tensors)
  int64_t outer, batch, c, y, x;
};

STCCL_HD int64_t image_offset(const Strides4& s, int64_t n) {
  // Image counts fit 32 bits in practice; keep the division 32-bit then.
  const int64_t outer = (n <= INT32_MAX && s.inner <= INT32_MAX)
                            ? int64_t(int32_t(n) / int32_t(s.inner))
                            : n / s.inner;
  return outer * s.outer + (n - outer * s.inner) * s.batch;
}

STCCL_HD int64_t element_offset(const Strides4& s, int64_t n, int64_t c,
                                int64_t y, int64_t x) {
  return image_offset(s, n) + c * s.c + y * s.y + x * s.x;
}

// 1 / max(||v||, eps): the factor F.normalize applies, from the squared norm.
STCCL_HD float inverse_norm(float sum_sq, float eps) {
  const float norm = sqrtf(sum_sq);
  return 1.0f / (norm > eps ? norm : eps);
}
STCCL_HD double inverse_norm(double sum_sq, double eps) {
  const double norm = sqrt(sum_sq);
  return 1.0 / (norm > eps ? norm : eps);
}

// Whether the clamp in max(||v||, eps) lets the gradient through: the
// projection term of the cosine gradient exists only where ||v|| >= eps
// (torch's clamp_min passes the gradient where input >= min).
STCCL_HD bool norm_passes_clamp(float sum_sq, float eps) { return sqrtf(sum_sq) >= eps; }
STCCL_HD bool norm_passes_clamp(double sum_sq, double eps) { return sqrt(sum_sq) >= eps; }

}  // namespace stccl
