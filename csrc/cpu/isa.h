// Which CPU kernel build runs: the AVX2+FMA one where the processor has both,
// else the portable one. Chosen at run time, so one wheel serves every x86-64.
#pragma once

#include <string>
#include <vector>

namespace stccl::cpu {

std::vector<std::string> compiled_isas();
std::string active_isa();
// "auto", "avx2" or "generic"; raises for an unknown name or an AVX2 request on
// a processor without it.
void set_isa(const std::string& name);
bool use_avx2();

}  // namespace stccl::cpu
