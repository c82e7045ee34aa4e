// Per-warp memory accounting of emulated kernels: what a GPU's memory system
// would be asked for. Only the counting build (STCCL_EMU_COUNT_ACCESSES) has
// it: there the kernels' translation unit is compiled with
// -fsanitize=thread, whose instrumentation calls a hook on every load and
// store, and memory_traffic.cpp supplies those hooks instead of TSan's
// runtime. Other builds get the empty inline functions below.
//
// A warp is 32 consecutive threads of a block. Between two barriers, the n-th
// execution of one load or store instruction by each thread of a warp is one
// request (SIMT: the warp issues it once for its active lanes). Per request:
// - global memory: the distinct 32-byte sectors it touches, against the
//   ideal ceil(distinct addresses x access size / 32);
// - shared memory: the wavefronts it needs, the largest number of distinct
//   4-byte words that fall in one of the 32 banks, against the ideal
//   ceil(distinct words / 32).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace stccl::emu {
struct ThreadState;
}

namespace stccl::emu::memory_traffic {

struct Counts {
  uint64_t requests = 0, sectors = 0, ideal = 0;  // shared: sectors = wavefronts
  uint64_t bytes = 0;                             // requested by the threads
};

struct LaunchTraffic {
  std::string kernel;
  Counts load, store, shared_load, shared_store;
};

#if defined(STCCL_EMU_COUNT_ACCESSES)
void begin_launch(const char* kernel, const dim3& block);
void set_arena(const void* begin, size_t bytes);
void set_shared(const void* begin, size_t bytes);
void set_thread(const ThreadState* thread, const void* stack, size_t stack_bytes);
void end_of_phase();
void end_launch();
std::vector<LaunchTraffic> take();  // the launches since the last take()
constexpr bool enabled = true;
#else
inline void begin_launch(const char*, const dim3&) {}
inline void set_arena(const void*, size_t) {}
inline void set_shared(const void*, size_t) {}
inline void set_thread(const ThreadState*, const void*, size_t) {}
inline void end_of_phase() {}
inline void end_launch() {}
inline std::vector<LaunchTraffic> take() { return {}; }
constexpr bool enabled = false;
#endif

}  // namespace stccl::emu::memory_traffic
