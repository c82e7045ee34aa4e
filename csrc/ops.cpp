// Declares the ops of csrc/ops.h. Kernels are added per backend (csrc/cpu/,
// csrc/cuda/ through entry_points.h), autograd for all of them in
// csrc/autograd.cpp; fake kernels and autocast are registered from Python
// (stccl_ops/_registrations.py). The emulated CUDA library declares the same
// ops in its own namespace (op_namespace.h).
#include <torch/library.h>

#include "op_namespace.h"
#include "ops.h"

STCCL_TORCH_LIBRARY(m) {
  // Every kernel reads operands of any strides, so the compiler may hand them
  // any layout (flexible_layout) instead of pinning eager's stride order.
  const std::vector<at::Tag> any_layout = {at::Tag::flexible_layout};
#define STCCL_DEFINE_OP(name, schema) m.def(#name schema, any_layout);
  STCCL_FOR_EACH_OP(STCCL_DEFINE_OP)
#undef STCCL_DEFINE_OP
}
