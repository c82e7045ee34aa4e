// How a (N, C, H, W) or (B, T, C, H, W) tensor is handed to the kernels:
// its flattened sizes and its strides, views read in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "index_math.h"

namespace stccl {

// N, C, H, W, with a clip's (B, T) flattened into N.
inline std::array<int64_t, 4> dims(const at::Tensor& t) {
  const int64_t d = t.dim();
  return {d == 5 ? t.size(0) * t.size(1) : t.size(0), t.size(d - 3), t.size(d - 2),
          t.size(d - 1)};
}

inline Strides4 strides4(const at::Tensor& t) {
  const auto st = t.strides();
  const int64_t d = t.dim();
  Strides4 s;
  s.inner = d == 5 ? std::max<int64_t>(t.size(1), 1) : 1;
  s.outer = st[0];
  s.batch = d == 5 ? st[1] : 0;
  s.c = st[d - 3];
  s.y = st[d - 2];
  s.x = st[d - 1];
  return s;
}

}  // namespace stccl
