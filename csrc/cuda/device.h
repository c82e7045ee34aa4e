// What the kernels of csrc/cuda/ see of the device, in one place, so that the
// same source builds two ways: with nvcc for the GPU, and as host C++ under
// the emulator (STCCL_CUDA_EMULATION, see emulation/emulator.h) for the
// cuda_emulated backend, its sanitizer runs and its memory accounting.
#pragma once

#include "launch.h"

#if defined(STCCL_CUDA_EMULATION)
#include <tuple>

#include "emulation/emulator.h"
#endif

namespace stccl::cuda {

// Every kernel launch of the package: kernel(args...) on grid x block threads
// with shared_bytes of dynamic shared memory. The arguments are converted to
// the kernel's parameter types as a <<<>>> launch converts them.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block,
                          size_t shared_bytes, cudaStream_t stream, Args... args) {
#if defined(STCCL_CUDA_EMULATION)
  (void)stream;  // blocks run in order on the calling thread
  const std::tuple<Params...> params(args...);
  return emu::launch(name, grid, block, shared_bytes, [&] { std::apply(kernel, params); });
#else
  (void)name;
  kernel<<<grid, block, shared_bytes, stream>>>(Params(args)...);
  return cudaGetLastError();
#endif
}

// The block's dynamic shared memory (the size given at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
#if defined(STCCL_CUDA_EMULATION)
  return emu::this_thread().shared;
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

// The most blocks the kernels put on a grid's z axis (images of the tiled
// kernels) and on the x axis of the grid-stride kernels; larger problems loop.
inline unsigned max_grid_z() {
#if defined(STCCL_CUDA_EMULATION)
  return emu::grid_limits().z;
#else
  return 65535;
#endif
}
inline unsigned max_flat_blocks() {
#if defined(STCCL_CUDA_EMULATION)
  return emu::grid_limits().flat_x;
#else
  return 65535u * 8;
#endif
}

}  // namespace stccl::cuda
