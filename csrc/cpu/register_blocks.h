// The register blocks of the inner loops: the offsets of one window row (or,
// for small windows, the whole window) held in registers while the channels
// of a staged chunk stream past, SIMD over x. The forward's blocks correlate;
// the backward's gather blocks weight and sum the other operand's rows.
#pragma once

#include "staging.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

// acc[i][j] += sum over count channels of a * b[i][j * dil], for J offsets
// of each of I window rows (b's rows b_rstride apart, the sums' acc_rstride
// apart); the I * J accumulators stay in registers across the channel loop.
// DIL > 0 makes the dilation a compile-time constant (no offset registers).
// a may be a half type, widened in registers (the native builds' flat
// forward, see correlate_flat). sum_sq, when given, gets the squares of a's
// vectors added: a's sums of squares for its norms, where a is not staged.
template <int I, int J, int DIL, typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_window_block(const a_t* a, int64_t a_cstride, const acc_t* b,
                                                int64_t b_cstride, int64_t b_rstride,
                                                int64_t dil_rt, int64_t count, acc_t* acc,
                                                int64_t acc_rstride, int64_t acc_stride,
                                                acc_t* sum_sq = nullptr) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum[I][J];
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) sum[i][j] = load(acc + i * acc_rstride + j * acc_stride);
  auto channels = [&](auto squares) STCCL_LAMBDA_INLINE {
    constexpr bool SQUARES = decltype(squares)::value;
    vec sq = SQUARES ? load(sum_sq) : vec{};
    // An end pointer rather than a counter: the loop must not keep anything
    // in memory (a spilled counter puts a store-to-load chain into every
    // step).
    for (const a_t* const a_end = a + count * a_cstride; a != a_end;
         a += a_cstride, b += b_cstride) {
      const vec av = load(a);
      if constexpr (SQUARES) sq += av * av;
#pragma GCC unroll 8
      for (int i = 0; i < I; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < J; ++j) sum[i][j] += av * load(b + i * b_rstride + j * dil);
    }
    if constexpr (SQUARES) store(sum_sq, sq);
  };
  if (sum_sq) channels(std::true_type{});
  else channels(std::false_type{});
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) store(acc + i * acc_rstride + j * acc_stride, sum[i][j]);
}

// The same for the J offsets of one window row.
template <int J, int DIL, typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_block(const a_t* a, int64_t a_cstride, const acc_t* b,
                                         int64_t b_cstride, int64_t dil_rt, int64_t count,
                                         acc_t* acc, int64_t acc_stride, acc_t* sum_sq = nullptr) {
  correlate_window_block<1, J, DIL>(a, a_cstride, b, b_cstride, int64_t(0), dil_rt, count, acc,
                                    int64_t(0), acc_stride, sum_sq);
}

// correlate_block for R output rows that read the same staged row of b (row
// g lies g * dil rows below row 0, so its window row is g less; its a and
// sums lie g * a_gstride and g * acc_gstride past row 0's): each b vector is
// loaded once for all R rows, R + J loads per R * J FMAs instead of 2 per
// FMA, which lifts the loop off the load ports (shifted b loads straddle two
// cache lines: half of them with 32-byte vectors, all but one in 16 with
// 64-byte ones). Only for the native builds: the empty asm keeps the b vector
// in a register, as GCC otherwise folds the load into every FMA; a 32-byte
// vector fits no register of the portable build.
template <int R, int J, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_rows_block(const acc_t* a, int64_t a_gstride, int64_t a_cstride,
                                              const acc_t* b, int64_t b_cstride, int64_t dil_rt,
                                              int64_t count, acc_t* acc, int64_t acc_gstride,
                                              int64_t acc_stride) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum[R][J];
#pragma GCC unroll 4
  for (int g = 0; g < R; ++g)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) sum[g][j] = load(acc + g * acc_gstride + j * acc_stride);
  for (const acc_t* const a_end = a + count * a_cstride; a != a_end;
       a += a_cstride, b += b_cstride) {
    vec av[R];
#pragma GCC unroll 4
    for (int g = 0; g < R; ++g) av[g] = load(a + g * a_gstride);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      vec bv = load(b + j * dil);
      asm("" : STCCL_VECTOR_REGISTER(bv));
#pragma GCC unroll 4
      for (int g = 0; g < R; ++g) sum[g][j] += av[g] * bv;
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < R; ++g)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) store(acc + g * acc_gstride + j * acc_stride, sum[g][j]);
}

// correlate_window_block over a 3 x 3 window (dilation 1) for R output rows
// at once, the flat forward's row groups (see correlate_row_groups): row g of
// a and of the sums lies g * a_gstride and g * acc_gstride past row 0, the
// sums of offset k k * acc_kstride apart; staged row u of b (u * b_rstride
// past b) serves window row u - g of output row g. Each b vector is loaded
// once for every row that reads it: 3 (R + 2) + R loads per 9 R FMAs where
// one row took 10 per 9 (the shifted b loads split cache lines, and the
// loop was bound by them). Each sum still takes the channels in order, one
// FMA each, as correlate_window_block's. AVX-512 only: R = 3 holds 27 sums,
// three a vectors and b in 31 of the 32 registers (see correlate_rows_block
// for the asm).
template <int R, typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_rows_window_block(const a_t* a, int64_t a_gstride,
                                                     int64_t a_cstride, const acc_t* b,
                                                     int64_t b_cstride, int64_t b_rstride,
                                                     int64_t count, acc_t* acc,
                                                     int64_t acc_gstride, int64_t acc_kstride) {
  using vec = typename Simd<acc_t>::vec;
  vec sum[R][9];
#pragma GCC unroll 4
  for (int g = 0; g < R; ++g)
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) sum[g][k] = load(acc + g * acc_gstride + k * acc_kstride);
  // A pointer per row of a and of b: with offsets from one pointer, GCC kept
  // some of the eight in memory and reloaded them every channel.
  const a_t* a_row[R];
  const acc_t* b_row[R + 2];
#pragma GCC unroll 4
  for (int g = 0; g < R; ++g) a_row[g] = a + g * a_gstride;
#pragma GCC unroll 5
  for (int u = 0; u < R + 2; ++u) b_row[u] = b + u * b_rstride;
  for (int64_t c = 0; c < count; ++c) {
    vec av[R];
#pragma GCC unroll 4
    for (int g = 0; g < R; ++g) {
      av[g] = load(a_row[g]);
      a_row[g] += a_cstride;
    }
#pragma GCC unroll 5
    for (int u = 0; u < R + 2; ++u)
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) {
        vec bv = load(b_row[u] + j);
        if (j == 2) b_row[u] += b_cstride;
        asm("" : STCCL_VECTOR_REGISTER(bv));
#pragma GCC unroll 4
        for (int g = 0; g < R; ++g)
          if (u - g >= 0 && u - g < 3) sum[g][(u - g) * 3 + j] += av[g] * bv;
      }
  }
#pragma GCC unroll 4
  for (int g = 0; g < R; ++g)
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) store(acc + g * acc_gstride + k * acc_kstride, sum[g][k]);
}

// The register blocks of correlate_chunk: inlined in the portable build, and
// in the native builds functions of their own. Inlined into the band loop there,
// they shared its registers, and GCC kept their loops' pointers and bounds on
// the stack: a load, or a store-to-load chain, in every step of loops that are
// bound by loads (docs/cpu_kernels.md has the measurement).
struct InlineBlocks {
  template <int J, int DIL, typename... Args>
  STCCL_ALWAYS_INLINE static void single(Args... args) {
    correlate_block<J, DIL>(args...);
  }
};
struct NativeBlocks {
  template <int J, int DIL, typename... Args>
  STCCL_NATIVE_FUNCTION static void single(Args... args) {
    correlate_block<J, DIL>(args...);
  }
  // correlate_rows_block for R rows, as BLOCK<J, DIL> of STCCL_BLOCKED.
  template <int R>
  struct Rows {
    template <int J, int DIL, typename... Args>
    STCCL_NATIVE_FUNCTION static void block(Args... args) {
      correlate_rows_block<R, J, DIL>(args...);
    }
  };
  template <int R, typename... Args>
  STCCL_NATIVE_FUNCTION static void rows_window(Args... args) {
    correlate_rows_window_block<R>(args...);
  }
  // correlate_window_block for I window rows, as BLOCK<J, DIL> of
  // STCCL_BLOCKED (with MAXB = max_window_block(I)).
  template <int I>
  struct Window {
    template <int J, int DIL, typename... Args>
    STCCL_NATIVE_FUNCTION static void block(Args... args) {
      correlate_window_block<I, J, DIL>(args...);
    }
  };
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

// gather_block for two rows of sums that read the same staged row of x (as
// correlate_rows_block: row 1 lies dil rows below row 0, so its window row is
// one less): each x vector is loaded once for both rows' weights, J loads per
// 2J FMAs instead of 2J (the single blocks' loop is bound by its loads). The
// partial sums take the offsets in the order gather_block does. Only for the
// native builds (see correlate_rows_block's asm).
template <int J, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void gather_pair_block(const acc_t* w0, const acc_t* w1, int64_t w_stride,
                                           const acc_t* x, int64_t x_cstride, int64_t dil_rt,
                                           int64_t count, acc_t* dst0, acc_t* dst1,
                                           int64_t dst_cstride) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec wv0[J], wv1[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    wv0[j] = load(w0 + j * w_stride);
    wv1[j] = load(w1 + j * w_stride);
  }
  for (int64_t cc = 0; cc < count;
       ++cc, x += x_cstride, dst0 += dst_cstride, dst1 += dst_cstride) {
    vec s0 = load(dst0), s1 = vec{}, t0 = load(dst1), t1 = vec{};
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      vec xv = load(x + j * dil);
      asm("" : STCCL_VECTOR_REGISTER(xv));
      if (j % 2 == 0) {
        s0 += wv0[j] * xv;
        t0 += wv1[j] * xv;
      } else {
        s1 += wv0[j] * xv;
        t1 += wv1[j] * xv;
      }
    }
    store(dst0, s0 + s1);
    store(dst1, t0 + t1);
  }
}

// loop(first, second) with both flags as compile-time constants
// (std::true_type / std::false_type): the inner loops' options (the weight
// loops' mirror and shift, the epilogue's shift and streaming).
template <typename Loop>
STCCL_ALWAYS_INLINE void with_flags(bool first, bool second, Loop& loop) {
  using yes = std::true_type;
  using no = std::false_type;
  if (first) {
    if (second) loop(yes{}, yes{});
    else loop(yes{}, no{});
  } else {
    if (second) loop(no{}, yes{});
    else loop(no{}, no{});
  }
}

// The last step of a gradient, grad[c][p] = scale_p * sum_p - shift_p * own[c][p]
// with own from its staged rows, written to `runs`: a channel's rows of the
// band one after the other (W apart), channels run_cstride apart. At one
// (row, x vector) position: the pointers below already point there. Raw
// mode has no shift (null): its gradient does not depend on own, and 0 times
// an infinite own would be NaN. `streamed`: the runs are the gradient itself,
// written with non-temporal stores (see gradient_epilogue; finish_chunk only).
template <typename acc_t>
struct GradientEpilogue {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* own;
  int64_t own_cstride;
  acc_t* runs;
  int64_t run_cstride;
  bool streamed = false;
  // The gradient from the sum (total); SHIFTED: shift != null, a constant of
  // the callers' loops (a test of it per vector slowed the backward 2-7%).
  template <bool SHIFTED>
  STCCL_ALWAYS_INLINE static typename Simd<acc_t>::vec gradient(
      typename Simd<acc_t>::vec scale_v, typename Simd<acc_t>::vec shift_v,
      typename Simd<acc_t>::vec total, const acc_t* own_at) {
    if constexpr (SHIFTED) return scale_v * total - shift_v * load(own_at);
    return scale_v * total;
  }
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
    if (epi.shift) shift = load(epi.shift);
  }
  auto channels = [&](auto shifted, auto streamed) STCCL_LAMBDA_INLINE {
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
        const vec g = GradientEpilogue<acc_t>::template gradient<decltype(shifted)::value>(
            scale, shift, total, epi.own);
        if constexpr (decltype(streamed)::value) stream_store(epi.runs + cc * epi.run_cstride, g);
        else store(epi.runs + cc * epi.run_cstride, g);
        epi.own += epi.own_cstride;
      } else {
        store(dst, total);
      }
    }
  };
  if constexpr (FINAL) with_flags(epi.shift != nullptr, epi.streamed, channels);
  else channels(std::true_type{}, std::false_type{});
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

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
