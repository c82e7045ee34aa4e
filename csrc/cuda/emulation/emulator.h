// A CUDA execution model on the CPU, for running the kernels of csrc/cuda/ as
// host C++ (the `cuda_emulated` backend, its sanitizer builds and its memory
// accounting). The kernels' source is compiled unchanged by a host compiler
// with this header in front (csrc/cuda/device.h includes it when
// STCCL_CUDA_EMULATION is defined).
//
// What it models, faithfully or not at all:
// - every CUDA thread of a block is a thread of its own: a user-space fiber
//   (switched at __syncthreads(), fast) or, under ThreadSanitizer, an OS
//   thread, so that races on shared memory between barriers are real races;
// - __syncthreads() is a barrier of the block's threads; one that is not
//   reached by every thread of the block, at the same place, is a launch
//   error (undefined behaviour on a GPU, often a hang);
// - dynamic shared memory is one heap allocation per block of exactly the
//   requested size, filled with 0xFF bytes (NaN in every float type), so an
//   overrun is an overrun and a read before a write shows;
// - blocks run one after another (two at a time under ThreadSanitizer);
// - launch limits are the GPU's: 1024 threads per block, grid y and z at
//   most 65535, 48 KiB of dynamic shared memory; grid_limits() can lower the
//   caps the kernels size their grids by, so grid-stride and image loops run
//   on small inputs.
// Not modelled, so refused at compile time: warp shuffles and votes, atomics
// (declared deleted below), static __shared__ arrays and cooperative groups
// (not declared).
#pragma once

#if defined(__CUDACC__)
#error "emulator.h is for host compilers; nvcc builds the kernels for the GPU"
#endif

#include <cuda_runtime_api.h>  // dim3, uint3, cudaError_t, cudaStream_t: types only

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace stccl::emu {

// What one emulated CUDA thread sees.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* shared;  // the block's dynamic shared memory
};

// The calling emulated thread; throws outside a kernel.
ThreadState& this_thread();

void syncthreads(const char* file, int line);

// Runs body() once per thread of every block of the grid. Returns the error a
// GPU would give (invalid configuration, too much shared memory) or
// cudaErrorLaunchFailure for a divergent barrier or an exception in the
// kernel; last_error() then says what happened.
cudaError_t launch(const char* kernel_name, dim3 grid, dim3 block, size_t shared_bytes,
                   const std::function<void()>& body);
const std::string& last_error();

// Caps on the grid sizes the kernels choose (never above the GPU's).
struct GridLimits {
  unsigned flat_x = 65535u * 8;  // blocks of the grid-stride kernels
  unsigned z = 65535;            // images per launch of the tiled kernels
};
GridLimits& grid_limits();

}  // namespace stccl::emu

#define threadIdx (::stccl::emu::this_thread().thread_idx)
#define blockIdx (::stccl::emu::this_thread().block_idx)
#define blockDim (::stccl::emu::this_thread().block_dim)
#define gridDim (::stccl::emu::this_thread().grid_dim)
#define __syncthreads() ::stccl::emu::syncthreads(__FILE__, __LINE__)

// Not emulated: warp-level primitives and atomics would need lockstep warps
// and a memory model the emulator does not have. A kernel that uses one does
// not compile for the emulator ("use of deleted function").
template <typename... T> void __syncwarp(T...) = delete;
template <typename... T> void __shfl_sync(T...) = delete;
template <typename... T> void __shfl_up_sync(T...) = delete;
template <typename... T> void __shfl_down_sync(T...) = delete;
template <typename... T> void __shfl_xor_sync(T...) = delete;
template <typename... T> void __ballot_sync(T...) = delete;
template <typename... T> void __any_sync(T...) = delete;
template <typename... T> void __all_sync(T...) = delete;
template <typename... T> void atomicAdd(T...) = delete;
template <typename... T> void atomicCAS(T...) = delete;
template <typename... T> void atomicExch(T...) = delete;
template <typename... T> void atomicMax(T...) = delete;
template <typename... T> void atomicMin(T...) = delete;

// Device-side math the kernels use that host C++ spells differently.
template <typename T>
inline T min(T a, T b) { return std::min(a, b); }
template <typename T>
inline T max(T a, T b) { return std::max(a, b); }
