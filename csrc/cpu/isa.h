// Which CPU kernel build runs: the AVX-512 one (64-byte vectors) where the
// processor has AVX-512 F, VL, BW and DQ, else the AVX2+FMA one where it has
// both, else the portable one. Chosen at run time, so one wheel serves every
// x86-64.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace stccl::cpu {

enum class Isa { Generic, Avx2, Avx512 };

// The builds compiled in, and of those the ones this processor can run (by
// name, best first).
std::vector<std::string> compiled_isas();
std::vector<std::string> runnable_isas();
Isa active_isa();
std::string isa_name(Isa isa);
// "auto" or one of compiled_isas(); raises for an unknown name or a build this
// processor cannot run.
void set_isa(const std::string& name);

// The rule between the AVX-512 and AVX2 builds, measured in
// docs/cpu_kernels.md: rows of W values are swept in whole vectors, of `lanes`
// values with 64-byte vectors or lanes / 2 with 32-byte ones. Only where the
// wide ones take a quarter more lanes or worse (W = 17-24 floats: 32 against
// 24) is the AVX2 build faster (1.07-1.13x on K = 3); at W = 56 (64 against
// 56) the two tie on K = 3 and AVX-512 wins from K = 5 (its row groups of
// three). The flat layout's images are one long row, and so are rows of up to
// FLAT_MAX_W that it takes.
bool wide_vectors_pay(int64_t W, int64_t lanes);
// The build that runs a call on images W wide whose accumulation type has
// acc_bytes: the forced one, else the processor's best by the rule above.
Isa isa_for_call(int64_t W, int64_t acc_bytes);

// The layout of the CPU kernels' bands (see Layout in staging.h): chosen per
// call by its rule (Auto), or forced (for tests; an operand that cannot be
// read flat still gets rows).
// Pixels: the backward's pixel gather wherever it can run (see
// pixel_gather_pays), rows or flat by the rule for the rest. Flat: without
// the forward's row groups (see row_groups_pay); Groups: flat, with them
// wherever they can run.
enum class LayoutChoice { Auto, Rows, Flat, Groups, Pixels };
LayoutChoice layout_choice();
// "auto", "rows", "flat", "groups" or "pixels"; raises for an unknown name.
void set_layout(const std::string& name);

// The passes a layout serves: a forward, a backward, and a clip's fused
// forward and backward (whose temporal and spatial windows share one staging
// of the bands, so that their layouts may not depend on the window).
enum class Pass { Forward, ClipForward, Backward, ClipBackward };

// The rule of LayoutChoice::Auto, measured in docs/cpu_kernels.md: flat for
// rows of at most FLAT_MAX_W values, on images of at most FLAT_MAX_PIXELS
// (the forwards: FLAT_MAX_FORWARD_PIXELS). Past those the rows' vectors are
// mostly full and flat loses the forward's row pairs (one load of b for two
// rows' FMAs) and, on larger images, the backward's short weight buffers.
// A window of at most FLAT_SMALL_WINDOW_K also goes flat on images of any
// width, given at least FLAT_MIN_CHANNELS channels and an image per thread
// (flat has one task per image): the forward up to
// FLAT_MAX_SMALL_WINDOW_PIXELS (its window blocks hold all nine sums; rows
// pay a halo and a partly empty vector per row), the backward while a
// channel's image takes at most FLAT_MAX_SMALL_WINDOW_BACKWARD_BYTES in the
// inputs' type (3600 pixels of a half type, 1800 of float32, 900 of float64:
// flat stages and converts whole images in one run, rows a band at a time
// with its halo, and flat's staged chunk outgrows the caches on larger
// images). Both passes' results are bitwise the same in either layout, so
// reading the thread count leaves them independent of it. Not a clip's
// fused passes: flat images of that size no longer fit their whole-band
// staging.
constexpr int64_t FLAT_MAX_W = 16, FLAT_MAX_PIXELS = 512, FLAT_MAX_FORWARD_PIXELS = 256;
constexpr int64_t FLAT_SMALL_WINDOW_K = 3, FLAT_MAX_SMALL_WINDOW_PIXELS = 3600,
                  FLAT_MAX_SMALL_WINDOW_BACKWARD_BYTES = 7200, FLAT_MIN_CHANNELS = 16;
inline bool flat_pays(Pass pass, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                      int64_t element_bytes, int64_t threads) {
  if (K <= FLAT_SMALL_WINDOW_K && C >= FLAT_MIN_CHANNELS && N >= threads) {
    if (pass == Pass::Forward && H * W <= FLAT_MAX_SMALL_WINDOW_PIXELS) return true;
    if (pass == Pass::Backward && H * W * element_bytes <= FLAT_MAX_SMALL_WINDOW_BACKWARD_BYTES)
      return true;
  }
  const bool backward = pass == Pass::Backward || pass == Pass::ClipBackward;
  return W <= FLAT_MAX_W && H * W <= (backward ? FLAT_MAX_PIXELS : FLAT_MAX_FORWARD_PIXELS);
}

// The flat forward of a 3 x 3 window (dilation 1) takes output rows in
// groups of three in the AVX-512 builds (correlate_row_groups): each row's x
// vectors start at its first pixel, so the vectors past a row's end are
// partly empty, and the groups pay where at most an eighth of the lanes is
// lost (with 16 lanes W of 14 to 16, 28 to 32, 42 to 48, 56 to 64, ...).
// Measured in docs/cpu_kernels.md: 14, 28 and 56 gained, 12, 24 and 40 lost
// or tied.
inline bool row_groups_pay(int64_t W, int64_t K, int64_t dilation, int64_t lanes) {
  const int64_t padded = (W + lanes - 1) / lanes * lanes;
  return K == 3 && dilation == 1 && W >= 1 && 8 * W >= 7 * padded;
}

// The backward's pixel gather (every channel's sum in a register, see
// backward.h) takes at most PIXEL_GATHER_MAX_CHANNELS (it stages a band of
// every channel at once); the rule of LayoutChoice::Auto, measured in
// docs/cpu_kernels.md, picks it for few channels, where the chunked gather's
// per-offset weight buffers cost more than its channel loop.
// Its gain grows with the window (more offsets per pixel for the weight
// buffers to hold): up to 8 channels for any window, 16 from K = 5, 32 from
// K = 7.
constexpr int64_t PIXEL_GATHER_MAX_CHANNELS = 64;
inline bool pixel_gather_pays(int64_t C, int64_t K) {
  return C <= (K >= 7 ? 32 : K >= 5 ? 16 : 8);
}

}  // namespace stccl::cpu
