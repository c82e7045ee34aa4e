// The window of a correlation: its size, spacing and normalisation, one value
// from the entry points through autograd to the kernels (the ops' schemas
// spell it out as four arguments: kernel_size, dilation, normalize, eps).
#pragma once

#include <cstdint>

namespace stccl {

struct Window {
  int64_t kernel_size;  // K, odd: K*K offsets, output channel k = i*K + j
  int64_t dilation;     // spacing of the offsets
  bool normalize;       // cosine (channel vectors over max(|v|, eps)) or raw dot products
  double eps;

  int64_t offsets() const { return kernel_size * kernel_size; }
  int64_t pad() const { return (kernel_size / 2) * dilation; }  // reach of the window
};

}  // namespace stccl
