// Checks of the CUDA emulator itself (csrc/cuda/emulation/) on small kernels
// with known answers: barriers, divergence detection, shared memory, launch
// limits and, in the counting build, the per-warp memory accounting.
// Built and run by tests/test_cuda_emulator.py; prints one line per check and
// exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/cuda/device.h"
#include "../../csrc/cuda/emulation/memory_traffic.h"

using stccl::cuda::dynamic_shared_memory;
using stccl::cuda::launch_kernel;
namespace emu = stccl::emu;

namespace {

int failures = 0;
void check(bool ok, const char* what, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail.empty() ? "" : ": ",
              detail.c_str());
  failures += !ok;
}

// Each block reverses its slice through shared memory: needs the barrier.
__global__ void reverse_blocks(const float* in, float* out) {
  float* tile = reinterpret_cast<float*>(dynamic_shared_memory());
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  tile[t] = in[base + t];
  __syncthreads();
  out[base + t] = tile[blockDim.x - 1 - t];
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void read_shared_unwritten(float* out) {
  out[threadIdx.x] = reinterpret_cast<float*>(dynamic_shared_memory())[threadIdx.x];
}

// One warp: a coalesced load, a load strided by 32 floats (a sector per lane),
// a broadcast, and shared stores without and with 32-way bank conflicts.
__global__ void access_patterns(const float* in, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_shared_memory());
  const int t = threadIdx.x;
  const float coalesced = in[t];
  const float strided = in[32 * t];
  const float broadcast = in[0];
  s[t] = coalesced;
  s[32 * t] = strided;
  out[t] = broadcast;
}

}  // namespace

int main() {
  {
    std::vector<float> in(4 * 64), out(in.size());
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i);
    const cudaError_t err = launch_kernel(reverse_blocks, "reverse_blocks", dim3(4), dim3(64),
                                          64 * sizeof(float), nullptr, in.data(), out.data());
    bool ok = err == cudaSuccess;
    for (int b = 0; b < 4; ++b)
      for (int t = 0; t < 64; ++t) ok = ok && out[b * 64 + t] == in[b * 64 + 63 - t];
    check(ok, "barrier orders a block's shared-memory exchange", emu::last_error());
  }
  {
    std::vector<float> out(64);
    cudaError_t err = launch_kernel(divergent_barrier, "divergent_barrier", dim3(1), dim3(64), 0,
                                    nullptr, out.data());
    check(err == cudaErrorLaunchFailure &&
              emu::last_error().find("divergence") != std::string::npos,
          "a barrier reached by half the block is a launch failure", emu::last_error());
    err = launch_kernel(exit_before_barrier, "exit_before_barrier", dim3(2), dim3(64), 0,
                        nullptr, out.data());
    check(err == cudaErrorLaunchFailure &&
              emu::last_error().find("the end of the kernel") != std::string::npos,
          "a thread that exits before a barrier is a launch failure", emu::last_error());
  }
  {
    std::vector<float> out(32, 0.0f);
    const cudaError_t err = launch_kernel(read_shared_unwritten, "read_shared_unwritten", dim3(1),
                                          dim3(32), 32 * sizeof(float), nullptr, out.data());
    bool nan = err == cudaSuccess;
    for (float v : out) nan = nan && std::isnan(v);
    check(nan, "unwritten shared memory reads as NaN");
  }
  {
    std::vector<float> out(64);
    check(launch_kernel(reverse_blocks, "too_many_threads", dim3(1), dim3(2048), 0, nullptr,
                        out.data(), out.data()) == cudaErrorInvalidConfiguration,
          "a block of 2048 threads is refused");
    check(launch_kernel(reverse_blocks, "grid_y", dim3(1, 65536), dim3(32), 0, nullptr,
                        out.data(), out.data()) == cudaErrorInvalidConfiguration,
          "a grid y of 65536 is refused");
    check(launch_kernel(reverse_blocks, "shared", dim3(1), dim3(32), 48 * 1024 + 1, nullptr,
                        out.data(), out.data()) == cudaErrorInvalidValue,
          "more than 48 KiB of dynamic shared memory is refused");
  }
#if defined(STCCL_EMU_COUNT_ACCESSES)
  {
    namespace mt = emu::memory_traffic;
    mt::take();
    alignas(256) static float in[32 * 32], out[32];  // GPU allocations are 256-byte aligned
    launch_kernel(access_patterns, "access_patterns", dim3(1), dim3(32), 32 * 32 * sizeof(float),
                  nullptr, in, out);
    const auto launches = mt::take();
    const bool one = launches.size() == 1;
    const mt::LaunchTraffic t = one ? launches[0] : mt::LaunchTraffic{};
    // loads: coalesced 4 sectors (ideal 4), strided 32 (ideal 4), broadcast 1 (ideal 1)
    check(one && t.load.requests == 3 && t.load.sectors == 37 && t.load.ideal == 9,
          "global loads: 3 requests, 4 + 32 + 1 sectors, ideal 4 + 4 + 1",
          std::to_string(t.load.requests) + " requests, " + std::to_string(t.load.sectors) +
              " sectors, ideal " + std::to_string(t.load.ideal));
    check(t.store.requests == 1 && t.store.sectors == 4 && t.store.ideal == 4,
          "global store: 1 request, 4 sectors");
    // shared stores: consecutive words 1 wavefront; stride 32 words: 32 in one bank
    check(t.shared_store.requests == 2 && t.shared_store.sectors == 33 &&
              t.shared_store.ideal == 2,
          "shared stores: 1 and 32 wavefronts, ideal 1 and 1",
          std::to_string(t.shared_store.sectors) + " wavefronts, ideal " +
              std::to_string(t.shared_store.ideal));
  }
#endif
  return failures == 0 ? 0 : 1;
}
