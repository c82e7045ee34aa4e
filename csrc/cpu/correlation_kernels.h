// CPU kernels of the local correlation: forward, gathered backward and the
// symmetric self-correlation, written once as templates and compiled twice
// (an AVX2+FMA build and a portable one, picked at run time; see
// local_correlation.cpp).
//
// Work is split into tasks of `band_rows` output rows of one image. A task walks
// the channels in chunks; for each chunk it stages the rows it needs into
// small buffers (converted to the accumulation type, gathered from any
// strides, zero-padded by the halo of the window, so the inner loops have no
// bounds checks) and accumulates with the offsets of one window row held in
// registers, SIMD over x (the AVX2 build: two output rows per load of b).
// Inputs are read from memory once per task (halo rows again, mostly from
// cache) and no copy of a whole input is made: the extra memory is per-thread
// scratch of O(rows * W) (up to 512 KiB per operand of staged rows in the
// backward). Outputs and gradients are written with non-temporal stores.
//
// Every output element is produced by one task with a fixed summation order
// (chunks in order, channels in order), so results are bitwise identical for
// any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../index_math.h"

#define STCCL_ALWAYS_INLINE inline __attribute__((always_inline))
// For lambdas in the kernels: a lambda does not take the target("avx2,fma")
// of the function it sits in, so only inlined does its code get AVX2.
#define STCCL_LAMBDA_INLINE __attribute__((always_inline))
// An AVX2+FMA function that is not inlined (see Avx2Blocks); nothing
// instantiates one where the target does not exist.
#if defined(__x86_64__) || defined(__i386__)
#define STCCL_AVX2_FUNCTION __attribute__((target("avx2,fma"), noinline))
#else
#define STCCL_AVX2_FUNCTION __attribute__((noinline))
#endif

namespace stccl::cpu {

// A band holds enough rows that a channel's rows of it are one contiguous run
// of about 1.75 KiB (ceil(448 / W) rows of floats), at least 4 and at most 16,
// rounded up to even (whole row pairs). From 256: T1 forward+backward -4%,
// fewer halo rows re-read.
constexpr int64_t MIN_BAND_ROWS = 4, MAX_BAND_ROWS = 16, BAND_ELEMENTS = 448;
// Channels staged per chunk: the inner loop walks the channels of a chunk for
// each (row, window row, x vector), touching ROWS_IN_FLIGHT rows of each
// channel, which must stay in L1 (STAGE_BYTES) while x sweeps the row. More
// channels per chunk amortise the accumulator loads and stores; the whole
// staged chunk lives in L2.
constexpr int64_t STAGE_BYTES = 32 * 1024, ROWS_IN_FLIGHT = 1, MAX_CHUNK = 32;
// The backward stages a band's rows of every channel at once when they take
// at most this much per operand (they stay in L2): the pass that sums the
// squares for the norms then also stages, and the channel loop reads them.
constexpr int64_t WHOLE_STAGE_BYTES = 512 * 1024;
// Channels ahead whose rows the staging loop prefetches: a channel's rows of
// a band are a short burst, too short for the hardware prefetcher to ramp up.
constexpr int64_t PREFETCH_CHANNELS = 8;
// Offsets of one window row handled per register block; by the row-pair
// kernel: 2 x 5 sums, two vectors of a and one of b, 13 of the 16 registers.
constexpr int MAX_BLOCK = 9, MAX_PAIR_BLOCK = 5;

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

// Copies `bytes` from src to dst with non-temporal stores for the 16-byte
// aligned part of dst: outputs and gradients are written once and not read
// back by the pass, so they go to memory without first reading each line into
// the cache (half the memory traffic of plain stores; 5-8% off S3 and S4,
// whose results are fresh allocations). SSE2 is part of x86-64, so both
// builds take this path. The stores are weakly ordered: stream_fence must run
// before another thread may read the data.
STCCL_ALWAYS_INLINE void stream_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__x86_64__)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(d, s, bytes);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Allocates cache-line-aligned storage for the scratch buffers, whose
// channel strides are whole lines: the inner loops' vector loads then split a
// line only where an offset makes them. From malloc (16-byte aligned, or page
// + 16 for large buffers) half the loads of a and of the sums split one, and
// the forward's inner loop ran 35% slower (S3 shape, in L2).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 8;
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 4;
};

template <typename acc_t>
STCCL_ALWAYS_INLINE typename Simd<acc_t>::vec load(const acc_t* p) {
  typename Simd<acc_t>::vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
STCCL_ALWAYS_INLINE void store(acc_t* p, typename Simd<acc_t>::vec v) {
  __builtin_memcpy(p, &v, sizeof(v));
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

// Sizes shared by every task of one call. Nothing here depends on the thread
// count, so the summation order does not either.
template <typename acc_t>
struct Layout {
  int64_t N, C, H, W, K, KK, dilation, pad;
  int64_t band_rows;  // output rows per task
  int64_t bands;    // bands per image
  int64_t Wv;       // W rounded up to whole vectors
  int64_t WB;       // staged row width with the halo on both sides
  int64_t rows_b;   // staged rows of a band with the halo
  int64_t chunk;    // channels per staged chunk
  int64_t a_cstride;      // channel stride of the forward's staged a: [band_rows][Wv]
  int64_t stage_cstride;  // of the staged rows with the halo: [rows_b][WB]
  int64_t dst_cstride;    // of the backward's per-chunk sums: [band_rows][Wv]
  int64_t run_cstride;    // of its gradient runs: [band_rows * W], one vector to spare
  bool whole_stage; // the backward stages all channels of a band at once

  // cover_halo: bands at least as tall as the halo (2 * pad rows), so that
  // large windows do not re-stage the same rows many times. The forward pass
  // takes it; the backward keeps short bands, whose per-offset weight buffers
  // (band_rows * K*K * W) must stay small.
  Layout(int64_t N_, int64_t C_, int64_t H_, int64_t W_, int64_t K_, int64_t dil,
         bool cover_halo)
      : N(N_), C(C_), H(H_), W(W_), K(K_), KK(K_ * K_), dilation(dil) {
    constexpr int64_t V = Simd<acc_t>::lanes;
    pad = (K / 2) * dilation;
    const int64_t pad_rows = cover_halo ? 2 * (K / 2) * dil : 0;
    band_rows = std::clamp(std::max((BAND_ELEMENTS + W - 1) / std::max<int64_t>(W, 1), pad_rows),
                           MIN_BAND_ROWS, MAX_BAND_ROWS);
    band_rows += band_rows % 2;  // whole row pairs (see correlate_chunk)
    band_rows = std::max<int64_t>(1, std::min(H, band_rows));
    bands = (H + band_rows - 1) / band_rows;
    Wv = (W + V - 1) / V * V;
    WB = Wv + 2 * pad;
    rows_b = band_rows + 2 * pad;
    // The inner loops sweep one staged row (plus one row of a) per channel.
    const int64_t per_channel = ROWS_IN_FLIGHT * (WB + Wv) * int64_t(sizeof(acc_t));
    chunk = std::clamp<int64_t>(STAGE_BYTES / per_channel, 1, std::max<int64_t>(C, 1));
    chunk = std::min(chunk, MAX_CHUNK);
    // Chunks of equal size: no short last chunk paying a whole pass over the
    // accumulators, and the staged rows of one chunk stay in L2 (S4: 16 + 16
    // channels instead of 30 + 2, forward 20% faster).
    const int64_t chunks = (std::max<int64_t>(C, 1) + chunk - 1) / chunk;
    chunk = (std::max<int64_t>(C, 1) + chunks - 1) / chunks;
    a_cstride = dst_cstride = channel_stride<acc_t>(band_rows * Wv);
    run_cstride = channel_stride<acc_t>(band_rows * W + V);
    stage_cstride = channel_stride<acc_t>(rows_b * WB);
    whole_stage = C * stage_cstride * int64_t(sizeof(acc_t)) <= WHOLE_STAGE_BYTES;
  }
  int64_t tasks() const { return N * bands; }
};

// Per-thread scratch of the forward pass, allocated once per parallel range.
template <typename acc_t>
struct Workspace {
  Buffer<acc_t> a_stage, b_stage, acc;
  Buffer<acc_t> inv_a, inv_b;  // sums of squares, then inverse norms in place
  Buffer<acc_t> out_rows;  // one offset's output rows of a band, in scalar_t
  explicit Workspace(const Layout<acc_t>& L)
      : a_stage(L.chunk * L.a_cstride),
        b_stage(L.chunk * L.stage_cstride),
        acc(L.band_rows * L.KK * L.Wv),
        inv_a(L.band_rows * L.Wv),
        inv_b(L.rows_b * L.WB),
        out_rows(L.band_rows * L.W + Simd<acc_t>::lanes) {}
};

// Prefetches rows [y_first, y_first + rows) of channel c + PREFETCH_CHANNELS
// (`channel` points at channel c of the image) when rows are contiguous.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void prefetch_ahead(const Operand<scalar_t>& src, const Layout<acc_t>& L,
                                        int64_t c, const scalar_t* channel, int64_t y_first,
                                        int64_t rows) {
  if (src.strides.x != 1 || c + PREFETCH_CHANNELS >= L.C) return;
  const scalar_t* ahead = channel + PREFETCH_CHANNELS * src.strides.c;
  const int64_t y_lo = std::max<int64_t>(y_first, 0), y_hi = std::min(y_first + rows, L.H);
  for (int64_t y = y_lo; y < y_hi; ++y) {
    const char* line = reinterpret_cast<const char*>(ahead + y * src.strides.y);
    for (int64_t byte = 0; byte < L.W * int64_t(sizeof(scalar_t)); byte += 64)
      __builtin_prefetch(line + byte);
  }
}

// One row of W values already in acc_t, contiguous, of CHANNELS channels
// (s_cstride apart) to d (d_cstride apart), and their squares added to q
// unless null, in whole vectors. The last vector reads past the row (the
// caller checks that this memory exists) and zeroes those lanes, so d and q
// receive zeros up to the next whole vector. A scalar tail costs more than the
// vectors of a short row (W = 14: half the staging time). Two channels load
// and store q once for both (the squares are added in channel order, as one
// at a time would): staging T1's frames 15% faster on one core.
template <int CHANNELS, typename acc_t>
STCCL_ALWAYS_INLINE void stage_row_vectors(const acc_t* s, int64_t s_cstride, int64_t W,
                                           acc_t* d, int64_t d_cstride, acc_t* q) {
  using vec = typename Simd<acc_t>::vec;
  using lanes_vec = decltype(vec{} < vec{});
  using lane_t = decltype(lanes_vec{}[0] + 0);
  constexpr int64_t V = Simd<acc_t>::lanes;
  for (int64_t x = 0; x < W; x += V) {
    vec v[CHANNELS];
    for (int c = 0; c < CHANNELS; ++c) v[c] = load(s + c * s_cstride + x);
    if (x + V > W) {
      lanes_vec lane{};
      for (int i = 0; i < V; ++i) lane[i] = i;
      const lanes_vec keep = lane < static_cast<lane_t>(W - x);
      for (int c = 0; c < CHANNELS; ++c) v[c] = keep ? v[c] : vec{};
    }
    for (int c = 0; c < CHANNELS; ++c) store(d + c * d_cstride + x, v[c]);
    if (q != nullptr) {
      vec sum = load(q + x);
      for (int c = 0; c < CHANNELS; ++c) sum += v[c] * v[c];
      store(q + x, sum);
    }
  }
}

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
  for (int64_t cc = 0; cc < count;) {
    // Channels in pairs where the rows take the vector path (see
    // stage_row_vectors).
    const int64_t channels =
        (std::is_same_v<scalar_t, acc_t> && sx == 1 && cc + 1 < count) ? 2 : 1;
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
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (sx == 1 && src.end - s >= L.Wv && src.end - (s + (channels - 1) * sc) >= L.Wv) {
          if (channels == 2) stage_row_vectors<2>(s, sc, W, d, cstride, q);
          else stage_row_vectors<1>(s, sc, W, d, cstride, q);
          continue;
        }
      }
      for (int64_t c = 0; c < channels; ++c, s += sc, d += cstride) {
        if (q != nullptr) {
          if (sx == 1) {
            for (int64_t x = 0; x < W; ++x) {
              const acc_t v = static_cast<acc_t>(s[x]);
              d[x] = v;
              q[x] += v * v;
            }
          } else {
            for (int64_t x = 0; x < W; ++x) {
              const acc_t v = static_cast<acc_t>(s[x * sx]);
              d[x] = v;
              q[x] += v * v;
            }
          }
        } else if (sx == 1) {
          for (int64_t x = 0; x < W; ++x) d[x] = static_cast<acc_t>(s[x]);
        } else {
          for (int64_t x = 0; x < W; ++x) d[x] = static_cast<acc_t>(s[x * sx]);
        }
      }
    }
    cc += channels;
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

// acc[j] += sum over count channels of a * b[j * dil], for J offsets of one
// window row; the J accumulators stay in registers across the channel loop.
// DIL > 0 makes the dilation a compile-time constant (no offset registers).
template <int J, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_block(const acc_t* a, int64_t a_cstride, const acc_t* b,
                                         int64_t b_cstride, int64_t dil_rt, int64_t count,
                                         acc_t* acc, int64_t acc_stride) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) sum[j] = load(acc + j * acc_stride);
  // An end pointer rather than a counter: the loop must not keep anything in
  // memory (a spilled counter puts a store-to-load chain into every step).
  for (const acc_t* const a_end = a + count * a_cstride; a != a_end;
       a += a_cstride, b += b_cstride) {
    const vec av = load(a);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) sum[j] += av * load(b + j * dil);
  }
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) store(acc + j * acc_stride, sum[j]);
}

// correlate_block for two output rows that read the same staged row of b
// (row 1 lies dil rows below row 0, so its window row is one less): each b
// vector is loaded once for both rows, 2 + J loads per 2J FMAs instead of
// 2 + 2J, which lifts the loop off the load ports (half of the unaligned b
// loads straddle two cache lines). Only for the AVX2 build: the empty asm
// keeps the b vector in a ymm register, as GCC otherwise folds the load into
// both FMAs; a 32-byte vector fits no register of the portable build.
template <int J, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_pair_block(const acc_t* a0, const acc_t* a1, int64_t a_cstride,
                                              const acc_t* b, int64_t b_cstride, int64_t dil_rt,
                                              int64_t count, acc_t* acc0, acc_t* acc1,
                                              int64_t acc_stride) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum0[J], sum1[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    sum0[j] = load(acc0 + j * acc_stride);
    sum1[j] = load(acc1 + j * acc_stride);
  }
  for (const acc_t* const a_end = a0 + count * a_cstride; a0 != a_end;
       a0 += a_cstride, a1 += a_cstride, b += b_cstride) {
    const vec av0 = load(a0), av1 = load(a1);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      vec bv = load(b + j * dil);
      asm("" : "+x"(bv));
      sum0[j] += av0 * bv;
      sum1[j] += av1 * bv;
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    store(acc0 + j * acc_stride, sum0[j]);
    store(acc1 + j * acc_stride, sum1[j]);
  }
}

// The register blocks of correlate_chunk: inlined in the portable build, and
// in the AVX2 build functions of their own. Inlined into the band loop there,
// they shared its registers, and GCC kept their loops' pointers and bounds on
// the stack: a load, or a store-to-load chain, in every step of loops that are
// bound by loads (S4 forward 10-13% slower).
struct InlineBlocks {
  template <int J, int DIL, typename... Args>
  STCCL_ALWAYS_INLINE static void single(Args... args) {
    correlate_block<J, DIL>(args...);
  }
};
struct Avx2Blocks {
  template <int J, int DIL, typename... Args>
  STCCL_AVX2_FUNCTION static void single(Args... args) {
    correlate_block<J, DIL>(args...);
  }
  template <int J, int DIL, typename... Args>
  STCCL_AVX2_FUNCTION static void pair(Args... args) {
    correlate_pair_block<J, DIL>(args...);
  }
};

// dst[cc] += sum over J offsets of w[j] * x[cc][j * dil], for count channels;
// the J weights stay in registers across the channel loop.
template <int J, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void gather_block(const acc_t* w, int64_t w_stride, const acc_t* x,
                                      int64_t x_cstride, int64_t dil_rt, int64_t count,
                                      acc_t* dst, int64_t dst_cstride) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec wv[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) wv[j] = load(w + j * w_stride);
  for (int64_t cc = 0; cc < count; ++cc, x += x_cstride, dst += dst_cstride) {
    // Two partial sums halve the chain of dependent FMAs.
    vec s0 = load(dst), s1 = vec{};
#pragma GCC unroll 16
    for (int j = 0; j + 1 < J; j += 2) {
      s0 += wv[j] * load(x + j * dil);
      s1 += wv[j + 1] * load(x + (j + 1) * dil);
    }
    if (J % 2) s0 += wv[J - 1] * load(x + (J - 1) * dil);
    store(dst, s0 + s1);
  }
}

// The last step of a gradient, grad[c][p] = scale_p * sum_p - shift_p * own[c][p]
// with own from its staged rows, written to `runs`: a channel's rows of the
// band one after the other (W apart), channels run_cstride apart. At one
// (row, x vector) position: the pointers below already point there.
template <typename acc_t>
struct GradientEpilogue {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* own;
  int64_t own_cstride;
  acc_t* runs;
  int64_t run_cstride;
};

// For windows of up to 3 x 3: the sum over the whole window of
// w[i][j] * x[cc][i * dil rows + j * dil] (plus dst[cc] when accumulating),
// all K*K weights in registers, so each channel's sum is stored once instead
// of loaded and stored per row. Stored to dst[cc], or (FINAL) through the
// gradient epilogue, whose scale and shift also stay in registers.
template <int KW, int DIL, bool FINAL, typename acc_t>
STCCL_ALWAYS_INLINE void gather_window(const acc_t* w, int64_t w_stride, const acc_t* x,
                                       int64_t x_cstride, int64_t x_rstride, int64_t dil_rt,
                                       int64_t count, acc_t* dst, int64_t dst_cstride,
                                       bool accumulate, GradientEpilogue<acc_t> epi) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec wv[KW * KW];
#pragma GCC unroll 16
  for (int k = 0; k < KW * KW; ++k) wv[k] = load(w + k * w_stride);
  vec scale{}, shift{};
  if constexpr (FINAL) {
    scale = load(epi.scale);
    shift = load(epi.shift);
  }
  for (int64_t cc = 0; cc < count; ++cc, x += x_cstride, dst += dst_cstride) {
    // One partial sum per window row: short chains of dependent FMAs.
    vec s[KW];
#pragma GCC unroll 16
    for (int i = 0; i < KW; ++i) {
      const acc_t* row = x + i * dil * x_rstride;
      s[i] = wv[i * KW] * load(row);
#pragma GCC unroll 16
      for (int j = 1; j < KW; ++j) s[i] += wv[i * KW + j] * load(row + j * dil);
    }
    vec total = accumulate ? load(dst) : vec{};
#pragma GCC unroll 16
    for (int i = 0; i < KW; ++i) total += s[i];
    if constexpr (FINAL) {
      store(epi.runs + cc * epi.run_cstride, scale * total - shift * load(epi.own));
      epi.own += epi.own_cstride;
    } else {
      store(dst, total);
    }
  }
}

// Runs BLOCK<J, DIL> over `offsets` offsets of a window row in register
// blocks of at most MAXB (at most 9), as equal as can be (K = 7 in pairs:
// 4 + 3, not 5 + 2: a block's sums are its chains of dependent FMAs, and 2 x 2
// chains cannot cover the FMA latency); the arguments may use j0, the first
// offset. Blocks above MAXB are never instantiated.
#define STCCL_BLOCK_CASE(J, BLOCK, MAXB, DIL, ...) \
  case J:                                          \
    if constexpr (J <= (MAXB)) BLOCK<J, DIL>(__VA_ARGS__); \
    break;
#define STCCL_BLOCKED(BLOCK, MAXB, DIL, offsets, ...)                         \
  do {                                                                        \
    const int64_t stccl_blocks = ((offsets) + (MAXB) - 1) / (MAXB);           \
    const int64_t stccl_size = ((offsets) + stccl_blocks - 1) / stccl_blocks; \
    for (int64_t j0 = 0; j0 < (offsets); j0 += stccl_size) {                  \
      switch (std::min<int64_t>(stccl_size, (offsets) - j0)) {                \
        STCCL_BLOCK_CASE(1, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(2, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(3, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(4, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(5, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(6, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(7, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(8, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        STCCL_BLOCK_CASE(9, BLOCK, MAXB, DIL, __VA_ARGS__)                    \
        default: break;                                                       \
      }                                                                       \
    }                                                                         \
  } while (0)

// Runs the statement with DIL bound to the dilation when it is 1 or 2 (the
// common cases get constant offsets), else to 0 (read at run time).
#define STCCL_WITH_DILATION(d, ...)                 \
  do {                                              \
    if ((d) == 1) {                                 \
      constexpr int DIL = 1;                        \
      __VA_ARGS__;                                  \
    } else if ((d) == 2) {                          \
      constexpr int DIL = 2;                        \
      __VA_ARGS__;                                  \
    } else {                                        \
      constexpr int DIL = 0;                        \
      __VA_ARGS__;                                  \
    }                                               \
  } while (0)

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  Operand<scalar_t> a, b;
  scalar_t* out;  // contiguous (N, K*K, H, W)
  bool normalize, self;
  acc_t eps;
};

// acc[rr][k] += the sums over one chunk of channels, for every offset k (a
// self-correlation: those up to the centre) of the band's rows. a_rows: the
// chunk's rows of a, b_stage: its staged rows of b with the halo.
// ROW_PAIRS: the AVX2 build's row-pair kernel (see correlate_pair_block).
template <bool ROW_PAIRS, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_chunk(const Layout<acc_t>& L, bool self, int64_t rows,
                                         int64_t count, const acc_t* a_rows, int64_t a_cstride,
                                         int64_t a_rstride, const acc_t* b_stage, acc_t* acc) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, Wv = L.Wv, WB = L.WB;
  const int64_t r = K / 2, window_rows = self ? r + 1 : K;
  using Blocks = std::conditional_t<ROW_PAIRS, Avx2Blocks, InlineBlocks>;
  if constexpr (ROW_PAIRS) {
    if (!self) {
      // Rows in pairs (rr, rr + d): staged row rr + i * d of b serves
      // window row i of rr and window row i - 1 of rr + d.
      STCCL_WITH_DILATION(d, {
        for (int64_t rr = 0; rr < rows; ++rr) {
          if ((rr / d) % 2 == 1) continue;  // the second row of a pair
          const bool pair = rr + d < rows;
          for (int64_t i = 0; i <= K; ++i) {
            const bool row0 = i < K, row1 = pair && i > 0;
            if (!row0 && !row1) continue;
            for (int64_t xb = 0; xb < Wv; xb += V) {
              const acc_t* a0 = a_rows + rr * a_rstride + xb;
              const acc_t* a1 = a0 + d * a_rstride;
              const acc_t* b_vec = b_stage + (rr + i * d) * WB + xb;
              acc_t* acc0 = acc + (rr * KK + i * K) * Wv + xb;
              acc_t* acc1 = acc + ((rr + d) * KK + (i - 1) * K) * Wv + xb;
              if (row0 && row1) {
                STCCL_BLOCKED(Blocks::template pair, MAX_PAIR_BLOCK, DIL, K, a0, a1, a_cstride,
                              b_vec + j0 * d, L.stage_cstride, d, count, acc0 + j0 * Wv,
                              acc1 + j0 * Wv, Wv);
              } else {
                STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, K, row0 ? a0 : a1,
                              a_cstride, b_vec + j0 * d, L.stage_cstride, d, count,
                              (row0 ? acc0 : acc1) + j0 * Wv, Wv);
              }
            }
          }
        }
      });
      return;
    }
  }
  STCCL_WITH_DILATION(d, {
    for (int64_t rr = 0; rr < rows; ++rr) {
      for (int64_t i = 0; i < window_rows; ++i) {
        const int64_t offsets = (self && i == r) ? r + 1 : K;
        for (int64_t xb = 0; xb < Wv; xb += V) {
          const acc_t* a_vec = a_rows + rr * a_rstride + xb;
          const acc_t* b_vec = b_stage + (rr + i * d) * WB + xb;
          acc_t* acc_vec = acc + (rr * KK + i * K) * Wv + xb;
          STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, offsets, a_vec, a_cstride,
                        b_vec + j0 * d, L.stage_cstride, d, count, acc_vec + j0 * Wv, Wv);
        }
      }
    }
  });
}

// The band's rows of the output: out[k][y0 + rr] = acc * inv_a * inv_b, with
// inv_a[rr] (rows inv_a_rstride apart) the inverse norms of a and inv_b
// ([rows_b][WB], 0 outside the image) those of b. `out` is the image's
// (K*K, H, W) volume. An offset's rows of the band are one contiguous run of
// it: computed into run_buffer, then streamed out (see stream_copy).
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void write_output(const Layout<acc_t>& L, bool self, int64_t y0, int64_t rows,
                                      const acc_t* acc, const acc_t* inv_a,
                                      int64_t inv_a_rstride, const acc_t* inv_b,
                                      acc_t* run_buffer, scalar_t* out) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, Wv = L.Wv, WB = L.WB;
  const int64_t r = K / 2, window_rows = self ? r + 1 : K;
  scalar_t* run = reinterpret_cast<scalar_t*>(run_buffer);
  for (int64_t i = 0; i < window_rows; ++i) {
    const int64_t offsets = (self && i == r) ? r + 1 : K;
    for (int64_t j = 0; j < offsets; ++j) {
      const int64_t k = i * K + j;
      for (int64_t rr = 0; rr < rows; ++rr) {
        const acc_t* a_k = acc + (rr * KK + k) * Wv;
        const acc_t* inv_p = inv_a + rr * inv_a_rstride;
        const acc_t* inv_q = inv_b + (rr + i * d) * WB + j * d;
        scalar_t* o = run + rr * L.W;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          // Whole vectors: a row's last vector runs into the next row's
          // start, written after it (the buffer has one vector to spare for
          // the last row). Short rows (W = 14) spent most of this loop in a
          // scalar tail.
          for (int64_t x = 0; x < L.W; x += V)
            store(o + x, load(a_k + x) * load(inv_p + x) * load(inv_q + x));
        } else {
          for (int64_t x = 0; x < L.W; ++x)
            o[x] = static_cast<scalar_t>(a_k[x] * inv_p[x] * inv_q[x]);
        }
      }
      stream_copy(out + (k * L.H + y0) * L.W, run, rows * L.W * int64_t(sizeof(scalar_t)));
    }
  }
}

// One band of the forward pass. For a self-correlation (a is b) only the
// offsets up to the centre are computed; mirror_self_correlation fills in the
// rest afterwards.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void forward_band(const ForwardArgs<scalar_t, acc_t>& args,
                                      const Layout<acc_t>& L, int64_t task,
                                      Workspace<acc_t>& ws) {
  const int64_t n = task / L.bands, y0 = (task % L.bands) * L.band_rows;
  const int64_t rows = std::min(L.band_rows, L.H - y0), rows_b = rows + 2 * L.pad;
  const int64_t pad = L.pad, Wv = L.Wv, WB = L.WB;
  acc_t* acc = ws.acc.data();
  acc_t* inv_b = ws.inv_b.data();
  acc_t* inv_a = ws.inv_a.data();
  std::fill_n(acc, rows * L.KK * Wv, acc_t(0));
  std::fill_n(inv_b, rows_b * WB, acc_t(0));
  if (!args.self) std::fill_n(inv_a, rows * Wv, acc_t(0));

  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    acc_t* b_stage = ws.b_stage.data();
    stage_rows(args.b, L, n, c0, count, y0 - pad, rows_b, L.stage_cstride, pad, WB, b_stage,
               args.normalize ? inv_b : nullptr);
    if (args.self) {
      correlate_chunk<ROW_PAIRS>(L, true, rows, count, b_stage + pad * WB + pad,
                                 L.stage_cstride, WB, b_stage, acc);
    } else {
      stage_rows(args.a, L, n, c0, count, y0, rows, L.a_cstride, 0, Wv, ws.a_stage.data(),
                 args.normalize ? inv_a : nullptr);
      correlate_chunk<ROW_PAIRS>(L, false, rows, count, ws.a_stage.data(), L.a_cstride, Wv,
                                 b_stage, acc);
    }
  }

  inverse_norms_in_place(L, args.normalize, args.eps, y0 - pad, rows_b, WB, pad, inv_b,
                         static_cast<acc_t*>(nullptr));
  if (args.self)
    for (int64_t rr = 0; rr < rows; ++rr)
      std::copy_n(inv_b + (rr + pad) * WB + pad, L.W, inv_a + rr * Wv);
  else
    inverse_norms_in_place(L, args.normalize, args.eps, y0, rows, Wv, int64_t(0), inv_a,
                           static_cast<acc_t*>(nullptr));
  write_output(L, args.self, y0, rows, acc, inv_a, Wv, inv_b, ws.out_rows.data(),
               args.out + n * L.KK * L.H * L.W);
}

// One operand's band as halo_norms leaves it: the staged rows (all channels
// when the layout stages whole bands, else scratch for one chunk) and the
// inverse norms and clamp mask over the band with its halo. `image` and
// `band` name what it holds, for the temporal passes' reuse.
template <typename acc_t>
struct StagedBand {
  Buffer<acc_t> stage;      // [C or chunk] x stage_cstride
  Buffer<acc_t> inv, pass;  // [rows_b][WB]
  int64_t image = -1, band = -1;
  uint64_t last_use = 0;
  explicit StagedBand(const Layout<acc_t>& L)
      : stage((L.whole_stage ? L.C : L.chunk) * L.stage_cstride),
        inv(L.rows_b * L.WB),
        pass(inv.size()) {}
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

// Per-thread scratch of the backward pass (rows are the band with its halo).
template <typename acc_t>
struct BackwardWorkspace {
  StagedBands<acc_t> staged;  // a and b (spatial), or the frames t, t + s, t - s
  Buffer<acc_t> w_a, w_b;                     // [band_rows][K*K][Wv]
  Buffer<acc_t> scale_a, shift_a, scale_b, shift_b;  // [band_rows][Wv]
  Buffer<acc_t> dst;                          // [chunk] x dst_cstride
  Buffer<acc_t> runs;                         // [chunk] x run_cstride
  Buffer<acc_t> converted;  // one channel's gradient rows of a band, in scalar_t
  explicit BackwardWorkspace(const Layout<acc_t>& L)
      : staged(L),
        w_a(L.band_rows * L.KK * L.Wv), w_b(w_a.size()),
        scale_a(L.band_rows * L.Wv), shift_a(scale_a.size()), scale_b(scale_a.size()),
        shift_b(scale_a.size()),
        dst(L.chunk * L.dst_cstride),
        runs(L.chunk * L.run_cstride),
        converted(L.band_rows * L.W) {}
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  Operand<scalar_t> grad_out, out;  // (N, K*K, H, W)
  Operand<scalar_t> a, b;           // b unused for a self-correlation
  scalar_t* grad_a;                 // contiguous (N, C, H, W), or null when not needed
  scalar_t* grad_b;                 // (for a self-correlation: null; grad_a is grad_x)
  bool normalize, self;
  acc_t eps;
};

// Inverse norms and clamp masks of one operand over the band and its halo,
// [rows_b][WB], 0 outside the image (raw mode: 1 inside, mask 0). Reads the
// band's rows of every channel, staging them all into `stage` when the layout
// says they fit (whole_stage), else into its first chunk as scratch.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void halo_norms(const Operand<scalar_t>& v, bool normalize, acc_t eps,
                                    const Layout<acc_t>& L, int64_t n, int64_t y0, int64_t rows_b,
                                    acc_t* stage, acc_t* inv, acc_t* pass) {
  const int64_t pad = L.pad, WB = L.WB;
  std::fill_n(inv, rows_b * WB, acc_t(0));
  if (normalize || L.whole_stage) {
    for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk)
      stage_rows(v, L, n, c0, std::min(L.chunk, L.C - c0), y0 - pad, rows_b, L.stage_cstride, pad,
                 WB, stage + (L.whole_stage ? c0 * L.stage_cstride : 0),
                 normalize ? inv : nullptr);
  }
  inverse_norms_in_place(L, normalize, eps, y0 - pad, rows_b, WB, pad, inv, pass);
}

// The staged rows of channels [c0, c0 + count): already in `stage` when the
// whole band was staged by halo_norms, else staged now.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE const acc_t* stage_chunk(const Operand<scalar_t>& v, const Layout<acc_t>& L,
                                             int64_t n, int64_t c0, int64_t count, int64_t y0,
                                             int64_t rows_b, acc_t* stage) {
  if (L.whole_stage) return stage + c0 * L.stage_cstride;
  stage_rows(v, L, n, c0, count, y0 - L.pad, rows_b, L.stage_cstride, L.pad, L.WB, stage,
             static_cast<acc_t*>(nullptr));
  return stage;
}

enum class GradMode { A, B, Self };

// The weight w[k][p] of other[p + d_k] in the gradient at p, and the per-pixel
// scale and shift, for one band. With â = a * ra:
//   grad_a[p] = ra_p sum_k g[p,k] rb_q b_q - pass_p ra_p^2 c_p a_p,
//               q = p + d_k, c_p = sum_k g[p,k] out[p,k];
//   grad_b[p] gathers the outputs o = p + d_k whose offset mirror(k) lands on
//               p, with weights g[o,mirror(k)] ra_o;
//   self:       G[p,k] = g[p,k] + g[q,mirror(k)] (the two roles of x).
// So grad[p] = scale_p * sum_k w[k][p] other[p + d_k] - shift_p own_p. The
// norms are the band's halo arrays of halo_norms.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void gradient_weights(const BackwardArgs<scalar_t, acc_t>& args,
                                          const Layout<acc_t>& L, GradMode mode, int64_t n,
                                          int64_t y0, int64_t rows, const acc_t* inv_own,
                                          const acc_t* pass_own, const acc_t* inv_other,
                                          acc_t* w, acc_t* scale, acc_t* shift) {
  const int64_t K = L.K, KK = L.KK, H = L.H, W = L.W, Wv = L.Wv, WB = L.WB, pad = L.pad;
  const int64_t gx = args.grad_out.strides.x, ox = args.out.strides.x;
  std::fill_n(w, rows * KK * Wv, acc_t(0));
  for (int64_t rr = 0; rr < rows; ++rr) {
    const int64_t y = y0 + rr;
    acc_t* csum = shift + rr * Wv;
    std::fill_n(csum, Wv, acc_t(0));
    for (int64_t k = 0; k < KK; ++k) {
      const int64_t dy = offset_dy(k, K, L.dilation), dx = offset_dx(k, K, L.dilation);
      const int64_t yq = y + dy;
      if (yq < 0 || yq >= H) continue;
      const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min(W, W - dx);
      acc_t* wk = w + (rr * KK + k) * Wv;
      const acc_t* inv_q = inv_other + (rr + pad + dy) * WB + pad + dx;
      if (mode == GradMode::B) {
        // The output at o = p + d_k whose offset mirror(k) points back at p.
        const int64_t km = mirror_offset(k, K);
        const scalar_t* g = args.grad_out.row(n, km, yq) + dx * gx;
        const scalar_t* o = args.out.row(n, km, yq) + dx * ox;
        for (int64_t x = x_lo; x < x_hi; ++x) {
          const acc_t gv = static_cast<acc_t>(g[x * gx]);
          wk[x] = gv * inv_q[x];
          csum[x] += gv * static_cast<acc_t>(o[x * ox]);
        }
      } else {
        const scalar_t* g = args.grad_out.row(n, k, y);
        const scalar_t* o = args.out.row(n, k, y);
        const scalar_t* g_mirror = mode == GradMode::Self
                                       ? args.grad_out.row(n, mirror_offset(k, K), yq) + dx * gx
                                       : nullptr;
        for (int64_t x = x_lo; x < x_hi; ++x) {
          acc_t gv = static_cast<acc_t>(g[x * gx]);
          if (g_mirror) gv += static_cast<acc_t>(g_mirror[x * gx]);
          wk[x] = gv * inv_q[x];
          csum[x] += gv * static_cast<acc_t>(o[x * ox]);
        }
      }
    }
    const acc_t* inv_p = inv_own + (rr + pad) * WB + pad;
    const acc_t* pass_p = pass_own + (rr + pad) * WB + pad;
    for (int64_t x = 0; x < W; ++x) {
      scale[rr * Wv + x] = inv_p[x];
      csum[x] *= pass_p[x] * inv_p[x] * inv_p[x];  // 0 in raw mode (pass = 0)
    }
  }
}

// dst[cc][rr] (+)= sum_k w[k][rr] * other_stage[cc][rr + d_k] for one chunk;
// with `final` (positioned at the band's first row), the last term of a
// gradient: the sums go on through the epilogue into its runs.
template <typename acc_t>
STCCL_ALWAYS_INLINE void gather_chunk(const Layout<acc_t>& L, int64_t rows, int64_t count,
                                      const acc_t* w, const acc_t* other_stage, acc_t* dst,
                                      bool accumulate, const GradientEpilogue<acc_t>* final) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, W = L.W, Wv = L.Wv, WB = L.WB;
  // The epilogue at row rr, x vector xb.
  auto epilogue_at = [&](int64_t rr, int64_t xb) STCCL_LAMBDA_INLINE {
    GradientEpilogue<acc_t> e{};
    if (final)
      e = {final->scale + rr * Wv + xb, final->shift + rr * Wv + xb, final->own + rr * WB + xb,
           final->own_cstride, final->runs + rr * W + xb, final->run_cstride};
    return e;
  };
  if (K <= 3) {
    STCCL_WITH_DILATION(d, {
      for (int64_t rr = 0; rr < rows; ++rr) {
        for (int64_t xb = 0; xb < Wv; xb += V) {
          const acc_t* w_vec = w + rr * KK * Wv + xb;
          const acc_t* x_vec = other_stage + rr * WB + xb;
          acc_t* d_vec = dst + rr * Wv + xb;
          const GradientEpilogue<acc_t> e = epilogue_at(rr, xb);
          auto run = [&](auto kw, auto is_final) STCCL_LAMBDA_INLINE {
            gather_window<decltype(kw)::value, DIL, decltype(is_final)::value>(
                w_vec, Wv, x_vec, L.stage_cstride, WB, d, count, d_vec, L.dst_cstride,
                accumulate, e);
          };
          using one = std::integral_constant<int, 1>;
          using three = std::integral_constant<int, 3>;
          if (K == 3) {
            if (final) run(three{}, std::true_type{});
            else run(three{}, std::false_type{});
          } else {
            if (final) run(one{}, std::true_type{});
            else run(one{}, std::false_type{});
          }
        }
      }
    });
    return;
  }
  if (!accumulate) std::fill_n(dst, count * L.dst_cstride, acc_t(0));
  STCCL_WITH_DILATION(d, {
    for (int64_t rr = 0; rr < rows; ++rr) {
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t xb = 0; xb < Wv; xb += V) {
          const acc_t* w_vec = w + (rr * KK + i * K) * Wv + xb;
          const acc_t* x_vec = other_stage + (rr + i * d) * WB + xb;
          STCCL_BLOCKED(gather_block, MAX_BLOCK, DIL, K, w_vec + j0 * Wv, Wv, x_vec + j0 * d,
                        L.stage_cstride, d, count, dst + rr * Wv + xb, L.dst_cstride);
        }
      }
    }
  });
  if (!final) return;
  using vec = typename Simd<acc_t>::vec;
  for (int64_t cc = 0; cc < count; ++cc) {
    // Rows in order: a row's last vector runs into the next row's start,
    // which is written after it.
    for (int64_t rr = 0; rr < rows; ++rr) {
      for (int64_t xb = 0; xb < Wv; xb += V) {
        const GradientEpilogue<acc_t> e = epilogue_at(rr, xb);
        const vec total = load(dst + cc * L.dst_cstride + rr * Wv + xb);
        store(e.runs + cc * e.run_cstride,
              load(e.scale) * total - load(e.shift) * load(e.own + cc * e.own_cstride));
      }
    }
  }
}

// Streams the chunk's gradient runs to grad (contiguous (N, C, H, W)),
// converted to scalar_t through one channel's buffer when it is not acc_t.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void write_gradient(const Layout<acc_t>& L, int64_t n, int64_t c0,
                                        int64_t count, int64_t y0, int64_t rows,
                                        const acc_t* runs, acc_t* convert_buffer,
                                        scalar_t* grad) {
  const int64_t elements = rows * L.W;
  for (int64_t cc = 0; cc < count; ++cc) {
    const acc_t* run = runs + cc * L.run_cstride;
    const void* src = run;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      scalar_t* converted = reinterpret_cast<scalar_t*>(convert_buffer);
      for (int64_t i = 0; i < elements; ++i) converted[i] = static_cast<scalar_t>(run[i]);
      src = converted;
    }
    stream_copy(grad + ((n * L.C + c0 + cc) * L.H + y0) * L.W, src,
                elements * int64_t(sizeof(scalar_t)));
  }
}

// One band of the backward pass: both gradients (or the self-correlation's)
// from one pass. The band's rows of a and b (with the halo) are read from
// memory once for the norms and found in cache by the channel loop, which
// gathers per output pixel: no atomics.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void backward_band(const BackwardArgs<scalar_t, acc_t>& args,
                                       const Layout<acc_t>& L, int64_t task,
                                       BackwardWorkspace<acc_t>& ws) {
  const int64_t n = task / L.bands, y0 = (task % L.bands) * L.band_rows;
  const int64_t rows = std::min(L.band_rows, L.H - y0), rows_b = rows + 2 * L.pad;
  const bool two = !args.self;
  StagedBand<acc_t>& A = ws.staged[0];
  StagedBand<acc_t>& B = two ? ws.staged[1] : A;
  acc_t* a_stage = A.stage.data();
  acc_t* b_stage = B.stage.data();
  halo_norms(args.a, args.normalize, args.eps, L, n, y0, rows_b, a_stage, A.inv.data(),
             A.pass.data());
  if (two)
    halo_norms(args.b, args.normalize, args.eps, L, n, y0, rows_b, b_stage, B.inv.data(),
               B.pass.data());
  if (args.grad_a)
    gradient_weights(args, L, two ? GradMode::A : GradMode::Self, n, y0, rows, A.inv.data(),
                     A.pass.data(), B.inv.data(), ws.w_a.data(), ws.scale_a.data(),
                     ws.shift_a.data());
  if (args.grad_b)
    gradient_weights(args, L, GradMode::B, n, y0, rows, B.inv.data(), B.pass.data(),
                     A.inv.data(), ws.w_b.data(), ws.scale_b.data(), ws.shift_b.data());
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    const acc_t* a_rows = stage_chunk(args.a, L, n, c0, count, y0, rows_b, a_stage);
    const acc_t* b_rows = two ? stage_chunk(args.b, L, n, c0, count, y0, rows_b, b_stage) : a_rows;
    // One gradient's chunk: gathered from the other operand's rows, finished
    // with its own.
    auto gradient = [&](const acc_t* w, const acc_t* scale, const acc_t* shift,
                        const acc_t* own_rows, const acc_t* other_rows,
                        scalar_t* grad) STCCL_LAMBDA_INLINE {
      const GradientEpilogue<acc_t> final{scale, shift, own_rows + L.pad * L.WB + L.pad,
                                          L.stage_cstride, ws.runs.data(), L.run_cstride};
      gather_chunk(L, rows, count, w, other_rows, ws.dst.data(), false, &final);
      write_gradient(L, n, c0, count, y0, rows, ws.runs.data(), ws.converted.data(), grad);
    };
    if (args.grad_a)
      gradient(ws.w_a.data(), ws.scale_a.data(), ws.shift_a.data(), a_rows, b_rows, args.grad_a);
    if (args.grad_b)
      gradient(ws.w_b.data(), ws.scale_b.data(), ws.shift_b.data(), b_rows, a_rows, args.grad_b);
  }
}

// Image n of an operand as an operand of its own (image index 0).
template <typename scalar_t>
STCCL_ALWAYS_INLINE Operand<scalar_t> image_view(const Operand<scalar_t>& op, int64_t n) {
  Operand<scalar_t> view = op;
  view.data = op.row(n, 0, 0);
  view.strides.inner = 1;
  view.strides.outer = view.strides.batch = 0;
  return view;
}

template <typename scalar_t, typename acc_t>
struct TemporalBackwardArgs {
  Operand<scalar_t> grad_out, out;  // (B, T - s, K*K, H, W)
  Operand<scalar_t> v;              // (B, T, C, H, W)
  scalar_t* grad;                   // contiguous (B, T, C, H, W)
  int64_t frames, stride;           // T, s
  bool normalize;
  acc_t eps;
};

// Frame `image` of a clip, band `band`, through halo_norms into one of the
// staged bands; when one already holds it (a previous task of the thread
// staged it, maybe in another role), that one is returned as it is. The one
// reused otherwise is the one used longest ago, never one this task took (a
// task takes at most StagedBands::MAX frames).
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE StagedBand<acc_t>& stage_frame(const Operand<scalar_t>& frame, bool normalize,
                                                   acc_t eps, const Layout<acc_t>& L,
                                                   int64_t image, int64_t band, int64_t y0,
                                                   int64_t rows_b, StagedBands<acc_t>& bands) {
  StagedBand<acc_t>* slot = &bands[StagedBands<acc_t>::MAX - 1];  // builds all of them
  for (auto& candidate : bands.slots) {
    if (candidate.image == image && candidate.band == band) {
      candidate.last_use = ++bands.clock;
      return candidate;
    }
    if (candidate.last_use < slot->last_use) slot = &candidate;
  }
  halo_norms(frame, normalize, eps, L, 0, y0, rows_b, slot->stage.data(), slot->inv.data(),
             slot->pass.data());
  slot->image = image;
  slot->band = band;
  slot->last_use = ++bands.clock;
  return *slot;
}

// A task of the temporal passes: step t (a pair, or a frame) of one band of
// one clip, t running fastest, so that consecutive tasks of a thread share
// frames. `frame` is the clip's frame t as an image of the (B*T) batch.
struct ClipTask {
  int64_t clip, band, t, frame, y0, rows, rows_b;
};

template <typename acc_t>
STCCL_ALWAYS_INLINE ClipTask clip_task(const Layout<acc_t>& L, int64_t task, int64_t steps,
                                       int64_t frames) {
  ClipTask c;
  c.clip = task / (L.bands * steps);
  c.band = task / steps % L.bands;
  c.t = task % steps;
  c.frame = c.clip * frames + c.t;
  c.y0 = c.band * L.band_rows;
  c.rows = std::min(L.band_rows, L.H - c.y0);
  c.rows_b = c.rows + 2 * L.pad;
  return c;
}

template <typename scalar_t, typename acc_t>
struct TemporalForwardArgs {
  Operand<scalar_t> v;     // (B, T, C, H, W)
  scalar_t* out;           // contiguous (B, T - s, K*K, H, W)
  int64_t frames, stride;  // T, s
  bool normalize;
  acc_t eps;
};

// Per-thread scratch of the temporal forward.
template <typename acc_t>
struct TemporalWorkspace {
  StagedBands<acc_t> staged;  // frames, whole bands
  Buffer<acc_t> acc, out_rows;
  explicit TemporalWorkspace(const Layout<acc_t>& L)
      : staged(L),
        acc(L.band_rows * L.KK * L.Wv),
        out_rows(L.band_rows * L.W + Simd<acc_t>::lanes) {}
};

// One band of pair t (frames t and t + s) of temporal_correlation, for
// layouts that stage whole bands. Tasks run pair after pair within a band of
// a clip, and each frame is staged once with its halo and norms, as the b of
// one pair and then (with s = 1: in the next task) read in place as the a of
// another: half the reads of correlating the two frame views.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void temporal_forward_band(const TemporalForwardArgs<scalar_t, acc_t>& args,
                                               const Layout<acc_t>& L, int64_t task,
                                               TemporalWorkspace<acc_t>& ws) {
  const int64_t s = args.stride, pairs = args.frames - s;
  const ClipTask c = clip_task(L, task, pairs, args.frames);
  const int64_t pad = L.pad, WB = L.WB, cs = L.stage_cstride;
  StagedBand<acc_t>& A = stage_frame(image_view(args.v, c.frame), args.normalize, args.eps, L,
                                     c.frame, c.band, c.y0, c.rows_b, ws.staged);
  StagedBand<acc_t>& B = stage_frame(image_view(args.v, c.frame + s), args.normalize, args.eps, L,
                                     c.frame + s, c.band, c.y0, c.rows_b, ws.staged);
  acc_t* acc = ws.acc.data();
  std::fill_n(acc, c.rows * L.KK * L.Wv, acc_t(0));
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    correlate_chunk<ROW_PAIRS>(L, false, c.rows, std::min(L.chunk, L.C - c0),
                               A.stage.data() + c0 * cs + pad * WB + pad, cs, WB,
                               B.stage.data() + c0 * cs, acc);
  }
  write_output(L, false, c.y0, c.rows, acc, A.inv.data() + pad * WB + pad, WB, B.inv.data(),
               ws.out_rows.data(), args.out + (c.clip * pairs + c.t) * L.KK * L.H * L.W);
}

// One band of frame t of the clip gradient of temporal_correlation: frame t
// is the `a` of pair t (against t + s) and the `b` of pair t - s, so
// grad_v[t] = inv_t * (sum_k w_A other_{t+s} + sum_k w_B other_{t-s})
//             - (shift_A + shift_B) v_t,
// gathered into one accumulator and written once (no slice-and-add of two
// view gradients). Tasks run frame by frame within a band of a clip, so with
// s = 1 two of the three frames a task needs were staged by the task before.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void temporal_backward_band(const TemporalBackwardArgs<scalar_t, acc_t>& args,
                                                const Layout<acc_t>& L, int64_t task,
                                                BackwardWorkspace<acc_t>& ws) {
  const int64_t T = args.frames, s = args.stride, pairs = T - s;
  const ClipTask c = clip_task(L, task, T, T);
  const int64_t t = c.t, m = c.frame, band = c.band, y0 = c.y0, rows = c.rows, rows_b = c.rows_b;
  const int64_t pair_base = c.clip * pairs;
  const bool has_next = t + s < T, has_prev = t >= s;
  const Operand<scalar_t> own = image_view(args.v, m);
  BackwardArgs<scalar_t, acc_t> term{args.grad_out, args.out, own, own, nullptr, nullptr,
                                     args.normalize, false, args.eps};
  StagedBand<acc_t>& own_band =
      stage_frame(own, args.normalize, args.eps, L, m, band, y0, rows_b, ws.staged);
  StagedBand<acc_t>* next_band = nullptr;
  StagedBand<acc_t>* prev_band = nullptr;
  Operand<scalar_t> next = own, prev = own;
  if (has_next) {
    next = image_view(args.v, m + s);
    next_band = &stage_frame(next, args.normalize, args.eps, L, m + s, band, y0, rows_b,
                             ws.staged);
    term.grad_out = image_view(args.grad_out, pair_base + t);
    term.out = image_view(args.out, pair_base + t);
    gradient_weights(term, L, GradMode::A, 0, y0, rows, own_band.inv.data(),
                     own_band.pass.data(), next_band->inv.data(), ws.w_a.data(),
                     ws.scale_a.data(), ws.shift_a.data());
  }
  if (has_prev) {
    prev = image_view(args.v, m - s);
    prev_band = &stage_frame(prev, args.normalize, args.eps, L, m - s, band, y0, rows_b,
                             ws.staged);
    term.grad_out = image_view(args.grad_out, pair_base + t - s);
    term.out = image_view(args.out, pair_base + t - s);
    gradient_weights(term, L, GradMode::B, 0, y0, rows, own_band.inv.data(),
                     own_band.pass.data(), prev_band->inv.data(), ws.w_b.data(),
                     ws.scale_b.data(), ws.shift_b.data());
  }
  // Both terms share the scale (the inverse norm of v_t); their shifts add up.
  acc_t* shift = ws.shift_a.data();
  const acc_t* scale = has_next ? ws.scale_a.data() : ws.scale_b.data();
  if (!has_next) std::copy_n(ws.shift_b.data(), rows * L.Wv, shift);
  else if (has_prev)
    for (int64_t i = 0; i < rows * L.Wv; ++i) shift[i] += ws.shift_b[i];
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    const acc_t* own_rows = stage_chunk(own, L, 0, c0, count, y0, rows_b, own_band.stage.data());
    const GradientEpilogue<acc_t> final{scale, shift, own_rows + L.pad * L.WB + L.pad,
                                        L.stage_cstride, ws.runs.data(), L.run_cstride};
    if (has_next) {
      gather_chunk(L, rows, count, ws.w_a.data(),
                   stage_chunk(next, L, 0, c0, count, y0, rows_b, next_band->stage.data()),
                   ws.dst.data(), false, has_prev ? nullptr : &final);
    }
    if (has_prev) {
      gather_chunk(L, rows, count, ws.w_b.data(),
                   stage_chunk(prev, L, 0, c0, count, y0, rows_b, prev_band->stage.data()),
                   ws.dst.data(), has_next, &final);
    }
    if (!has_next && !has_prev)  // a frame in no pair (T < 2s): zero gradient
      std::fill_n(ws.runs.data(), count * L.run_cstride, acc_t(0));
    write_gradient(L, m, c0, count, y0, rows, ws.runs.data(), ws.converted.data(), args.grad);
  }
}

}  // namespace stccl::cpu
