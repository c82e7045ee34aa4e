// The layout of a call's work and the staging of operand rows into scratch.
//
// Work is split into tasks of `band_rows` output rows of one image. A task walks
// the channels in chunks; for each chunk it stages the rows it needs into
// small buffers (converted to the accumulation type, gathered from any
// strides, zero-padded by the halo of the window, so the inner loops have no
// bounds checks), with the sums of squares that become inverse norms. Inputs
// are read from memory once per task (halo rows again, mostly from cache) and
// no copy of a whole input is made: the extra memory is per-thread scratch of
// O(rows * W) (up to 512 KiB per operand of staged rows in the backward; the
// pixel gather stages a band of all of its at most 64 channels).
//
// Every output element is produced by one task with a fixed summation order
// (chunks in order, channels in order), so results are bitwise identical for
// any thread count.
#pragma once

#include <algorithm>
#include <type_traits>

#include <ATen/Parallel.h>

#include "../index_math.h"
#include "../window.h"
#include "isa.h"
#include "simd.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

// A band holds enough rows that a channel's rows of it are one contiguous run
// of about 1.75 KiB (ceil(448 / W) rows of floats), at least 4 and at most 16,
// rounded up to even (whole row pairs): fewer halo rows are re-read than with
// shorter runs.
constexpr int64_t MIN_BAND_ROWS = 4, MAX_BAND_ROWS = 16, BAND_ELEMENTS = 448;
// Channels staged per chunk: the inner loop walks the channels of a chunk for
// each (row, window row, x vector), touching ROWS_IN_FLIGHT rows of each
// channel, which must stay in L1 (STAGE_BYTES) while x sweeps the row. More
// channels per chunk amortise the accumulator loads and stores; the whole
// staged chunk lives in L2.
constexpr int64_t STAGE_BYTES = 32 * 1024, ROWS_IN_FLIGHT = 1, MAX_CHUNK = 32;
// What a chunk's staged whole images (flat) or tiled rows may take: L2.
constexpr int64_t STAGED_CHUNK_BYTES = 256 * 1024;
// The forward sweeps long rows in tiles of this many values: a chunk's tiles
// fit in L1 where whole rows would not, so chunks stay large (W = 1024 took
// 3 channels per chunk, and the sums of every offset were loaded and stored
// once per 3 channels).
constexpr int64_t FORWARD_X_TILE = 256;
// The backward stages a band's rows of every channel at once when they take
// at most this much per operand (they stay in L2): the pass that sums the
// squares for the norms then also stages, and the channel loop reads them.
constexpr int64_t WHOLE_STAGE_BYTES = 512 * 1024;
// When a band is a whole image, the runs a task writes (the forward's K*K
// offsets, the backward's channels of a chunk) lie one after the other in the
// result: up to this size they are gathered and streamed as one run, so that
// only its first and last lines are partial. Non-temporal stores of partial
// lines cost the memory controller a read of each such line; on narrow maps
// (a 7 x 7 run is 196 bytes) every run ended in one.
constexpr int64_t SINGLE_RUN_BYTES = 64 * 1024;
// The backward gathers its runs with one more copy (the gradient runs are
// computed a channel per line-aligned slot); worth it only for short runs.
constexpr int64_t SINGLE_GRADIENT_RUN_BYTES = 512;
// The pixel gather's tile of grad_out rows, K*K rows of x_tile values: at
// most this size (whole rows of up to 664 floats for K = 7). Measured on
// 512 x 512 maps with K = 7, whole rows against tiles of 64 values (12.5 KiB,
// in L1): 0.83-0.88x the time; fewer, longer copies of rows that come from
// memory.
constexpr int64_t PIXEL_TILE_BYTES = 128 * 1024;
// Where grad_out's planes lie a multiple of this apart and its rows take at
// least ALIASED_MIN_ROW_BYTES, the pixel gather copies mode A's weights into
// its tile instead of reading them in place: there the in-place loads of the
// K*K planes, all at the same offset in a 64 KiB period, cost up to twice as
// much. Why is not settled (the L2 is indexed by physical address, so these
// virtual distances do not fix its sets; the L1's way prediction and the
// prefetchers remain), so the rule is only what was measured. Zen 3, 2
// threads, backward of both gradients (K = 7 unless given), ns a pixel in
// place -> copied: 1 x 4 x 512 x 512 31.5 -> 30.0 (grad_a alone 22.8 ->
// 18.4), 1 x 8 x 512 x 512 49.5 -> 45.2, 1 x 3 x 256 x 1024 K = 9 65.6 ->
// 42.8, 2 x 4 x 512 x 512 K = 5 16.8 -> 17.2; copying lost on rows of 1 KiB
// (256 x 256 22.4 -> 24.1, 512 x 256 28.6 -> 29.3; grad_a alone on rows of
// 1.25 KiB, 256 x 320, 10.8 -> 11.9) and on planes that do not alias (300 x
// 300 21.2 -> 22.5, 480 x 640 27.5 -> 30.5). Outside the rule, 362 x 362 and
// 181 x 724 (planes 112 bytes short of 512 KiB) would gain (grad_a alone 29
// -> 15-17) where 328 x 400 (512 bytes past it) would lose (10.9 -> 15.6).
constexpr int64_t ALIASED_PLANE_PERIOD_BYTES = 64 * 1024, ALIASED_MIN_ROW_BYTES = 2048;
// Channels ahead whose rows the staging loop prefetches: a channel's rows of
// a band are a short burst, too short for the hardware prefetcher to ramp up.
constexpr int64_t PREFETCH_CHANNELS = 8;
// Contiguous runs longer than this (a row, or a band's rows where they lie
// one after the other) are not prefetched: the hardware prefetcher follows
// them, and the prefetch loop had become a tenth of the backward's band time
// on rows of 4 KiB (8 x 1024 maps: forward+backward 1.57-1.63 ms without it,
// 1.78-2.44 with) and a fifth of the S3 forward's band time on its bands of
// 14 rows of 256 bytes (forward 4-6% faster without it on S1, S3, S4, T1).
// Runs of 784 bytes (flat 14 x 14 images) still gain from it.
constexpr int64_t PREFETCH_MAX_RUN_BYTES = 1024;
// Offsets of one window row handled per register block. The forward takes
// ROW_GROUP output rows at a time (see correlate_rows_block): with AVX2's 16
// registers two (2 x 5 sums, two vectors of a and one of b: 13), with
// AVX-512's 32 three (3 x 8 sums and four vectors: 28; two rows take a window
// row of up to 9 offsets in one block).
constexpr int MAX_BLOCK = 9, ROW_GROUP = STCCL_VECTOR_BYTES == 64 ? 3 : 2;
constexpr int max_rows_block(int rows) {
  return rows == 1 ? MAX_BLOCK : rows == 2 ? (STCCL_VECTOR_BYTES == 64 ? 9 : 5) : 8;
}
// The flat layout's forward takes several window rows per register block
// (correlate_window_block): at most MAX_WINDOW_SUMS sums, with the a vector
// as many registers as the vector registers hold (a 3 x 3 window in one
// block with either width, 5 x 5 with AVX-512), and at most MAX_WINDOW_ROWS
// rows (the blocks instantiated per row count).
constexpr int MAX_WINDOW_SUMS = STCCL_VECTOR_BYTES == 64 ? 25 : 12, MAX_WINDOW_ROWS = 5;
constexpr int max_window_block(int rows) { return std::min(MAX_BLOCK, MAX_WINDOW_SUMS / rows); }
constexpr int64_t window_rows_per_block(int64_t K) {
  return std::clamp<int64_t>(MAX_WINDOW_SUMS / std::min<int64_t>(K, MAX_BLOCK), 1,
                             MAX_WINDOW_ROWS);
}
// By the backward's row-pair gather: 2 x J weights, four partial sums and
// the x vector, as many registers as the forward's two-row block.
constexpr int MAX_PAIR_GATHER_BLOCK = max_rows_block(2);

// The channel stride of a staging buffer holding `elements` per channel: whole
// cache lines, and an odd number of them. The inner loops walk the channels of
// a chunk at a fixed position; with a stride of an even number of lines (a
// multiple of 4 KiB, at worst) those lines share a few of the L1's sets and
// evict each other; an odd count spreads 64 channels over all 64 sets.
template <typename acc_t>
constexpr int64_t channel_stride(int64_t elements) {
  constexpr int64_t line = 64 / int64_t(sizeof(acc_t));
  const int64_t lines = (elements + line - 1) / line;
  return (lines | 1) * line;
}

// A read-only (N, C, H, W) operand with any strides; N may be a flattened
// (B, T) of a clip view. `end` is the end of the memory it lives in (its
// storage): reads before it are safe even past the operand's last element.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  Strides4 strides;
  const scalar_t* end;
  STCCL_ALWAYS_INLINE const scalar_t* row(int64_t n, int64_t c, int64_t y) const {
    return data + element_offset(strides, n, c, y, 0);
  }
};

// Which way a call lays out its bands. Rows: a band is band_rows image rows,
// each staged with a halo of pad columns on both sides, SIMD over x. Flat: a
// band is the whole image as one run of H*W values (its rows W apart, the
// halo pad rows plus pad values before and after), SIMD over that run; a
// neighbour at (dy, dx) is dy*W + dx away, so a step past a row's end wraps
// into the next row: the forward zeroes those outputs (zero_outside_image) and the
// backward's weights are zero there. Short rows waste most of a row's vectors
// and pay per-row costs for every channel (W = 7: 7 of 8 lanes, a staging
// call and a halo per row); flat pays one call per channel. Flat needs each
// operand's image rows to be one after the other in memory (y stride = W *
// x stride): channels-first or channels-last, not a column slice.
//
// Sizes shared by every task of one call. Nothing here but the forward's
// choice of layout depends on the thread count, and the forward sums every
// output in the same order in either layout, so results do not either (see
// flat_pays). In the flat layout the
// kernels see an image of one row of H*W values: H and W below are that
// (1, H*W), image_H and image_W the image's.
template <typename acc_t>
struct Layout {
  int64_t N, C, H, W, K, KK, dilation, pad;
  bool flat;
  int64_t image_H, image_W;
  int64_t pad_y;    // halo rows staged above and below a band
  int64_t pad_x;    // halo values staged before and after each row
  int64_t row_step; // elements from an image row to the next in staged rows
  int64_t band_rows;  // output rows per task
  int64_t bands;    // bands per image
  int64_t Wv;       // W rounded up to whole vectors
  int64_t x_tile;   // the forward's inner loops take rows x_tile values at a time
  int64_t WB;       // staged row width with the halo on both sides, whole vectors
  int64_t stage_shift;  // where a staged-rows buffer's rows start (see StagedRows)
  int64_t rows_b;   // staged rows of a band with the halo
  int64_t chunk;    // channels per staged chunk
  int64_t a_cstride;      // channel stride of the forward's staged a: [band_rows][Wv]
  int64_t stage_cstride;  // of the staged rows with the halo: [rows_b][WB]
  int64_t dst_cstride;    // of the backward's per-chunk sums: [band_rows][Wv]
  int64_t run_cstride;    // of its gradient runs: [band_rows * W], one vector to spare
  bool pixel_gather;  // the backward gathers per pixel vector, every channel in registers
  bool whole_stage; // the backward stages all channels of a band at once
  bool single_run;  // a task's results are written as one run (see SINGLE_RUN_BYTES)
  bool single_gradient_run;  // the backward's too
  int64_t inset;    // where this window's reach starts in staged rows (see stage_pad)
  int64_t group_W;  // the flat forward's row groups: rows of sums this far apart; 0: none

  // pass: the forward passes' layouts have bands at least as tall as the
  // halo (2 * pad rows), so that large windows do not re-stage the same rows
  // many times; the backward keeps short bands, whose per-offset weight
  // buffers (band_rows * K*K * W) must stay small. flat_ok: every operand can
  // be read flat (see LayoutChoice). stage_pad: the halo staged around a band
  // when it is larger than the window's reach (two windows over one staging:
  // both layouts, built with the larger reach, agree on every size but the
  // offsets; the smaller window reads the staged rows from `inset` on).
  Layout(int64_t N_, int64_t C_, int64_t H_, int64_t W_, const Window& window, Pass pass,
         int64_t element_bytes, bool flat_ok, int64_t stage_pad = 0)
      : N(N_), C(C_), H(H_), W(W_), K(window.kernel_size), KK(window.offsets()),
        dilation(window.dilation), pad(std::max(window.pad(), stage_pad)), image_H(H_),
        image_W(W_) {
    constexpr int64_t V = Simd<acc_t>::lanes;
    const bool forward = pass == Pass::Forward || pass == Pass::ClipForward;
    const LayoutChoice choice = layout_choice();
    pixel_gather = !forward && C <= PIXEL_GATHER_MAX_CHANNELS &&
                   (choice == LayoutChoice::Pixels ||
                    (choice == LayoutChoice::Auto && pixel_gather_pays(C, K)));
    flat = !pixel_gather && flat_ok && choice != LayoutChoice::Rows &&
           (choice == LayoutChoice::Flat || choice == LayoutChoice::Groups ||
            flat_pays(pass, N, C, H, W, K, element_bytes, at::get_num_threads()));
    if (flat) {
      H = 1;
      W = image_H * image_W;
      pad_y = 0;
      pad_x = pad * image_W + pad;
      band_rows = 1;
    } else {
      pad_y = pad_x = pad;
      const int64_t pad_rows = forward ? 2 * pad : 0;
      band_rows = std::clamp(
          std::max((BAND_ELEMENTS + W - 1) / std::max<int64_t>(W, 1), pad_rows), MIN_BAND_ROWS,
          MAX_BAND_ROWS);
      band_rows += band_rows % 2;  // whole row pairs (see correlate_chunk)
      band_rows = std::max<int64_t>(1, std::min(H, band_rows));
    }
    bands = (H + band_rows - 1) / band_rows;
    Wv = (W + V - 1) / V * V;
    WB = (Wv + 2 * pad_x + V - 1) / V * V;
    stage_shift = (V - pad_x % V) % V;
    row_step = flat ? image_W : WB;
    rows_b = band_rows + 2 * pad_y;
    // The inner loops sweep one staged row (plus one row of a) per channel,
    // in the forward a tile of it at a time (flat: the forward's x vectors of
    // a chunk stay in L1, its images in L2).
    // The pixel gather takes grad_out's rows of all offsets x_tile values at a
    // time (see gradient_tile), so that they stay in L2.
    x_tile = forward && !flat ? std::min(Wv, FORWARD_X_TILE)
             : pixel_gather
                 ? std::clamp<int64_t>(PIXEL_TILE_BYTES / (KK * int64_t(sizeof(acc_t))) / V * V, V, Wv)
                 : Wv;
    const int64_t per_channel =
        ROWS_IN_FLIGHT * (x_tile + 2 * pad_x + x_tile) * int64_t(sizeof(acc_t));
    const int64_t channels = std::max<int64_t>(C, 1);
    // Chunks of equal size, at most `most` channels: no short last chunk
    // paying a whole pass over the accumulators, and the staged rows of one
    // chunk stay in L2 (16 + 16 channels instead of 30 + 2).
    auto equal_chunks = [channels](int64_t most) {
      const int64_t chunks = (channels + most - 1) / most;
      return (channels + chunks - 1) / chunks;
    };
    int64_t most = std::clamp<int64_t>((flat ? STAGED_CHUNK_BYTES : STAGE_BYTES) / per_channel, 1,
                                       std::min(channels, MAX_CHUNK));
    if (x_tile < Wv) {  // and a chunk's staged rows, tiled in L1, stay in L2
      const int64_t staged = (rows_b * WB + band_rows * Wv) * int64_t(sizeof(acc_t));
      most = std::max<int64_t>(1, std::min(most, STAGED_CHUNK_BYTES / staged));
    }
    // The forward's row groups (AVX-512 builds, see row_groups_pay) read a
    // in place: their chunks are sized by the staged b alone (S1 in
    // bfloat16, 2 threads: 16 channels instead of 10, 0.945 -> 0.892 ms; 32
    // took 0.976).
    const bool groups_run =
        flat && forward && STCCL_VECTOR_BYTES == 64 && K == 3 && dilation == 1;
    group_W = groups_run && choice != LayoutChoice::Flat &&
                      (choice == LayoutChoice::Groups || row_groups_pay(image_W, K, dilation, V))
                  ? (image_W + V - 1) / V * V
                  : 0;
    if (group_W > 0)
      most = std::clamp<int64_t>(STAGED_CHUNK_BYTES / (WB * int64_t(sizeof(acc_t))), 1,
                                 std::min(channels, MAX_CHUNK));
    chunk = pixel_gather ? channels : equal_chunks(most);  // the pixel gather: all at once
    a_cstride = dst_cstride = channel_stride<acc_t>(band_rows * Wv);
    run_cstride = channel_stride<acc_t>(band_rows * W + V);
    stage_cstride = channel_stride<acc_t>(rows_b * WB);
    whole_stage =
        pixel_gather || C * stage_cstride * int64_t(sizeof(acc_t)) <= WHOLE_STAGE_BYTES;
    single_run = bands == 1 &&
                 std::max(KK, chunk) * H * W * int64_t(sizeof(acc_t)) <= SINGLE_RUN_BYTES;
    single_gradient_run =
        single_run && H * W * int64_t(sizeof(acc_t)) <= SINGLE_GRADIENT_RUN_BYTES;
    inset = (pad - window.pad()) * (row_step + 1);
  }
  int64_t tasks() const { return N * bands; }
  // Elements of the buffer that gathers `runs` runs of a band before streaming.
  int64_t run_buffer(int64_t runs) const {
    return (single_run ? runs : 1) * band_rows * W + Simd<acc_t>::lanes;
  }
  // Where a band's first pixel lies in its staged rows (with the halo).
  int64_t own_offset() const { return pad_y * WB + pad_x; }
  // The flat layout's x vectors whose window lies inside the image, [lo, hi)
  // (none when hi <= lo): from xb their neighbours span pixels [xb - pad_x,
  // xb + V - 1 + pad_x].
  int64_t interior_lo() const {
    constexpr int64_t V = Simd<acc_t>::lanes;
    return (pad_x + V - 1) / V * V;
  }
  int64_t interior_hi() const {
    constexpr int64_t V = Simd<acc_t>::lanes;
    return W - pad_x - V < 0 ? 0 : (W - pad_x - V) / V * V + V;
  }
  // The image rows of a band of `rows` rows (flat: the image's).
  int64_t image_rows(int64_t rows) const { return flat ? image_H : rows; }
  // Whether a band's rows of a result, one after the other from `first`, can
  // be written straight with stream_store: whole vectors from a 16-byte
  // boundary.
  bool rows_stream_from(const void* first) const {
    return W % Simd<acc_t>::lanes == 0 && reinterpret_cast<uintptr_t>(first) % 16 == 0;
  }
};

// Whether an operand's images can be read flat: their rows one after the
// other (y stride = W * x stride; any channel and batch strides).
inline bool rows_adjacent(const Strides4& s, int64_t H, int64_t W) {
  return H <= 1 || s.y == W * s.x;
}

// Prefetches rows [y_first, y_first + rows) of channel c + PREFETCH_CHANNELS
// (`channel` points at channel c of the image) when rows are contiguous.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void prefetch_ahead(const Operand<scalar_t>& src, const Layout<acc_t>& L,
                                        int64_t c, const scalar_t* channel, int64_t y_first,
                                        int64_t rows) {
  // The rows' longest contiguous run: all of them where they are adjacent.
  const int64_t run = (src.strides.y == L.W ? rows : 1) * L.W * int64_t(sizeof(scalar_t));
  if (src.strides.x != 1 || c + PREFETCH_CHANNELS >= L.C || run > PREFETCH_MAX_RUN_BYTES) return;
  const scalar_t* ahead = channel + PREFETCH_CHANNELS * src.strides.c;
  const int64_t y_lo = std::max<int64_t>(y_first, 0), y_hi = std::min(y_first + rows, L.H);
  for (int64_t y = y_lo; y < y_hi; ++y) {
    const char* line = reinterpret_cast<const char*>(ahead + y * src.strides.y);
    for (int64_t byte = 0; byte < L.W * int64_t(sizeof(scalar_t)); byte += 64)
      __builtin_prefetch(line + byte);
  }
}

// Prefetches planes [0, planes) of image n when each is one contiguous run
// (the flat layout's whole images): the hardware prefetcher does not ramp up
// on runs of a few hundred bytes, each in another plane.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void prefetch_image(const Operand<scalar_t>& src, const Layout<acc_t>& L,
                                        int64_t n, int64_t planes) {
  if (src.strides.x != 1 || !rows_adjacent(src.strides, L.image_H, L.image_W)) return;
  const int64_t bytes = L.image_H * L.image_W * int64_t(sizeof(scalar_t));
  for (int64_t c = 0; c < planes; ++c) {
    const char* plane = reinterpret_cast<const char*>(src.row(n, c, 0));
    for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(plane + byte);
  }
}

// V values of a contiguous row in acc_t: loaded as they are, or converted in
// registers (bfloat16: the upper half of a float; the native builds convert
// both half types in stage_half_row_vectors).
template <typename acc_t, typename scalar_t>
STCCL_ALWAYS_INLINE typename Simd<acc_t>::vec load_as(const scalar_t* p) {
  using vec = typename Simd<acc_t>::vec;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return load(p);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>);
    typedef uint16_t halves __attribute__((vector_size(STCCL_VECTOR_BYTES / 2)));
    typedef uint32_t words __attribute__((vector_size(STCCL_VECTOR_BYTES)));
    halves h;
    __builtin_memcpy(&h, p, sizeof(h));
    const words bits = __builtin_convertvector(h, words) << 16;
    vec v;
    __builtin_memcpy(&v, &bits, sizeof(v));
    return v;
  }
}

// Stores the vectors of CHANNELS channels at x of their staged rows (d,
// d_cstride apart; not with STORE false, for the squares alone) and adds their
// squares to q unless null. Where the row ends inside them (`left` < V values
// left), the lanes past it are zeroed first, so d and q receive zeros up to the
// next whole vector. Two channels load and store q once for both (the squares
// are added in channel order, as one at a time would).
template <int CHANNELS, typename acc_t, bool STORE = true>
STCCL_ALWAYS_INLINE void store_staged(typename Simd<acc_t>::vec (&v)[CHANNELS], int64_t left,
                                      acc_t* d, int64_t d_cstride, acc_t* q) {
  using vec = typename Simd<acc_t>::vec;
  using lanes_vec = decltype(vec{} < vec{});
  using lane_t = decltype(lanes_vec{}[0] + 0);
  constexpr int64_t V = Simd<acc_t>::lanes;
  if (left < V) {
    lanes_vec lane{};
    for (int i = 0; i < V; ++i) lane[i] = i;
    const lanes_vec keep = lane < static_cast<lane_t>(left);
    for (int c = 0; c < CHANNELS; ++c) v[c] = keep ? v[c] : vec{};
  }
  if constexpr (STORE)
    for (int c = 0; c < CHANNELS; ++c) store(d + c * d_cstride, v[c]);
  if (q != nullptr) {
    vec sum = load(q);
    for (int c = 0; c < CHANNELS; ++c) sum += v[c] * v[c];
    store(q, sum);
  }
}

// One row of W values, contiguous, of CHANNELS channels (s_cstride apart) to
// d (d_cstride apart) in acc_t, with their squares added to q unless null
// (see store_staged), in whole vectors: the last vector reads past the row
// (the caller checks that this memory exists). A scalar tail costs more than
// the vectors of a short row (W = 14: half the staging time). STORE false:
// the squares alone (d is not used).
template <int CHANNELS, typename scalar_t, typename acc_t, bool STORE = true>
STCCL_ALWAYS_INLINE void stage_row_vectors(const scalar_t* s, int64_t s_cstride, int64_t W,
                                           acc_t* d, int64_t d_cstride, acc_t* q) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  for (int64_t x = 0; x < W; x += V) {
    typename Simd<acc_t>::vec v[CHANNELS];
    for (int c = 0; c < CHANNELS; ++c) v[c] = load_as<acc_t>(s + c * s_cstride + x);
    store_staged<CHANNELS, acc_t, STORE>(v, W - x, STORE ? d + x : d, d_cstride,
                                         q != nullptr ? q + x : nullptr);
  }
}

#if defined(__x86_64__)
// stage_row_vectors for float16 and bfloat16 rows, converted by the native
// builds' instructions (see load of half types in simd.h; load_as's generic
// bfloat16 conversion took a fifth of the S1 bfloat16 forward's band time).
// Converting float16 with integer operations instead, in any build, took the
// S1 float16 forward from 2.2 to 3.2 ms: two dozen vector operations for one
// F16C instruction.
template <int CHANNELS, typename scalar_t>
STCCL_NATIVE_FUNCTION void stage_half_row_vectors(const scalar_t* s, int64_t s_cstride,
                                                  int64_t W, float* d, int64_t d_cstride,
                                                  float* q) {
  constexpr int64_t V = Simd<float>::lanes;
  for (int64_t x = 0; x < W; x += V) {
    Simd<float>::vec v[CHANNELS];
    for (int c = 0; c < CHANNELS; ++c) v[c] = load(s + c * s_cstride + x);
    store_staged<CHANNELS>(v, W - x, d + x, d_cstride, q != nullptr ? q + x : nullptr);
  }
}
#endif

// Copies rows [y_first, y_first + rows) of channels [c0, c0 + count) of
// image n to dst[cc * cstride + row * width + lead + x] in acc_t, zero for
// rows outside the image, and adds the squares to sum_sq[row][lead + x] when
// given. The margins of dst (before lead, after lead + Wv) are never written:
// the workspace keeps them zero.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void stage_rows(const Operand<scalar_t>& src, const Layout<acc_t>& L,
                                    int64_t n, int64_t c0, int64_t count, int64_t y_first,
                                    int64_t rows, int64_t cstride, int64_t lead, int64_t width,
                                    acc_t* dst, acc_t* sum_sq) {
  const int64_t W = L.W, sx = src.strides.x, sc = src.strides.c;
  const scalar_t* image = src.row(n, 0, 0);
  constexpr bool half_type =
      std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  // Once per call, not per row (active_isa is a call into another unit).
  [[maybe_unused]] const bool native = half_type && native_build_runs();
  for (int64_t cc = 0; cc < count;) {
    // Channels in pairs where the rows take the vector path (see
    // stage_row_vectors).
    const int64_t channels = (sx == 1 && cc + 1 < count) ? 2 : 1;
    const scalar_t* channel = image + (c0 + cc) * sc;
    for (int64_t c = 0; c < channels; ++c)
      prefetch_ahead(src, L, c0 + cc + c, channel + c * sc, y_first, rows);
    for (int64_t row = 0; row < rows; ++row) {
      acc_t* d = dst + cc * cstride + row * width + lead;
      acc_t* q = sum_sq != nullptr ? sum_sq + row * width + lead : nullptr;
      const int64_t y = y_first + row;
      if (y < 0 || y >= L.H) {
        for (int64_t c = 0; c < channels; ++c) std::fill_n(d + c * cstride, W, acc_t(0));
        continue;
      }
      const scalar_t* s = channel + y * src.strides.y;
      if (sx == 1) {
        const bool readable =
            src.end - s >= L.Wv && src.end - (s + (channels - 1) * sc) >= L.Wv;
        if (readable) {
#if defined(__x86_64__)
          if constexpr (half_type) {
            if (native) {
              if (channels == 2) stage_half_row_vectors<2>(s, sc, W, d, cstride, q);
              else stage_half_row_vectors<1>(s, sc, W, d, cstride, q);
              continue;
            }
          }
#endif
          if constexpr (std::is_same_v<scalar_t, acc_t> ||
                        std::is_same_v<scalar_t, c10::BFloat16>) {
            if (channels == 2) stage_row_vectors<2>(s, sc, W, d, cstride, q);
            else stage_row_vectors<1>(s, sc, W, d, cstride, q);
            continue;
          }
        }
        // Converted (or copied) into place, then the squares by the vector
        // pass over the staged rows.
        for (int64_t c = 0; c < channels; ++c) convert_row(s + c * sc, d + c * cstride, W);
        if (q != nullptr) {
          if (channels == 2) stage_row_vectors<2>(d, cstride, W, d, cstride, q);
          else stage_row_vectors<1>(d, cstride, W, d, cstride, q);
        }
        continue;
      }
      for (int64_t c = 0; c < channels; ++c, s += sc, d += cstride) {
        for (int64_t x = 0; x < W; ++x) {
          const acc_t v = static_cast<acc_t>(s[x * sx]);
          d[x] = v;
          if (q != nullptr) q[x] += v * v;
        }
      }
    }
    cc += channels;
  }
}

// Rows [y0, y0 + rows) of channels [c0, c0 + count) of image n where they lie
// (channel c0's first row; channels strides.c and rows strides.y apart), for
// an operand read without a halo (the forward's a): null unless they are
// contiguous along x and whole vectors from each row's start lie in its
// storage (the lanes past a row read what follows it, which only reaches
// lanes that are never written out). The kernels read them as acc_t, or
// half types in the flat forward's native blocks (see correlate_flat).
// Staging copies every value once more through the cache: reading a in place
// took the flat forward of 20 x 256 x 14 x 14 from 0.79 to 0.64 ms in
// float64 (docs/cpu_kernels.md).
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE const scalar_t* rows_in_place(const Operand<scalar_t>& src,
                                                  const Layout<acc_t>& L, int64_t n, int64_t c0,
                                                  int64_t count, int64_t y0, int64_t rows) {
  // With strides >= 0 the last row of the last channel starts last.
  if (src.strides.x == 1 && src.end - src.row(n, c0 + count - 1, y0 + rows - 1) >= L.Wv)
    return src.row(n, c0, y0);
  return nullptr;
}

// Adds the squares of rows read in place (see rows_in_place) to
// sum_sq[row][x] (rows `width` apart), in the order stage_rows adds them.
template <typename acc_t>
STCCL_ALWAYS_INLINE void add_squares(const Operand<acc_t>& src, const Layout<acc_t>& L, int64_t n,
                                     int64_t c0, int64_t count, int64_t y0, int64_t rows,
                                     int64_t width, acc_t* sum_sq) {
  const int64_t sc = src.strides.c;
  for (int64_t cc = 0; cc < count;) {
    const int64_t channels = cc + 1 < count ? 2 : 1;
    const acc_t* channel = src.row(n, c0 + cc, 0);
    for (int64_t c = 0; c < channels; ++c)
      prefetch_ahead(src, L, c0 + cc + c, channel + c * sc, y0, rows);
    for (int64_t row = 0; row < rows; ++row) {
      const acc_t* s = channel + (y0 + row) * src.strides.y;
      acc_t* q = sum_sq + row * width;
      if (channels == 2) stage_row_vectors<2, acc_t, acc_t, false>(s, sc, L.W, nullptr, 0, q);
      else stage_row_vectors<1, acc_t, acc_t, false>(s, sc, L.W, nullptr, 0, q);
    }
    cc += channels;
  }
}

// Stages what the flat layout's edge vectors (outside Layout::interior_lo/hi)
// read of channels [c0, c0 + count) of image n, read in place (see
// rows_in_place): pixels below interior_lo + pad_x and from interior_hi -
// pad_x on (whole vectors), at their places in `dst`. The interior vectors
// read the channels where they lie.
template <typename acc_t>
STCCL_ALWAYS_INLINE void stage_edges(const Operand<acc_t>& src, const Layout<acc_t>& L, int64_t n,
                                     int64_t c0, int64_t count, acc_t* dst) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t low_end = std::min(L.W, L.interior_lo() + L.pad_x);
  const int64_t high_start = (L.interior_hi() - L.pad_x) / V * V;
  for (int64_t cc = 0; cc < count; ++cc) {
    const acc_t* s = src.row(n, c0 + cc, 0);
    acc_t* d = dst + cc * L.stage_cstride + L.pad_x;
    stage_row_vectors<1>(s, 0, low_end, d, 0, static_cast<acc_t*>(nullptr));
    stage_row_vectors<1>(s + high_start, 0, L.W - high_start, d + high_start, 0,
                         static_cast<acc_t*>(nullptr));
  }
}

// Turns the sums of squares that stage_rows added up in `inv` (rows
// [y_first, y_first + rows) of the image, `stride` apart, the image's columns
// at [lead, lead + W)) into inverse norms in place: 1 in raw mode, where no
// sums were taken; entries outside the image keep their zeros. `pass`, when
// given, gets the clamp mask (0 outside the image and in raw mode). The loops
// have no branches, so they vectorise; two loops, as one with both does not.
template <typename acc_t>
STCCL_ALWAYS_INLINE void inverse_norms_in_place(const Layout<acc_t>& L, bool normalize, acc_t eps,
                                                int64_t y_first, int64_t rows, int64_t stride,
                                                int64_t lead, acc_t* inv, acc_t* pass) {
  if (pass != nullptr) std::fill_n(pass, rows * stride, acc_t(0));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t y = y_first + row;
    if (y < 0 || y >= L.H) continue;
    acc_t* inv_x = inv + row * stride + lead;
    if (!normalize) {
      std::fill_n(inv_x, L.W, acc_t(1));
      continue;
    }
    if (pass != nullptr) {
      acc_t* pass_x = pass + row * stride + lead;
      for (int64_t x = 0; x < L.W; ++x)
        pass_x[x] = norm_passes_clamp(inv_x[x], eps) ? acc_t(1) : acc_t(0);
    }
    for (int64_t x = 0; x < L.W; ++x) inv_x[x] = inverse_norm(inv_x[x], eps);
  }
}

// A buffer of staged rows ([rows][WB] per channel, channels a multiple of
// cache lines apart) or of their norms, its rows starting stage_shift
// elements into line-aligned storage: each row's image values (from column
// pad_x) then start on a vector boundary, and the staging's stores and the
// sums of squares' loads and stores split no cache line (with a halo of 1,
// every other one did: the staging loop took a third longer).
template <typename acc_t>
class StagedRows {
 public:
  StagedRows(const Layout<acc_t>& L, int64_t size)
      : storage_(size + L.stage_shift), shift_(L.stage_shift) {}
  acc_t* data() { return storage_.data() + shift_; }
  const acc_t* data() const { return storage_.data() + shift_; }

 private:
  Buffer<acc_t> storage_;
  int64_t shift_;
};

// One operand's band as halo_norms leaves it: the staged rows (all channels
// when the layout stages whole bands, else scratch for one chunk) and the
// inverse norms and clamp mask over the band with its halo. `image` and
// `band` name what it holds, for the temporal passes' reuse.
template <typename acc_t>
struct StagedBand {
  StagedRows<acc_t> stage;      // [C or chunk] x stage_cstride
  StagedRows<acc_t> inv, pass;  // [rows_b][WB]
  int64_t image = -1, band = -1;
  uint64_t last_use = 0;
  explicit StagedBand(const Layout<acc_t>& L)
      : stage(L, (L.whole_stage ? L.C : L.chunk) * L.stage_cstride + Simd<acc_t>::lanes),
        inv(L, L.rows_b * L.WB),
        pass(L, L.rows_b * L.WB) {}
};

// A thread's staged bands, each built (zeroed, up to 512 KiB of staged rows)
// only when a pass first asks for it: the spatial backward takes one or two,
// the temporal passes three.
template <typename acc_t>
struct StagedBands {
  static constexpr size_t MAX = 3;
  const Layout<acc_t>& layout;
  std::vector<StagedBand<acc_t>> slots;  // never beyond MAX: references stay valid
  uint64_t clock = 0;
  explicit StagedBands(const Layout<acc_t>& L) : layout(L) { slots.reserve(MAX); }
  StagedBand<acc_t>& operator[](size_t i) {
    while (slots.size() <= i && slots.size() < MAX) slots.emplace_back(layout);
    return slots[i];
  }
};

// Inverse norms and clamp masks of one operand over the band and its halo,
// [rows_b][WB], 0 outside the image (raw mode: 1 inside, mask 0). Reads the
// band's rows of every channel, staging them all into `stage` when the layout
// says they fit (whole_stage), else into its first chunk as scratch.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void halo_norms(const Operand<scalar_t>& v, bool normalize, acc_t eps,
                                    const Layout<acc_t>& L, int64_t n, int64_t y0, int64_t rows_b,
                                    acc_t* stage, acc_t* inv, acc_t* pass) {
  const int64_t WB = L.WB;
  std::fill_n(inv, rows_b * WB, acc_t(0));
  if (normalize || L.whole_stage) {
    for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk)
      stage_rows(v, L, n, c0, std::min(L.chunk, L.C - c0), y0 - L.pad_y, rows_b,
                 L.stage_cstride, L.pad_x, WB, stage + (L.whole_stage ? c0 * L.stage_cstride : 0),
                 normalize ? inv : nullptr);
  }
  inverse_norms_in_place(L, normalize, eps, y0 - L.pad_y, rows_b, WB, L.pad_x, inv, pass);
}

// The staged rows of channels [c0, c0 + count): already in `stage` when the
// whole band was staged by halo_norms, else staged now.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE const acc_t* stage_chunk(const Operand<scalar_t>& v, const Layout<acc_t>& L,
                                             int64_t n, int64_t c0, int64_t count, int64_t y0,
                                             int64_t rows_b, acc_t* stage) {
  if (L.whole_stage) return stage + c0 * L.stage_cstride;
  stage_rows(v, L, n, c0, count, y0 - L.pad_y, rows_b, L.stage_cstride, L.pad_x, L.WB, stage,
             static_cast<acc_t*>(nullptr));
  return stage;
}

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
