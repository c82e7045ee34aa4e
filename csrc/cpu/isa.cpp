#include "isa.h"

#include <atomic>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace stccl::cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::Generic: return true;
    case Isa::Avx2: return avx2;
    case Isa::Avx512:
#if defined(__x86_64__)
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
      return false;
#endif
  }
  return false;
#else
  return isa == Isa::Generic;
#endif
}

constexpr Isa ALL_ISAS[] = {Isa::Avx512, Isa::Avx2, Isa::Generic};

bool compiled(Isa isa) {
#if defined(__x86_64__)
  return true;
#elif defined(__i386__)
  return isa != Isa::Avx512;
#else
  return isa == Isa::Generic;
#endif
}

Isa best_isa() {
  for (Isa isa : ALL_ISAS)
    if (compiled(isa) && cpu_has(isa)) return isa;
  return Isa::Generic;
}

// The build set_isa forced, or -1 for the best one.
std::atomic<int> forced_isa{-1};
std::atomic<LayoutChoice> forced_layout{LayoutChoice::Auto};

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (Isa isa : ALL_ISAS)
    if (compiled(isa)) names.push_back(isa_name(isa));
  return names;
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  for (Isa isa : ALL_ISAS)
    if (compiled(isa) && cpu_has(isa)) names.push_back(isa_name(isa));
  return names;
}

Isa active_isa() {
  static const Isa best = best_isa();
  const int forced = forced_isa.load();
  return forced < 0 ? best : static_cast<Isa>(forced);
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    forced_isa = -1;
    return;
  }
  for (Isa isa : ALL_ISAS) {
    if (name != isa_name(isa) || !compiled(isa)) continue;
    TORCH_CHECK(cpu_has(isa), "stccl_ops: this processor cannot run the '", name,
                "' CPU path (it can run: ", c10::Join(", ", runnable_isas()), ")");
    forced_isa = static_cast<int>(isa);
    return;
  }
  TORCH_CHECK(false, "stccl_ops: unknown CPU path '", name, "' (auto, ",
              c10::Join(", ", compiled_isas()), ")");
}

bool wide_vectors_pay(int64_t W, int64_t lanes) {
  const int64_t half = lanes / 2;
  const int64_t wide = (W + lanes - 1) / lanes * lanes, narrow = (W + half - 1) / half * half;
  return W <= FLAT_MAX_W || 4 * wide < 5 * narrow;
}

Isa isa_for_call(int64_t W, int64_t acc_bytes) {
  const Isa isa = active_isa();
  if (isa != Isa::Avx512 || forced_isa.load() >= 0) return isa;
  return wide_vectors_pay(W, 64 / acc_bytes) ? Isa::Avx512 : Isa::Avx2;
}

LayoutChoice layout_choice() { return forced_layout.load(); }

void set_layout(const std::string& name) {
  if (name == "auto") forced_layout = LayoutChoice::Auto;
  else if (name == "rows") forced_layout = LayoutChoice::Rows;
  else if (name == "flat") forced_layout = LayoutChoice::Flat;
  else if (name == "groups") forced_layout = LayoutChoice::Groups;
  else if (name == "pixels") forced_layout = LayoutChoice::Pixels;
  else
    TORCH_CHECK(false, "stccl_ops: unknown CPU layout '", name,
                "' (auto, rows, flat, groups, pixels)");
}

}  // namespace stccl::cpu
