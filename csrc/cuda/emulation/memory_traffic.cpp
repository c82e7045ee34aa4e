// The counting build's accounting (see memory_traffic.h) and the
// instrumentation hooks it stands on.
#if defined(STCCL_EMU_COUNT_ACCESSES)

#include "memory_traffic.h"

#include <pthread.h>

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "emulator.h"

namespace stccl::emu::memory_traffic {
namespace {

struct Access {
  uintptr_t pc, addr;
  uint32_t size;
  bool write;
};

struct Range {
  uintptr_t begin = 0, end = 0;
  bool contains(uintptr_t a) const { return a >= begin && a < end; }
};

struct State {
  bool active = false;
  LaunchTraffic launch;
  unsigned threads = 0;
  std::vector<std::vector<Access>> logs;  // per thread of the block, this phase
  Range arena, shared, stack, host_stack;
  int thread = -1;  // linear index of the running thread, -1 outside kernels
  std::vector<LaunchTraffic> done;
};
State state;

Range range(const void* p, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  return {b, b + bytes};
}

Range current_stack() {
  pthread_attr_t attr;
  void* base = nullptr;
  size_t size = 0;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &base, &size);
  pthread_attr_destroy(&attr);
  return range(base, size);
}

void count_global(const std::vector<const Access*>& lanes, Counts& c) {
  std::set<uintptr_t> sectors, addresses;
  uint32_t size = 0;
  for (const Access* a : lanes) {
    for (uintptr_t s = a->addr >> 5; s <= (a->addr + a->size - 1) >> 5; ++s) sectors.insert(s);
    addresses.insert(a->addr);
    size = std::max(size, a->size);
    c.bytes += a->size;
  }
  c.requests += 1;
  c.sectors += sectors.size();
  c.ideal += (addresses.size() * size + 31) / 32;
}

void count_shared(const std::vector<const Access*>& lanes, Counts& c) {
  std::set<uintptr_t> words;
  for (const Access* a : lanes) {
    for (uintptr_t w = a->addr >> 2; w <= (a->addr + a->size - 1) >> 2; ++w) words.insert(w);
    c.bytes += a->size;
  }
  unsigned per_bank[32] = {};
  for (uintptr_t w : words) ++per_bank[w % 32];
  c.requests += 1;
  c.sectors += *std::max_element(per_bank, per_bank + 32);
  c.ideal += (words.size() + 31) / 32;
}

}  // namespace

void begin_launch(const char* kernel, const dim3& block) {
  state.active = true;
  state.launch = LaunchTraffic{kernel, {}, {}, {}, {}};
  state.threads = block.x * block.y * block.z;
  state.logs.assign(state.threads, {});
  state.host_stack = current_stack();
}

void set_arena(const void* begin, size_t bytes) { state.arena = range(begin, bytes); }
void set_shared(const void* begin, size_t bytes) { state.shared = range(begin, bytes); }

void set_thread(const ThreadState* thread, const void* stack, size_t stack_bytes) {
  if (thread == nullptr) {
    state.thread = -1;
    return;
  }
  const uint3& t = thread->thread_idx;
  const dim3& d = thread->block_dim;
  state.thread = int((t.z * d.y + t.y) * d.x + t.x);
  state.stack = range(stack, stack_bytes);
}

// Pairs the n-th execution of an instruction across the lanes of each warp.
void end_of_phase() {
  if (!state.active) return;
  for (unsigned w0 = 0; w0 < state.threads; w0 += 32) {
    std::map<std::pair<uintptr_t, uint64_t>, std::vector<const Access*>> requests;
    for (unsigned t = w0; t < std::min(w0 + 32, state.threads); ++t) {
      std::unordered_map<uintptr_t, uint64_t> executions;
      for (const Access& a : state.logs[t])
        requests[{a.pc, executions[a.pc]++}].push_back(&a);
    }
    for (const auto& [key, lanes] : requests) {
      const Access& first = *lanes.front();
      if (state.shared.contains(first.addr)) {
        count_shared(lanes, first.write ? state.launch.shared_store : state.launch.shared_load);
      } else {
        count_global(lanes, first.write ? state.launch.store : state.launch.load);
      }
    }
  }
  for (auto& log : state.logs) log.clear();
}

void end_launch() {
  if (!state.active) return;
  end_of_phase();
  state.active = false;
  state.thread = -1;
  state.done.push_back(state.launch);
}

std::vector<LaunchTraffic> take() {
  std::vector<LaunchTraffic> out;
  out.swap(state.done);
  return out;
}

namespace {
// Kernel code touches global memory, shared memory, its own stack, the
// launch's parameters on the host stack and the emulator's per-thread state
// (the arena); only the first two are device memory traffic.
inline void record(void* pc, const void* p, uint32_t size, bool write) {
  if (state.thread < 0) return;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (state.stack.contains(addr) || state.host_stack.contains(addr) ||
      state.arena.contains(addr))
    return;
  state.logs[state.thread].push_back({reinterpret_cast<uintptr_t>(pc), addr, size, write});
}
}  // namespace

}  // namespace stccl::emu::memory_traffic

// The hooks -fsanitize=thread instrumentation calls (only the kernels'
// translation unit is instrumented in the counting build).
#define STCCL_HOOKS(size)                                                                     \
  extern "C" void __tsan_read##size(void* p) {                                               \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, false);         \
  }                                                                                           \
  extern "C" void __tsan_write##size(void* p) {                                              \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, true);          \
  }                                                                                           \
  extern "C" void __tsan_unaligned_read##size(void* p) {                                     \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, false);         \
  }                                                                                           \
  extern "C" void __tsan_unaligned_write##size(void* p) {                                    \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, true);          \
  }                                                                                           \
  extern "C" void __tsan_volatile_read##size(void* p) {                                      \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, false);         \
  }                                                                                           \
  extern "C" void __tsan_volatile_write##size(void* p) {                                     \
    stccl::emu::memory_traffic::record(__builtin_return_address(0), p, size, true);          \
  }
STCCL_HOOKS(1)
STCCL_HOOKS(2)
STCCL_HOOKS(4)
STCCL_HOOKS(8)
STCCL_HOOKS(16)
#undef STCCL_HOOKS
extern "C" void __tsan_read_range(void* p, unsigned long size) {
  stccl::emu::memory_traffic::record(__builtin_return_address(0), p, uint32_t(size), false);
}
extern "C" void __tsan_write_range(void* p, unsigned long size) {
  stccl::emu::memory_traffic::record(__builtin_return_address(0), p, uint32_t(size), true);
}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" void __tsan_vptr_update(void**, void*) {}

#endif  // STCCL_EMU_COUNT_ACCESSES
