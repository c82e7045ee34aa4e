#include "isa.h"

#include <atomic>

#include <c10/util/Exception.h>

namespace stccl::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<bool> force_generic{false};
std::atomic<LayoutChoice> forced_layout{LayoutChoice::Auto};

}  // namespace

std::vector<std::string> compiled_isas() {
#if defined(__x86_64__) || defined(__i386__)
  return {"avx2", "generic"};
#else
  return {"generic"};
#endif
}

bool use_avx2() {
  static const bool available = cpu_has_avx2_fma();
  return available && !force_generic.load();
}

std::string active_isa() { return use_avx2() ? "avx2" : "generic"; }

void set_isa(const std::string& name) {
  if (name == "generic") {
    force_generic = true;
  } else if (name == "auto" || name == "avx2") {
    TORCH_CHECK(name == "auto" || cpu_has_avx2_fma(),
                "stccl_ops: this processor has no AVX2+FMA");
    force_generic = false;
  } else {
    TORCH_CHECK(false, "stccl_ops: unknown CPU path '", name, "' (auto, avx2, generic)");
  }
}

LayoutChoice layout_choice() { return forced_layout.load(); }

void set_layout(const std::string& name) {
  if (name == "auto") forced_layout = LayoutChoice::Auto;
  else if (name == "rows") forced_layout = LayoutChoice::Rows;
  else if (name == "flat") forced_layout = LayoutChoice::Flat;
  else if (name == "pixels") forced_layout = LayoutChoice::Pixels;
  else TORCH_CHECK(false, "stccl_ops: unknown CPU layout '", name, "' (auto, rows, flat, pixels)");
}

}  // namespace stccl::cpu
