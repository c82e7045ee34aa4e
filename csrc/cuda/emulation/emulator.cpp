// The emulator's runtime: launches, the two schedulers of a block's threads
// (fibers, or OS threads under ThreadSanitizer), barriers, and the per-warp
// memory accounting of the counting build. See emulator.h for the model.

// Fibers switch stacks with _longjmp; glibc's fortified longjmp would take a
// jump to another stack for stack corruption.
#undef _FORTIFY_SOURCE
#include "emulator.h"

#include <pthread.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include "memory_traffic.h"

namespace stccl::emu {
namespace {

#if defined(__SANITIZE_THREAD__)
constexpr bool OS_THREADS = true;  // TSan sees real threads and real barriers
#else
constexpr bool OS_THREADS = false;
#endif
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t FIBER_STACK = 256 * 1024;  // ASan's redzones grow the frames
#else
constexpr size_t FIBER_STACK = 128 * 1024;
#endif
constexpr unsigned BLOCKS_IN_FLIGHT = 2;  // OS threads: two blocks race each other
constexpr size_t MAX_SHARED = 48 * 1024;  // dynamic shared memory without opt-in

thread_local ThreadState* current = nullptr;
thread_local std::string error_message;

// A place in the kernel where threads wait: a __syncthreads() call, or the
// kernel's end (file == nullptr).
struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const {
    return line == o.line && (file == o.file || (file && o.file && !std::strcmp(file, o.file)));
  }
  std::string str() const {
    if (file == nullptr) return "the end of the kernel";
    return "__syncthreads() at " + std::string(file) + ":" + std::to_string(line);
  }
};

struct LaunchFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Aborted {};  // unwinds the other threads of a failed block

std::string block_str(const uint3& b) {
  return "(" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) + ")";
}

uint3 unflatten(uint64_t i, const dim3& d) {
  return {unsigned(i % d.x), unsigned(i / d.x % d.y), unsigned(i / (uint64_t(d.x) * d.y))};
}

struct SharedMemory {  // one block's dynamic shared memory, exactly `bytes` long
  explicit SharedMemory(size_t bytes) : bytes(bytes) {}
  void renew() {  // a fresh allocation per block: an overrun hits a redzone
    data.reset(static_cast<unsigned char*>(std::malloc(std::max<size_t>(bytes, 1))));
    if (!data) throw std::bad_alloc();
    std::memset(data.get(), 0xFF, bytes);
  }
  size_t bytes;
  std::unique_ptr<unsigned char, decltype(&std::free)> data{nullptr, &std::free};
};

std::string divergence(const uint3& block, const Site& a, const Site& b) {
  return "__syncthreads() divergence in block " + block_str(block) + ": some threads wait at " +
         a.str() + ", others at " + b.str() +
         " (every thread of a block must reach the same barriers)";
}

// ------------------------------------------------------------- fiber scheduler

// Fiber stacks, mapped once per OS thread and reused by every launch: a fresh
// 128 MiB of stacks per launch would dominate the run time under ASan.
class StackPool {
 public:
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, FIBER_STACK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      stacks_.push_back(static_cast<char*>(p));
    }
    return stacks_[i];
  }
  ~StackPool() {
    for (char* p : stacks_) munmap(p, FIBER_STACK);
  }

 private:
  std::vector<char*> stacks_;
};
thread_local StackPool stack_pool;

// A block's threads are fibers that live for the whole launch: each runs the
// kernel for one block after another, and the end of a block's body is a
// yield like a barrier. Switches are _setjmp/_longjmp (no system call); a
// fiber is entered through its ucontext once per launch. Under ASan every
// switch is a swapcontext with ASan's fiber annotations.
struct Fiber {
  ThreadState state;
  ucontext_t context;  // its entry, then (ASan) where it yielded
  jmp_buf yielded;     // where it yielded
  char* stack = nullptr;
  Site site;
  bool started = false, done = false;
  std::exception_ptr error;
  void* fake_stack = nullptr;  // ASan's bookkeeping of the stack switch
};

struct FiberBlock {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf scheduler_point;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  bool aborting = false;
  const void* scheduler_stack = nullptr;  // for ASan's switch annotations
  size_t scheduler_stack_size = 0;
};
thread_local FiberBlock* fiber_block = nullptr;

void yield_to_scheduler(Fiber& f) {
  FiberBlock& block = *fiber_block;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&f.fake_stack, block.scheduler_stack, block.scheduler_stack_size);
  swapcontext(&f.context, &block.scheduler);
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#else
  if (_setjmp(f.yielded) == 0) _longjmp(block.scheduler_point, 1);
#endif
}

void fiber_main() {
  FiberBlock& block = *fiber_block;
  Fiber& f = *block.running;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &block.scheduler_stack, &block.scheduler_stack_size);
#endif
  for (;;) {  // one block per pass; the scheduler stops resuming after the last
    try {
      (*block.body)();
    } catch (const Aborted&) {
    } catch (...) {
      f.error = std::current_exception();
    }
    f.site = Site{};
    f.done = true;
    yield_to_scheduler(f);
  }
}

void resume(FiberBlock& block, Fiber& f) {
  block.running = &f;
  current = &f.state;
  memory_traffic::set_thread(&f.state, f.stack, FIBER_STACK);
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, FIBER_STACK);
  swapcontext(&block.scheduler, &f.context);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  if (_setjmp(block.scheduler_point) == 0) {
    if (f.started) _longjmp(f.yielded, 1);
    f.started = true;
    setcontext(&f.context);
  }
#endif
  f.started = true;
  current = nullptr;
  memory_traffic::set_thread(nullptr, nullptr, 0);
}

// Runs the block's fibers a barrier at a time: each runs until it waits or
// ends; then all must stand at the same site.
void run_block_fibers(FiberBlock& block, const uint3& block_idx) {
  for (Fiber& f : block.fibers) {
    f.state.block_idx = block_idx;
    f.done = false;
    f.site = Site{};
  }
  block.aborting = false;
  for (;;) {
    for (Fiber& f : block.fibers)
      if (!f.done) resume(block, f);
    memory_traffic::end_of_phase();
    for (Fiber& f : block.fibers)
      if (f.error) std::rethrow_exception(f.error);
    const Site site = block.fibers[0].site;
    for (Fiber& f : block.fibers) {
      if (!(f.site == site)) {
        const std::string why = divergence(block_idx, site, f.site);
        block.aborting = true;  // let the waiting fibers unwind
        for (Fiber& g : block.fibers)
          if (!g.done) resume(block, g);
        throw LaunchFailure(why);
      }
    }
    if (site.file == nullptr) return;  // every thread ended
  }
}

void run_fibers(const dim3& grid, const dim3& block_dim, size_t shared_bytes,
                const std::function<void()>& body) {
  FiberBlock block;
  block.body = &body;
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  block.fibers.resize(threads);
  SharedMemory shared(shared_bytes);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    f.stack = stack_pool.get(t);
    f.state.thread_idx = unflatten(t, block_dim);
    f.state.block_dim = block_dim;
    f.state.grid_dim = grid;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = FIBER_STACK;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  memory_traffic::set_arena(block.fibers.data(), block.fibers.size() * sizeof(Fiber));
  FiberBlock* outer = fiber_block;
  fiber_block = &block;
  struct Restore {
    FiberBlock* outer;
    ~Restore() { fiber_block = outer; }
  } restore{outer};
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t b = 0; b < blocks; ++b) {
    shared.renew();
    for (Fiber& f : block.fibers) f.state.shared = shared.data.get();
    memory_traffic::set_shared(shared.data.get(), shared_bytes);
    run_block_fibers(block, unflatten(b, grid));
  }
}

// The barrier the fibers get from __syncthreads().
void fiber_barrier(const Site& site) {
  FiberBlock& block = *fiber_block;
  Fiber& f = *block.running;
  f.site = site;
  yield_to_scheduler(f);
  if (block.aborting) throw Aborted{};
}

// ---------------------------------------------------------- OS-thread scheduler

// All threads of a block meet here; every arrival names its site, and a
// mismatch breaks the barrier for everyone.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}

  // Returns true for the one thread that completed the round.
  bool arrive_and_wait(const Site& site, const uint3& block) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (broken_) throw Aborted{};
    if (arrived_ == 0) {
      site_ = site;
    } else if (!(site == site_)) {
      fail(divergence(block, site_, site));
      throw Aborted{};
    }
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    const uint64_t generation = generation_;
    cv_.wait(lock, [&] { return generation_ != generation || broken_; });
    if (broken_) throw Aborted{};
    return false;
  }

  void fail(const std::string& why) {  // with mutex_ held; the first error wins
    if (!broken_) error_ = why;
    broken_ = true;
    cv_.notify_all();
  }
  void fail_locked(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    fail(why);
  }
  bool broken() {
    std::lock_guard<std::mutex> lock(mutex_);
    return broken_;
  }
  std::string error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_, arrived_ = 0;
  uint64_t generation_ = 0;
  Site site_;
  bool broken_ = false;
  std::string error_;
};

struct ThreadGroup {
  ThreadGroup(unsigned threads, size_t shared_bytes) : barrier(threads), shared(shared_bytes) {
    shared.renew();
  }
  Barrier barrier;
  SharedMemory shared;
  uint3 block_idx{0, 0, 0};
};
thread_local ThreadGroup* thread_group = nullptr;

void run_os_threads(const dim3& grid, const dim3& block_dim, size_t shared_bytes,
                    const std::function<void()>& body) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const unsigned groups = unsigned(std::min<uint64_t>(BLOCKS_IN_FLIGHT, blocks));
  std::vector<std::unique_ptr<ThreadGroup>> group(groups);
  for (auto& g : group) g = std::make_unique<ThreadGroup>(threads, shared_bytes);
  std::vector<std::thread> pool;
  for (unsigned gi = 0; gi < groups; ++gi) {
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, gi, t] {
        ThreadGroup& g = *group[gi];
        ThreadState state;
        state.thread_idx = unflatten(t, block_dim);
        state.block_dim = block_dim;
        state.grid_dim = grid;
        state.shared = g.shared.data.get();
        current = &state;
        thread_group = &g;
        for (uint64_t b = gi; b < blocks; b += groups) {
          state.block_idx = unflatten(b, grid);
          try {
            body();
            // The last thread out renews shared memory for the next block.
            if (g.barrier.arrive_and_wait(Site{}, state.block_idx)) {
              std::memset(g.shared.data.get(), 0xFF, shared_bytes);
            }
            // ... and everyone waits for it before starting that block.
            g.barrier.arrive_and_wait(Site{}, state.block_idx);
          } catch (const Aborted&) {
            break;
          } catch (const std::exception& e) {
            g.barrier.fail_locked(e.what());
            break;
          }
        }
        current = nullptr;
      });
    }
  }
  for (auto& th : pool) th.join();
  for (auto& g : group)
    if (g->barrier.broken()) throw LaunchFailure(g->barrier.error());
}

cudaError_t check_configuration(const dim3& grid, const dim3& block, size_t shared_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    error_message = "invalid block of " + std::to_string(block.x) + " x " +
                    std::to_string(block.y) + " x " + std::to_string(block.z) + " threads";
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    error_message = "invalid grid of " + block_str({grid.x, grid.y, grid.z}) + " blocks";
    return cudaErrorInvalidConfiguration;
  }
  if (shared_bytes > MAX_SHARED) {
    error_message = std::to_string(shared_bytes) + " bytes of dynamic shared memory asked for, " +
                    "more than the " + std::to_string(MAX_SHARED) + " a launch may have";
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

ThreadState& this_thread() {
  if (current == nullptr) throw std::logic_error("stccl emulator: a device function ran outside a kernel");
  return *current;
}

void syncthreads(const char* file, int line) {
  if (OS_THREADS) {
    thread_group->barrier.arrive_and_wait(Site{file, line}, current->block_idx);
  } else {
    fiber_barrier(Site{file, line});
  }
}

cudaError_t launch(const char* kernel_name, dim3 grid, dim3 block, size_t shared_bytes,
                   const std::function<void()>& body) {
  error_message.clear();
  const cudaError_t config = check_configuration(grid, block, shared_bytes);
  if (config != cudaSuccess) {
    error_message = std::string(kernel_name) + ": " + error_message;
    return config;
  }
  memory_traffic::begin_launch(kernel_name, block);
  try {
    if (OS_THREADS) {
      run_os_threads(grid, block, shared_bytes, body);
    } else {
      run_fibers(grid, block, shared_bytes, body);
    }
  } catch (const std::exception& e) {
    memory_traffic::end_launch();
    error_message = std::string(kernel_name) + ": " + e.what();
    return cudaErrorLaunchFailure;
  }
  memory_traffic::end_launch();
  return cudaSuccess;
}

const std::string& last_error() { return error_message; }

GridLimits& grid_limits() {
  static GridLimits limits;
  return limits;
}

}  // namespace stccl::emu
