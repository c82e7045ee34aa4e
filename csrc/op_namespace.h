// The torch.library namespace the files shared by both libraries register in:
// stccl_ops for stccl_ops._C, stccl_ops_cuda_emulated for the library of the
// CUDA kernels run on the CPU under the emulator (stccl_ops._C_cuda_emulated,
// built with -DSTCCL_OPS_NAMESPACE=stccl_ops_cuda_emulated). Same schemas,
// same entry points, same autograd: only the namespace differs.
#pragma once

#include <torch/library.h>

#ifndef STCCL_OPS_NAMESPACE
#define STCCL_OPS_NAMESPACE stccl_ops
#endif

#define STCCL_STRINGIFY_(x) #x
#define STCCL_STRINGIFY(x) STCCL_STRINGIFY_(x)
// "stccl_ops::<op>" in the library's namespace.
#define STCCL_OP_NAME(op) STCCL_STRINGIFY(STCCL_OPS_NAMESPACE) "::" op

// TORCH_LIBRARY and TORCH_LIBRARY_IMPL paste their namespace argument without
// expanding it; one more macro level expands STCCL_OPS_NAMESPACE first.
#define STCCL_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define STCCL_TORCH_LIBRARY(m) STCCL_TORCH_LIBRARY_(STCCL_OPS_NAMESPACE, m)
#define STCCL_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define STCCL_TORCH_LIBRARY_IMPL(key, m) STCCL_TORCH_LIBRARY_IMPL_(STCCL_OPS_NAMESPACE, key, m)
