// The CPU kernels of the ops of csrc/ops.h: the passes of the processor's
// vector build (see isa.h and vector_passes.h) behind the entry points, and
// the allocation of their results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <tuple>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../entry_points.h"
#include "isa.h"
#include "passes.h"

namespace stccl::cpu {
namespace {

// Results (see passes.h) of CACHED_RESULT_BYTES and more are kept when freed
// for the next result of the same size (a training loop asks for the same
// sizes every step), up to STCCL_RESULT_CACHE_MB MiB in all (default 1024; 0
// keeps none), past which they go back to the system. glibc serves blocks
// that large with a fresh mmap, or from the top of its heap, which it may give
// back at free: then the next call's result is faulted in and zeroed by the
// operating system again, page by page as the kernels first write it (S1's
// forward+backward took 260 page faults a call, T1's 195, S1 in bfloat16
// 131: 0.25-0.4 ms of system time; none with the cache).
// Results of HUGE_PAGE_RESULT_BYTES and more go further: with 4 KiB pages the
// faults of their first use cost more than the kernel (outputs of tens of
// MiB) and with huge pages the zeroing (clear_page) still took 40% of the
// forward of a 49 MiB output on a 2-core VM. So these results are allocated
// on huge-page boundaries, asked for transparent huge pages (where the system
// leaves that to madvise) and faulted in before the kernels run, a share of
// the huge pages per thread (the kernels' tasks write every offset plane of a
// band, so each huge page was first touched by whichever thread came first
// while the others waited on it).
constexpr int64_t CACHED_RESULT_BYTES = 128 << 10, HUGE_PAGE_RESULT_BYTES = 32 << 20;
constexpr size_t PAGE = 4096, HUGE_PAGE = 2 << 20;

class ResultCache {
 public:
  // Never destroyed: results may be freed while the process exits.
  static ResultCache& instance() {
    static ResultCache* cache = new ResultCache();
    return *cache;
  }
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto block = blocks_.find(bytes);
    if (block == blocks_.end()) return nullptr;
    void* data = block->second;
    blocks_.erase(block);
    cached_bytes_ -= bytes;
    return data;
  }
  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        blocks_.emplace(bytes, data);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

 private:
  ResultCache() {
    const char* mib = std::getenv("STCCL_RESULT_CACHE_MB");
    limit_bytes_ = size_t(mib != nullptr ? std::max(0L, std::atol(mib)) : 1024L) << 20;
  }
  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> blocks_;
  size_t cached_bytes_ = 0, limit_bytes_ = 0;
};

}  // namespace

at::Tensor result(at::IntArrayRef shape, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = c10::multiply_integers(shape) * options.dtype().itemsize();
  if (bytes < CACHED_RESULT_BYTES) return at::empty(shape, options);
  const bool huge = bytes >= HUGE_PAGE_RESULT_BYTES;
  const size_t granule = huge ? HUGE_PAGE : PAGE;
  const size_t block_bytes = (size_t(bytes) + granule - 1) / granule * granule;
  void* data = ResultCache::instance().take(block_bytes);
  if (data == nullptr) {
    data = std::aligned_alloc(granule, block_bytes);
    TORCH_CHECK(data != nullptr, "stccl_ops: out of memory allocating a result of ", bytes,
                " bytes");
    if (huge && madvise(data, block_bytes, MADV_HUGEPAGE) == 0) {
      volatile char* pages = static_cast<char*>(data);
      at::parallel_for(0, int64_t(block_bytes / HUGE_PAGE), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t page = lo; page < hi; ++page) pages[page * HUGE_PAGE] = 0;
      });
    }
  }
  return at::from_blob(
      data, shape, [block_bytes](void* block) { ResultCache::instance().give(block, block_bytes); },
      options);
#else
  return at::empty(shape, options);
#endif
}

namespace {

// The passes of the build that runs a call on `operand` (images in its last
// two dimensions), see isa_for_call.
const Passes& passes_for(const at::Tensor& operand) {
#if defined(__x86_64__)
  const int64_t acc_bytes = operand.scalar_type() == at::kDouble ? 8 : 4;
  if (isa_for_call(operand.size(-1), acc_bytes) == Isa::Avx512) return passes<64>();
#endif
  return passes<32>();
}

// Each entry point of the backend: the passes for its argument number
// OPERAND (a, v, or for the backward a's image width), called with all of
// them.
#define STCCL_CPU_PASS(name, OPERAND)                                      \
  template <typename... Args>                                              \
  static auto name(const Args&... args) {                                  \
    return passes_for(std::get<OPERAND>(std::tie(args...))).name(args...); \
  }
struct Cpu {
  STCCL_CPU_PASS(forward, 0)
  STCCL_CPU_PASS(temporal_forward, 0)
  STCCL_CPU_PASS(backward, 1)
  STCCL_CPU_PASS(temporal_backward, 1)
  STCCL_CPU_PASS(spatiotemporal_forward, 0)
  STCCL_CPU_PASS(spatiotemporal_backward, 2)
};
#undef STCCL_CPU_PASS

}  // namespace

TORCH_LIBRARY_IMPL(stccl_ops, CPU, m) { EntryPoints<Cpu>::kernels(m); }

}  // namespace stccl::cpu
