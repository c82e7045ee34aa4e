// The gathered backward over one band: every gradient element is the sum of
// its own window's terms in a fixed order (no atomics, no scatter), for a
// and b, or for x of a self-correlation, from one pass over the bands.
#pragma once

#include "register_blocks.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

// Per-thread scratch of the backward pass (rows are the band with its halo).
template <typename acc_t>
struct BackwardWorkspace {
  StagedBands<acc_t> staged;  // a and b (spatial), or the frames t, t + s, t - s
  Buffer<acc_t> w_a, w_b;                     // [band_rows][K*K][Wv]
  Buffer<acc_t> scale_a, shift_a, scale_b, shift_b;  // [band_rows][Wv]
  Buffer<acc_t> dst;                          // [chunk] x dst_cstride
  Buffer<acc_t> runs;                         // [chunk] x run_cstride
  Buffer<acc_t> converted;  // gradient rows of a band (one channel's or a chunk's), in scalar_t
  Buffer<acc_t> volume_rows;  // [3][Wv]: rows of grad_out and out in acc_t
  Buffer<acc_t> g_tile;       // the pixel gather's [2][K*K][x_tile] + x_tile (see gradient_tile)
  // other: the layout of a second window over the same bands (the clip's spatial one)
  explicit BackwardWorkspace(const Layout<acc_t>& L, const Layout<acc_t>* other = nullptr)
      : staged(L),
        w_a(L.pixel_gather ? 0 : L.band_rows * L.KK * L.Wv), w_b(w_a.size()),
        scale_a(L.band_rows * L.Wv), shift_a(scale_a.size()), scale_b(scale_a.size()),
        shift_b(scale_a.size()),
        dst(L.chunk * L.dst_cstride),
        runs(L.chunk * L.run_cstride),
        converted(L.run_buffer(L.chunk)),
        volume_rows(3 * L.Wv),
        g_tile(L.pixel_gather ? std::max(g_tile_size(L), other ? g_tile_size(*other) : 0)
                              : 0) {}
  static int64_t g_tile_size(const Layout<acc_t>& L) { return 2 * L.KK * L.x_tile + L.x_tile; }
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

enum class GradMode { A, B, Self };

// Elements [x_lo, x_hi) of a row of grad_out or out (x stride `stride`) in
// acc_t: the row itself where it already is, else converted into `buffer`
// (float16 a vector at a time, see convert_row). Indexed by x either way.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE const acc_t* row_in_acc(const scalar_t* row, int64_t stride, int64_t x_lo,
                                            int64_t x_hi, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return row;
  }
  if (stride == 1) {
    convert_row(row + x_lo, buffer + x_lo, x_hi - x_lo);
  } else {
    for (int64_t x = x_lo; x < x_hi; ++x) buffer[x] = static_cast<acc_t>(row[x * stride]);
  }
  return buffer;
}

// One row of gradient_weights: wk = (g + g_mirror) * inv_q over [x_lo, x_hi)
// and, given `out` (o), the shift's sums csum += (g + g_mirror) * o.
template <typename acc_t>
STCCL_ALWAYS_INLINE void weight_row(const acc_t* g, const acc_t* g_mirror, const acc_t* o,
                                    const acc_t* inv_q, int64_t x_lo, int64_t x_hi, acc_t* wk,
                                    acc_t* csum) {
  auto loop = [&](auto with_mirror, auto with_shift) STCCL_LAMBDA_INLINE {
    for (int64_t x = x_lo; x < x_hi; ++x) {
      acc_t gv = g[x];
      if constexpr (decltype(with_mirror)::value) gv += g_mirror[x];
      wk[x] = gv * inv_q[x];
      if constexpr (decltype(with_shift)::value) csum[x] += gv * o[x];
    }
  };
  with_flags(g_mirror != nullptr, o != nullptr, loop);
}

// Whether weight_row_vectors reads rows of scalar_t in this build: acc_t and
// bfloat16 anywhere, float16 in the native builds (NATIVE: the band runs
// there, see load of half types in simd.h).
template <bool NATIVE, typename scalar_t, typename acc_t>
constexpr bool rows_load_as_acc() {
  return std::is_same_v<scalar_t, acc_t> || std::is_same_v<scalar_t, c10::BFloat16> ||
         (NATIVE && HALF_LOADS);
}

template <bool NATIVE, typename acc_t, typename scalar_t>
STCCL_ALWAYS_INLINE typename Simd<acc_t>::vec load_row_vector(const scalar_t* p) {
  if constexpr (NATIVE && HALF_LOADS && !std::is_same_v<scalar_t, acc_t>) return load(p);
  else return load_as<acc_t>(p);
}

// weight_row in whole vectors, g, g_mirror and o read where they lie
// (contiguous rows of scalar_t, converted in registers): no rows converted
// into volume_rows first and no scalar tail. The last vector ends at x_hi
// and overlaps the one before it, whose lanes keep the sums they have.
// Needs x_hi - x_lo >= V.
template <bool NATIVE, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void weight_row_vectors(const scalar_t* g, const scalar_t* g_mirror,
                                            const scalar_t* o, const acc_t* inv_q, int64_t x_lo,
                                            int64_t x_hi, acc_t* wk, acc_t* csum) {
  using vec = typename Simd<acc_t>::vec;
  using lanes_vec = decltype(vec{} < vec{});
  using lane_t = decltype(lanes_vec{}[0] + 0);
  constexpr int64_t V = Simd<acc_t>::lanes;
  auto loop = [&](auto with_mirror, auto with_shift) STCCL_LAMBDA_INLINE {
    auto vector_at = [&](int64_t x, auto masked, lanes_vec keep) STCCL_LAMBDA_INLINE {
      vec gv = load_row_vector<NATIVE, acc_t>(g + x);
      if constexpr (decltype(with_mirror)::value)
        gv += load_row_vector<NATIVE, acc_t>(g_mirror + x);
      store(wk + x, gv * load(inv_q + x));
      if constexpr (decltype(with_shift)::value) {
        const vec sum = load(csum + x);
        vec next = sum + gv * load_row_vector<NATIVE, acc_t>(o + x);
        if constexpr (decltype(masked)::value) next = keep ? next : sum;
        store(csum + x, next);
      }
    };
    int64_t x = x_lo;
    for (; x + V <= x_hi; x += V) vector_at(x, std::false_type{}, lanes_vec{});
    if (x < x_hi) {
      lanes_vec lane{};
      for (int i = 0; i < V; ++i) lane[i] = i;
      vector_at(x_hi - V, std::true_type{}, lane >= static_cast<lane_t>(x - (x_hi - V)));
    }
  };
  with_flags(g_mirror != nullptr, o != nullptr, loop);
}

// The weight w[k][p] of other[p + d_k] in the gradient at p, and the per-pixel
// scale and shift, for one band. With â = a * ra:
//   grad_a[p] = ra_p sum_k g[p,k] rb_q b_q - pass_p ra_p^2 c_p a_p,
//               q = p + d_k, c_p = sum_k g[p,k] out[p,k];
//   grad_b[p] gathers the outputs o = p + d_k whose offset mirror(k) lands on
//               p, with weights g[o,mirror(k)] ra_o;
//   self:       G[p,k] = g[p,k] + g[q,mirror(k)] (the two roles of x).
// So grad[p] = scale_p * sum_k w[k][p] other[p + d_k] - shift_p own_p. The
// norms are the band's halo arrays of halo_norms.
template <bool NATIVE, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void gradient_weights(const BackwardArgs<scalar_t, acc_t>& args,
                                          const Layout<acc_t>& L, GradMode mode, int64_t n,
                                          int64_t y0, int64_t rows, const acc_t* inv_own,
                                          const acc_t* pass_own, const acc_t* inv_other,
                                          acc_t* w, acc_t* scale, acc_t* shift,
                                          acc_t* volume_rows) {
  const int64_t K = L.K, KK = L.KK, H = L.image_H, W = L.image_W, Wv = L.Wv;
  const int64_t gx = args.grad_out.strides.x, ox = args.out.strides.x;
  const bool shifted = args.normalize;  // raw mode has no shift: out is not read
  constexpr int64_t V = Simd<acc_t>::lanes;
  const bool rows_as_they_lie = gx == 1 && (!shifted || ox == 1);
  std::fill_n(w, rows * KK * Wv, acc_t(0));
  std::fill_n(shift, rows * Wv, acc_t(0));
  for (int64_t rr = 0; rr < L.image_rows(rows); ++rr) {
    const int64_t y = y0 + rr;
    // Where image row rr starts: in the [rows][K*K][Wv] weights, in the
    // [rows][Wv] scale and shift, and in the staged rows (with the halo).
    const int64_t w_row = L.flat ? rr * W : rr * KK * Wv;
    const int64_t p_row = L.flat ? rr * W : rr * Wv;
    const int64_t s_row = L.own_offset() + rr * L.row_step;
    acc_t* csum = shift + p_row;
    for (int64_t k = 0; k < KK; ++k) {
      const int64_t dy = offset_dy(k, K, L.dilation), dx = offset_dx(k, K, L.dilation);
      const int64_t yq = y + dy;
      if (yq < 0 || yq >= H) continue;
      const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min(W, W - dx);
      acc_t* wk = w + w_row + k * Wv;
      const acc_t* inv_q = inv_other + s_row + dy * L.row_step + dx;
      if constexpr (rows_load_as_acc<NATIVE, scalar_t, acc_t>()) {
        if (rows_as_they_lie && x_hi - x_lo >= V) {
          const bool b = mode == GradMode::B;
          const int64_t kg = b ? mirror_offset(k, K) : k, yg = b ? yq : y, xg = b ? dx : 0;
          const scalar_t* mirror =
              mode == GradMode::Self ? args.grad_out.row(n, mirror_offset(k, K), yq) + dx
                                     : nullptr;
          weight_row_vectors<NATIVE>(args.grad_out.row(n, kg, yg) + xg, mirror,
                                     shifted ? args.out.row(n, kg, yg) + xg : nullptr, inv_q,
                                     x_lo, x_hi, wk, csum);
          continue;
        }
      }
      if (mode == GradMode::B) {
        // The output at o = p + d_k whose offset mirror(k) points back at p.
        const int64_t km = mirror_offset(k, K);
        const acc_t* g = row_in_acc(args.grad_out.row(n, km, yq) + dx * gx, gx, x_lo, x_hi,
                                    volume_rows);
        const acc_t* o = shifted ? row_in_acc(args.out.row(n, km, yq) + dx * ox, ox, x_lo,
                                              x_hi, volume_rows + Wv)
                                 : nullptr;
        weight_row(g, static_cast<const acc_t*>(nullptr), o, inv_q, x_lo, x_hi, wk, csum);
      } else {
        const acc_t* g = row_in_acc(args.grad_out.row(n, k, y), gx, x_lo, x_hi, volume_rows);
        const acc_t* o =
            shifted ? row_in_acc(args.out.row(n, k, y), ox, x_lo, x_hi, volume_rows + Wv) : nullptr;
        const acc_t* g_mirror =
            mode == GradMode::Self
                ? row_in_acc(args.grad_out.row(n, mirror_offset(k, K), yq) + dx * gx, gx, x_lo,
                             x_hi, volume_rows + 2 * Wv)
                : nullptr;
        weight_row(g, g_mirror, o, inv_q, x_lo, x_hi, wk, csum);
      }
    }
    const acc_t* inv_p = inv_own + s_row;
    const acc_t* pass_p = pass_own + s_row;
    for (int64_t x = 0; x < W; ++x) {
      scale[p_row + x] = inv_p[x];
      csum[x] *= pass_p[x] * inv_p[x] * inv_p[x];  // 0 in raw mode (pass = 0)
    }
  }
}

// The last step of a gradient over a chunk's sums in dst: runs = scale * dst -
// shift * own, rows in order (a row's last vector runs into the next row's
// start, which is written after it); with final.streamed, non-temporal
// stores straight into the gradient (see gradient_epilogue).
template <typename acc_t>
STCCL_ALWAYS_INLINE void finish_chunk(const Layout<acc_t>& L, int64_t rows, int64_t count,
                                      const acc_t* dst, const GradientEpilogue<acc_t>& final) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t V = Simd<acc_t>::lanes;
  auto channels = [&](auto shifted, auto streamed) STCCL_LAMBDA_INLINE {
    constexpr bool SHIFTED = decltype(shifted)::value;
    for (int64_t cc = 0; cc < count; ++cc) {
      for (int64_t rr = 0; rr < rows; ++rr) {
        const acc_t* scale = final.scale + rr * L.Wv;
        const acc_t* own = final.own + cc * final.own_cstride + rr * L.WB;
        const acc_t* total = dst + cc * L.dst_cstride + rr * L.Wv;
        acc_t* run = final.runs + cc * final.run_cstride + rr * L.W;
        for (int64_t xb = 0; xb < L.Wv; xb += V) {
          const vec shift = SHIFTED ? load(final.shift + rr * L.Wv + xb) : vec{};
          const vec g = GradientEpilogue<acc_t>::template gradient<SHIFTED>(
              load(scale + xb), shift, load(total + xb), own + xb);
          if constexpr (decltype(streamed)::value) stream_store(run + xb, g);
          else store(run + xb, g);
        }
      }
    }
  };
  with_flags(final.shift != nullptr, final.streamed, channels);
}

// dst[cc][rr] (+)= sum_k w[k][rr] * other_stage[cc][rr + d_k] for one chunk;
// with `final` (positioned at the band's first row), the last term of a
// gradient: the sums go on through the epilogue into its runs.
// ROW_PAIRS: the native builds' row-pair gather (see gather_pair_block).
// other_in_place: in the flat layout of a window up to 3 x 3, the chunk's
// first channel of the other operand where it lies (channels
// in_place_cstride apart), read by the vectors inside the image
// (Layout::interior_lo/hi; see stage_edges), or null.
template <bool ROW_PAIRS, typename acc_t>
STCCL_ALWAYS_INLINE void gather_chunk(const Layout<acc_t>& L, int64_t rows, int64_t count,
                                      const acc_t* w, const acc_t* other_stage,
                                      const acc_t* other_in_place, int64_t in_place_cstride,
                                      acc_t* dst, bool accumulate,
                                      const GradientEpilogue<acc_t>* final) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, W = L.W, Wv = L.Wv, WB = L.WB;
  const int64_t step = L.row_step;
  const int64_t inside_lo = other_in_place ? L.interior_lo() : 0;
  const int64_t inside_hi = other_in_place ? L.interior_hi() : 0;
  // Where the window of row rr's x vector xb starts, and its channel stride.
  auto other_at = [&](int64_t rr, int64_t xb) STCCL_LAMBDA_INLINE {
    if (xb >= inside_lo && xb < inside_hi)
      return std::pair<const acc_t*, int64_t>(other_in_place + (xb - L.pad_x), in_place_cstride);
    return std::pair<const acc_t*, int64_t>(other_stage + rr * WB + xb, L.stage_cstride);
  };
  // The epilogue at row rr, x vector xb.
  auto epilogue_at = [&](int64_t rr, int64_t xb) STCCL_LAMBDA_INLINE {
    GradientEpilogue<acc_t> e{};
    if (final)
      e = {final->scale + rr * Wv + xb, final->shift ? final->shift + rr * Wv + xb : nullptr,
           final->own + rr * WB + xb, final->own_cstride, final->runs + rr * W + xb,
           final->run_cstride, final->streamed};
    return e;
  };
  if (K <= 3) {
    STCCL_WITH_DILATION(d, {
      for (int64_t rr = 0; rr < rows; ++rr) {
        for (int64_t xb = 0; xb < Wv; xb += V) {
          const acc_t* w_vec = w + rr * KK * Wv + xb;
          const auto [x_vec, x_cstride] = other_at(rr, xb);
          acc_t* d_vec = dst + rr * Wv + xb;
          const GradientEpilogue<acc_t> e = epilogue_at(rr, xb);
          auto run = [&](auto kw, auto is_final) STCCL_LAMBDA_INLINE {
            gather_window<decltype(kw)::value, DIL, decltype(is_final)::value>(
                w_vec, Wv, x_vec, x_cstride, step, d, count, d_vec, L.dst_cstride, accumulate,
                e);
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
      // Rows in pairs (rr, rr + d), as the forward groups them: staged row
      // rr + i * d serves window row i of rr and window row i - 1 of rr + d.
      const bool pairs = ROW_PAIRS && !L.flat;
      if (pairs && (rr / d) % 2 == 1) continue;  // the second row of a pair
      const bool pair = pairs && rr + d < rows;
      for (int64_t i = 0; i < K + (pair ? 1 : 0); ++i) {
        const bool row0 = i < K, row1 = pair && i > 0;
        for (int64_t xb = 0; xb < Wv; xb += V) {
          const acc_t* w0 = w + (rr * KK + i * K) * Wv + xb;
          const acc_t* w1 = w + ((rr + d) * KK + (i - 1) * K) * Wv + xb;
          const acc_t* x_vec = other_stage + rr * WB + i * d * step + xb;
          acc_t* dst0 = dst + rr * Wv + xb;
          acc_t* dst1 = dst + (rr + d) * Wv + xb;
          if constexpr (ROW_PAIRS) {
            if (row0 && row1) {
              STCCL_BLOCKED(gather_pair_block, MAX_PAIR_GATHER_BLOCK, DIL, K, w0 + j0 * Wv,
                            w1 + j0 * Wv, Wv, x_vec + j0 * d, L.stage_cstride, d, count, dst0,
                            dst1, L.dst_cstride);
              continue;
            }
          }
          STCCL_BLOCKED(gather_block, MAX_BLOCK, DIL, K, (row0 ? w0 : w1) + j0 * Wv, Wv,
                        x_vec + j0 * d, L.stage_cstride, d, count, row0 ? dst0 : dst1,
                        L.dst_cstride);
        }
      }
    }
  });
  if (final) finish_chunk(L, rows, count, dst, *final);
}

// Channels per register block of the pixel gather: their sums, the weight
// and the loads take 11 of the 16 registers.
constexpr int PIXEL_BLOCK = 8;

// sum[c] += the terms of one window row (K offsets, weights G g_stride apart)
// for CHANNELS channels: the pixel gather's inner loop.
template <int CHANNELS, typename acc_t>
STCCL_ALWAYS_INLINE void gather_window_row(const acc_t* G, int64_t g_stride, const acc_t* inv,
                                           const acc_t* other, int64_t cstride, int64_t K,
                                           int64_t dil, typename Simd<acc_t>::vec (&sum)[CHANNELS]) {
  for (int64_t j = 0; j < K; ++j, G += g_stride) {
    const auto w = load(G) * load(inv + j * dil);
#pragma GCC unroll 8
    for (int c = 0; c < CHANNELS; ++c) sum[c] += w * load(other + c * cstride + j * dil);
  }
}

// The pixel gather (few channels, see Layout::pixel_gather): per vector of
// pixels, the weight of each offset is formed in a register from grad_out
// and the other operand's inverse norm as the offsets go by, and multiplies
// every channel's neighbour into that channel's sum, one register each:
//   dst[c][p] (+)= sum_k G[k][p] inv[p + d_k] other[c][p + d_k]
// (no weight buffers, no pass over the weights per channel chunk). The
// shift needs no read of `out` (finish_pixel_gradient). G, inv and other
// point at the vector: G the offsets' weights g_stride apart, inv and other
// at the window's first offset in staged rows.
template <int CHANNELS, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void gather_pixels(const acc_t* G, int64_t g_stride, const acc_t* inv,
                                       const acc_t* other, int64_t cstride, int64_t K,
                                       int64_t step, int64_t dil_rt, acc_t* dst,
                                       int64_t dst_cstride, bool accumulate) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum[CHANNELS];
#pragma GCC unroll 8
  for (int c = 0; c < CHANNELS; ++c) sum[c] = accumulate ? load(dst + c * dst_cstride) : vec{};
  for (int64_t i = 0; i < K; ++i, inv += dil * step, other += dil * step, G += K * g_stride)
    gather_window_row(G, g_stride, inv, other, cstride, K, dil, sum);
#pragma GCC unroll 8
  for (int c = 0; c < CHANNELS; ++c) store(dst + c * dst_cstride, sum[c]);
}

// Channels per register block of the pixel gather over a pair of rows: two
// sums per channel (16 of AVX-512's 32 registers, 8 of AVX2's 16).
constexpr int PIXEL_PAIR_BLOCK = STCCL_VECTOR_BYTES == 64 ? 8 : 4;

// gather_pixels for two output rows d apart (the native builds': the empty
// asm needs the vector in a register), as the forward's row groups:
// staged row i * d of the first row's window is window row i of the first
// (i < K) and window row i - 1 of the second (i > 0), so each neighbour
// loaded serves both rows' sums (G0, G1: the rows' weights). The neighbour
// loads bound the single row (with 16-lane vectors almost every one splits a
// cache line); here there is one per two multiply-adds. Each sum takes the
// same terms in the same order as gather_pixels.
template <int CHANNELS, int DIL, typename acc_t>
STCCL_ALWAYS_INLINE void gather_pixel_pair(const acc_t* G0, const acc_t* G1, int64_t g_stride,
                                           const acc_t* inv, const acc_t* other,
                                           int64_t cstride, int64_t K, int64_t step,
                                           int64_t dil_rt, acc_t* dst0, acc_t* dst1,
                                           int64_t dst_cstride, bool accumulate) {
  using vec = typename Simd<acc_t>::vec;
  const int64_t dil = DIL > 0 ? DIL : dil_rt;
  vec sum0[CHANNELS], sum1[CHANNELS];
#pragma GCC unroll 8
  for (int c = 0; c < CHANNELS; ++c) {
    sum0[c] = accumulate ? load(dst0 + c * dst_cstride) : vec{};
    sum1[c] = accumulate ? load(dst1 + c * dst_cstride) : vec{};
  }
  // Staged rows 0 and K * d: one row's window alone reaches them (the first's
  // window row 0, the second's K - 1).
  gather_window_row(G0, g_stride, inv, other, cstride, K, dil, sum0);
  for (int64_t i = 1; i < K; ++i) {
    inv += dil * step;
    other += dil * step;
    const acc_t* g0 = G0 + i * K * g_stride;
    const acc_t* g1 = G1 + (i - 1) * K * g_stride;
    for (int64_t j = 0; j < K; ++j, g0 += g_stride, g1 += g_stride) {
      const vec q = load(inv + j * dil);
      const vec w0 = load(g0) * q, w1 = load(g1) * q;
#pragma GCC unroll 8
      for (int c = 0; c < CHANNELS; ++c) {
        vec x = load(other + c * cstride + j * dil);
        asm("" : STCCL_VECTOR_REGISTER(x));  // one load for both (GCC folds it into each FMA)
        sum0[c] += w0 * x;
        sum1[c] += w1 * x;
      }
    }
  }
  inv += dil * step;
  other += dil * step;
  gather_window_row(G1 + (K - 1) * K * g_stride, g_stride, inv, other, cstride, K, dil, sum1);
#pragma GCC unroll 8
  for (int c = 0; c < CHANNELS; ++c) {
    store(dst0 + c * dst_cstride, sum0[c]);
    store(dst1 + c * dst_cstride, sum1[c]);
  }
}

// gather_pixel_pair as a function of the native build: its empty asm cannot
// sit in a lambda, which does not take the target it is inlined into (see
// NativeBlocks).
template <int CHANNELS, int DIL, typename... Args>
STCCL_NATIVE_FUNCTION void native_pixel_pair(Args... args) {
  gather_pixel_pair<CHANNELS, DIL>(args...);
}

// G[k][x] = grad_out's weight of offset k at pixel (y, x0 + x), x < X, in
// acc_t, zero where the term does not exist: mode A g[k] at the pixel; mode B
// g[mirror(k)] at p + d_k (the output whose offset mirror(k) lands on p);
// Self the sum of both. `scratch` holds one more row of X.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void gradient_tile(const Operand<scalar_t>& grad_out, const Layout<acc_t>& L,
                                       GradMode mode, int64_t n, int64_t y, int64_t x0,
                                       int64_t X, acc_t* G, acc_t* scratch) {
  const int64_t K = L.K, W = L.W, H = L.H, gx = grad_out.strides.x;
  for (int64_t k = 0; k < L.KK; ++k) {
    acc_t* row = G + k * X;
    if (mode != GradMode::B) {
      const int64_t hi = std::min(X, W - x0);
      const acc_t* g = row_in_acc(grad_out.row(n, k, y) + x0 * gx, gx, 0, hi, row);
      if (g != row) std::copy_n(g, hi, row);
      std::fill(row + hi, row + X, acc_t(0));
    }
    if (mode == GradMode::A) continue;
    const int64_t dy = offset_dy(k, K, L.dilation), dx = offset_dx(k, K, L.dilation);
    acc_t* mirrored = mode == GradMode::B ? row : scratch;
    const int64_t lo = std::clamp<int64_t>(-dx - x0, 0, X);
    const int64_t hi = std::clamp<int64_t>(W - dx - x0, lo, X);
    if (y + dy < 0 || y + dy >= H) {
      if (mode == GradMode::B) std::fill_n(row, X, acc_t(0));
      continue;
    }
    const acc_t* g = row_in_acc(grad_out.row(n, mirror_offset(k, K), y + dy) + (x0 + dx) * gx, gx,
                                lo, hi, mirrored);
    if (mode == GradMode::B) {
      if (g != row) std::copy(g + lo, g + hi, row + lo);
      std::fill_n(row, lo, acc_t(0));
      std::fill(row + hi, row + X, acc_t(0));
    } else {
      for (int64_t x = lo; x < hi; ++x) row[x] += g[x];
    }
  }
}

// One term of a gradient by the pixel gather, into dst (the band's sums of
// every channel, accumulating onto them or not): the other operand's staged
// rows and inverse norms `other` and `other_inv` (at the window's reach, see
// Layout::inset), grad_out's weights by gradient_tile. `tile`: 2 * K*K
// * x_tile + x_tile values of scratch (a tile per row of a pair, and a row).
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void pixel_gather_term(const Layout<acc_t>& L, const Operand<scalar_t>& grad_out,
                                           GradMode mode, int64_t n, int64_t y0, int64_t rows,
                                           const acc_t* other_inv, const acc_t* other,
                                           acc_t* dst, bool accumulate, acc_t* tile) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t X = L.x_tile, d = L.dilation;
  acc_t* scratch = tile + 2 * L.KK * X;
  const int64_t plane_bytes = grad_out.strides.c * int64_t(sizeof(scalar_t));
  const bool planes_alias = plane_bytes % ALIASED_PLANE_PERIOD_BYTES == 0 &&
                            grad_out.strides.y * int64_t(sizeof(scalar_t)) >= ALIASED_MIN_ROW_BYTES;
  STCCL_WITH_DILATION(d, {
    for (int64_t rr = 0; rr < rows; ++rr) {
      // ROW_PAIRS: rows in pairs (rr, rr + d) where both are in the band
      // (see gather_pixel_pair).
      if (ROW_PAIRS && (rr / d) % 2 == 1) continue;  // the second row of a pair
      const bool pair = ROW_PAIRS && rr + d < rows;
      const int64_t last = pair ? rr + d : rr;
      for (int64_t x0 = 0; x0 < L.Wv; x0 += X) {
        const int64_t width = std::min(X, L.Wv - x0);
        // Mode A's weights are grad_out's rows at the pixel itself: read in
        // place where they are acc_t, contiguous, whole vectors of them lie
        // in its storage (lanes past the row read the next row's values,
        // which stay in lanes that are never written out), and the planes do
        // not alias (see ALIASED_PLANE_PERIOD_BYTES); a copy into the tile
        // took as long as the gather on few channels.
        bool in_place = false;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          in_place = mode == GradMode::A && grad_out.strides.x == 1 && !planes_alias &&
                     grad_out.end - (grad_out.row(n, L.KK - 1, y0 + last) + x0) >= width;
        }
        const int64_t g_stride = in_place ? grad_out.strides.c : width;
        // Row rr's weights from x0: in place, or its tile in `buffer`.
        auto weights = [&](int64_t row, acc_t* buffer) STCCL_LAMBDA_INLINE {
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            if (in_place) return grad_out.row(n, 0, y0 + row) + x0;
          }
          gradient_tile(grad_out, L, mode, n, y0 + row, x0, width, buffer, scratch);
          return static_cast<const acc_t*>(buffer);
        };
        const acc_t* g0 = weights(rr, tile);
        const acc_t* g1 = pair ? weights(rr + d, tile + L.KK * X) : nullptr;
        // Channels in blocks of at most PIXEL_BLOCK (a pair: PIXEL_PAIR_BLOCK),
        // as equal as can be.
        const int64_t max_block = pair ? PIXEL_PAIR_BLOCK : PIXEL_BLOCK;
        const int64_t blocks = (L.C + max_block - 1) / max_block;
        const int64_t size = (L.C + blocks - 1) / blocks;
        for (int64_t xb = 0; xb < width; xb += V) {
          const int64_t at = rr * L.WB + x0 + xb;
          for (int64_t c0 = 0; c0 < L.C; c0 += size) {
            acc_t* dst0 = dst + c0 * L.dst_cstride + rr * L.Wv + x0 + xb;
            auto run = [&](auto channels) STCCL_LAMBDA_INLINE {
              constexpr int CHANNELS = decltype(channels)::value;
              if constexpr (ROW_PAIRS && CHANNELS <= PIXEL_PAIR_BLOCK) {
                if (pair) {
                  native_pixel_pair<CHANNELS, DIL>(
                      g0 + xb, g1 + xb, g_stride, other_inv + at,
                      other + c0 * L.stage_cstride + at, L.stage_cstride, L.K, L.row_step, d,
                      dst0, dst0 + d * L.Wv, L.dst_cstride, accumulate);
                  return;
                }
              }
              gather_pixels<CHANNELS, DIL>(g0 + xb, g_stride, other_inv + at,
                                           other + c0 * L.stage_cstride + at, L.stage_cstride,
                                           L.K, L.row_step, d, dst0, L.dst_cstride, accumulate);
            };
            switch (std::min(size, L.C - c0)) {
              case 1: run(std::integral_constant<int, 1>{}); break;
              case 2: run(std::integral_constant<int, 2>{}); break;
              case 3: run(std::integral_constant<int, 3>{}); break;
              case 4: run(std::integral_constant<int, 4>{}); break;
              case 5: run(std::integral_constant<int, 5>{}); break;
              case 6: run(std::integral_constant<int, 6>{}); break;
              case 7: run(std::integral_constant<int, 7>{}); break;
              default: run(std::integral_constant<int, PIXEL_BLOCK>{}); break;
            }
          }
        }
      }
    }
  });
}

// The epilogue of a chunk's gradient (channels c0 on of image n's band at
// y0): its runs straight in grad (contiguous (N, C, H, W)) with non-temporal
// stores where finish_chunk writes them (a channel's rows in order) and they
// are whole vectors from a 16-byte boundary (acc_t gradients), else in
// `runs` (run_cstride apart), which write_gradient streams out. Streamed
// straight, a gradient value goes through the cache once less (S3 backward
// 12.7-13.1 -> 12.1-12.4 ms, 2 x 16 x 128 x 128 K = 5 1.31 -> 1.25). The
// gather of windows up to 3 x 3 writes a vector of every channel in turn:
// with 32-byte vectors, lines written in halves, far apart, took S1's
// backward from 4.4 to 9.0 ms, so it streams only where each vector is a
// whole line (64-byte vectors from a line boundary; Zen 4, 2 threads,
// backward: 2 x 32 x 8 x 1024 0.549 -> 0.468 ms, 2 x 64 x 64 x 512 4.48 ->
// 4.09, S1 4.11 -> 3.88).
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE GradientEpilogue<acc_t> gradient_epilogue(
    const Layout<acc_t>& L, int64_t n, int64_t c0, int64_t y0, const acc_t* scale,
    const acc_t* shift, const acc_t* own, int64_t own_cstride, acc_t* runs, scalar_t* grad) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    acc_t* first = grad + ((n * L.C + c0) * L.H + y0) * L.W;
    const bool whole_lines = Simd<acc_t>::lanes * int64_t(sizeof(acc_t)) == 64 &&
                             reinterpret_cast<uintptr_t>(first) % 64 == 0;
    if ((L.pixel_gather || L.K > 3 || whole_lines) && !L.single_gradient_run &&
        L.rows_stream_from(first))
      return {scale, shift, own, own_cstride, first, L.H * L.W, true};
  }
  return {scale, shift, own, own_cstride, runs, L.run_cstride};
}

// Streams the chunk's gradient runs to grad (contiguous (N, C, H, W)),
// rounded to a half type on the way where the build can (stream_rounded),
// else converted to scalar_t through the buffer when it is not acc_t; with
// L.single_gradient_run the chunk's channels, one after the other in grad, are
// gathered in the buffer and streamed as one run.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void write_gradient(const Layout<acc_t>& L, int64_t n, int64_t c0,
                                        int64_t count, int64_t y0, int64_t rows,
                                        const acc_t* runs, acc_t* buffer, scalar_t* grad) {
  const int64_t elements = rows * L.W;
  scalar_t* gathered = reinterpret_cast<scalar_t*>(buffer);
  for (int64_t cc = 0; cc < count; ++cc) {
    const acc_t* run = runs + cc * L.run_cstride;
    scalar_t* out = grad + ((n * L.C + c0 + cc) * L.H + y0) * L.W;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (!L.single_gradient_run && stream_rounded(run, out, elements)) continue;
    }
    const void* src = run;
    if (L.single_gradient_run || !std::is_same_v<scalar_t, acc_t>) {
      scalar_t* dst = gathered + (L.single_gradient_run ? cc * elements : 0);
      convert_row(run, dst, elements);
      src = dst;
    }
    if (!L.single_gradient_run) stream_copy(out, src, elements * int64_t(sizeof(scalar_t)));
  }
  if (L.single_gradient_run)
    stream_copy(grad + (n * L.C + c0) * L.H * L.W, gathered,
                count * elements * int64_t(sizeof(scalar_t)));
}

// The end of a pixel-gathered gradient, from its sums S (ws.dst, every
// channel): scale and shift without the volume, grad = inv S - pass inv^2 c
// own with c = sum_k g out = inv <own, S> (out = inv_own inv_other <own,
// other>), so shift = pass inv^3 <own, S> (none in raw mode); then the
// runs (finish_chunk) and grad image n's band (write_gradient).
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void finish_pixel_gradient(const Layout<acc_t>& L, bool normalize, int64_t n,
                                               int64_t y0, int64_t rows,
                                               const StagedBand<acc_t>& own_band,
                                               BackwardWorkspace<acc_t>& ws, scalar_t* grad) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t at0 = L.own_offset();
  const acc_t* own = own_band.stage.data() + at0;
  const acc_t* dst = ws.dst.data();
  acc_t* scale = ws.scale_a.data();
  acc_t* shift = ws.shift_a.data();
  for (int64_t rr = 0; rr < rows; ++rr) {
    for (int64_t xb = 0; xb < L.Wv; xb += V) {
      const int64_t at = rr * L.WB + xb, p = rr * L.Wv + xb;
      const vec inv = load(own_band.inv.data() + at0 + at);
      store(scale + p, inv);
      if (!normalize) continue;  // no shift, and no pass over the channels for it
      vec dot{};
      for (int64_t c = 0; c < L.C; ++c)
        dot += load(own + c * L.stage_cstride + at) * load(dst + c * L.dst_cstride + p);
      store(shift + p, load(own_band.pass.data() + at0 + at) * inv * inv * inv * dot);
    }
  }
  const GradientEpilogue<acc_t> final = gradient_epilogue(
      L, n, 0, y0, scale, normalize ? shift : nullptr, own, L.stage_cstride, ws.runs.data(), grad);
  finish_chunk(L, rows, L.C, dst, final);
  if (!final.streamed)
    write_gradient(L, n, 0, L.C, y0, rows, ws.runs.data(), ws.converted.data(), grad);
}

// An operand's chunk for the gather: its staged rows (with the halo), and
// where its inside lies when read in place (then only the edges are staged;
// else null), channels in_place_cstride apart.
template <typename acc_t>
struct ChunkRows {
  const acc_t* staged;
  const acc_t* in_place;
  int64_t in_place_cstride;
};

// One band of the backward pass: both gradients (or the self-correlation's)
// from one pass. The band's rows of a and b (with the halo) are read from
// memory once for the norms and found in cache by the channel loop, which
// gathers per output pixel: no atomics.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void backward_band(const BackwardArgs<scalar_t, acc_t>& args,
                                       const Layout<acc_t>& L, int64_t task,
                                       BackwardWorkspace<acc_t>& ws) {
  const int64_t n = task / L.bands, y0 = (task % L.bands) * L.band_rows;
  const int64_t rows = std::min(L.band_rows, L.H - y0), rows_b = rows + 2 * L.pad_y;
  const bool two = !args.self;
  if (L.flat && n + 1 < L.N) {  // the next task's image: its volumes' planes are short bursts
    prefetch_image(args.grad_out, L, n + 1, L.KK);
    if (args.normalize) prefetch_image(args.out, L, n + 1, L.KK);
  }
  StagedBand<acc_t>& A = ws.staged[0];
  StagedBand<acc_t>& B = two ? ws.staged[1] : A;
  acc_t* a_stage = A.stage.data();
  acc_t* b_stage = B.stage.data();
  halo_norms(args.a, args.normalize, args.eps, L, n, y0, rows_b, a_stage, A.inv.data(),
             A.pass.data());
  if (two)
    halo_norms(args.b, args.normalize, args.eps, L, n, y0, rows_b, b_stage, B.inv.data(),
               B.pass.data());
  if (L.pixel_gather) {
    // Each gradient: its sums, then scale, shift and the runs from them.
    auto gradient = [&](GradMode mode, const StagedBand<acc_t>& own,
                        const StagedBand<acc_t>& other, scalar_t* grad) STCCL_LAMBDA_INLINE {
      pixel_gather_term<ROW_PAIRS>(L, args.grad_out, mode, n, y0, rows, other.inv.data(),
                                   other.stage.data(), ws.dst.data(), false, ws.g_tile.data());
      finish_pixel_gradient(L, args.normalize, n, y0, rows, own, ws, grad);
    };
    if (args.grad_a) gradient(two ? GradMode::A : GradMode::Self, A, B, args.grad_a);
    if (args.grad_b) gradient(GradMode::B, B, A, args.grad_b);
    return;
  }
  if (args.grad_a)
    gradient_weights<ROW_PAIRS>(args, L, two ? GradMode::A : GradMode::Self, n, y0, rows,
                                A.inv.data(), A.pass.data(), B.inv.data(), ws.w_a.data(),
                                ws.scale_a.data(), ws.shift_a.data(), ws.volume_rows.data());
  if (args.grad_b)
    gradient_weights<ROW_PAIRS>(args, L, GradMode::B, n, y0, rows, B.inv.data(),
                                B.pass.data(), A.inv.data(), ws.w_b.data(), ws.scale_b.data(),
                                ws.shift_b.data(), ws.volume_rows.data());
  // Raw mode's flat layout reads each chunk where it lies for the vectors
  // inside the image and stages only the edges (the epilogue reads no `own`
  // rows there): staging went through the cache once more for every value
  // (20 x 256 x 14 x 14 float64 backward 1.64 -> 1.50 ms). Windows up to 3 x
  // 3: with K = 5 (14 x 14 float32) it was 3-4% slower.
  const bool in_place =
      !args.normalize && L.flat && L.K <= 3 && L.interior_lo() < L.interior_hi();
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    auto chunk_rows = [&](const Operand<scalar_t>& v, acc_t* stage) STCCL_LAMBDA_INLINE {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (const acc_t* where = in_place ? rows_in_place(v, L, n, c0, count, 0, 1) : nullptr) {
          stage_edges(v, L, n, c0, count, stage);
          return ChunkRows<acc_t>{stage, where, v.strides.c};
        }
      }
      return ChunkRows<acc_t>{stage_chunk(v, L, n, c0, count, y0, rows_b, stage), nullptr, 0};
    };
    const auto a_rows = chunk_rows(args.a, a_stage);
    const auto b_rows = two ? chunk_rows(args.b, b_stage) : a_rows;
    // One gradient's chunk: gathered from the other operand's rows, finished
    // with its own.
    auto gradient = [&](const acc_t* w, const acc_t* scale, const acc_t* shift,
                        const acc_t* own_rows, const ChunkRows<acc_t>& other,
                        scalar_t* grad) STCCL_LAMBDA_INLINE {
      const GradientEpilogue<acc_t> final =
          gradient_epilogue(L, n, c0, y0, scale, args.normalize ? shift : nullptr,
                            own_rows + L.own_offset(), L.stage_cstride, ws.runs.data(), grad);
      gather_chunk<ROW_PAIRS>(L, rows, count, w, other.staged, other.in_place,
                              other.in_place_cstride, ws.dst.data(), false, &final);
      if (!final.streamed)
        write_gradient(L, n, c0, count, y0, rows, ws.runs.data(), ws.converted.data(), grad);
    };
    if (args.grad_a)
      gradient(ws.w_a.data(), ws.scale_a.data(), ws.shift_a.data(), a_rows.staged, b_rows,
               args.grad_a);
    if (args.grad_b)
      gradient(ws.w_b.data(), ws.scale_b.data(), ws.shift_b.data(), b_rows.staged, a_rows,
               args.grad_b);
  }
}

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
