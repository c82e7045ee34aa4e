// The forward pass over one band of output rows: the local correlation, and
// the self-correlation's offsets up to the centre (the others are mirrored
// afterwards, see cpu/correlation_ops.cpp). Outputs are written with
// non-temporal stores.
#pragma once

#include "register_blocks.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

// Per-thread scratch of the forward pass, allocated once per parallel range.
template <typename acc_t>
struct Workspace {
  Buffer<acc_t> a_stage;
  StagedRows<acc_t> b_stage;
  Buffer<acc_t> acc;
  Buffer<acc_t> inv_a;      // sums of squares, then inverse norms in place
  StagedRows<acc_t> inv_b;  // the same, of b's staged rows
  Buffer<acc_t> out_rows;  // the output rows of a band (one offset's or all), in scalar_t
  explicit Workspace(const Layout<acc_t>& L)
      : a_stage(L.chunk * L.a_cstride),
        b_stage(L, L.chunk * L.stage_cstride + Simd<acc_t>::lanes),  // (see correlate_row_groups)
        acc(L.KK * std::max(L.band_rows * L.Wv, L.image_H * L.group_W)),
        inv_a(L.band_rows * L.Wv),
        inv_b(L, L.rows_b * L.WB),
        out_rows(L.run_buffer(L.KK)) {}
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  Operand<scalar_t> a, b;
  scalar_t* out;  // contiguous (N, K*K, H, W)
  bool normalize, self;
  acc_t eps;
};

// correlate_chunk in the flat layout (one row, the whole image). a_rows may
// be a half type where the native builds read it in place (ROW_PAIRS, see
// forward_band); a_squares, when given, gets a's sums of squares from the
// blocks of the first window row.
template <bool ROW_PAIRS, typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_flat(const Layout<acc_t>& L, bool self, int64_t count,
                                        const a_t* a_rows, int64_t a_cstride,
                                        const acc_t* b_stage, acc_t* acc, acc_t* a_squares) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, d = L.dilation, Wv = L.Wv, step = L.row_step;
  const int64_t r = K / 2, full_rows = self ? r : K;  // rows with all K offsets
  using Blocks = std::conditional_t<ROW_PAIRS, NativeBlocks, InlineBlocks>;
  // x outermost, so that the window rows of an x vector read the same few
  // lines of each channel while they are in L1 (a chunk of whole images does
  // not fit there). The native builds take several window rows per block:
  // one row of a 3 x 3 window held 3 sums, too few chains of dependent FMAs
  // to cover their latency.
  const int64_t group = ROW_PAIRS ? window_rows_per_block(K) : 1;
  STCCL_WITH_DILATION(d, {
    for (int64_t xb = 0; xb < Wv; xb += V) {
      for (int64_t i = 0; i < full_rows; i += group) {
        const a_t* a_vec = a_rows + xb;
        const acc_t* b_vec = b_stage + i * d * step + xb;
        acc_t* acc_vec = acc + i * K * Wv + xb;
        acc_t* squares = i == 0 && a_squares ? a_squares + xb : nullptr;
        auto run = [&](auto rows_in_block) STCCL_LAMBDA_INLINE {
          constexpr int I = decltype(rows_in_block)::value;
          STCCL_BLOCKED(NativeBlocks::Window<I>::template block, max_window_block(I), DIL, K,
                        a_vec, a_cstride, b_vec + j0 * d, L.stage_cstride, d * step, d, count,
                        acc_vec + j0 * Wv, K * Wv, Wv, j0 == 0 ? squares : nullptr);
        };
        switch (std::min(group, full_rows - i)) {
          case 1:
            STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, K, a_vec, a_cstride,
                          b_vec + j0 * d, L.stage_cstride, d, count, acc_vec + j0 * Wv, Wv,
                          j0 == 0 ? squares : nullptr);
            break;
          case 2: if constexpr (ROW_PAIRS) run(std::integral_constant<int, 2>{}); break;
          case 3: if constexpr (ROW_PAIRS) run(std::integral_constant<int, 3>{}); break;
          case 4: if constexpr (ROW_PAIRS) run(std::integral_constant<int, 4>{}); break;
          case 5: if constexpr (ROW_PAIRS) run(std::integral_constant<int, 5>{}); break;
          default: break;
        }
      }
      if (self)  // the centre row: its offsets up to the centre
        STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, r + 1, a_rows + xb, a_cstride,
                      b_stage + r * d * step + xb + j0 * d, L.stage_cstride, d, count,
                      acc + (r * K + j0) * Wv + xb, Wv);
    }
  });
}

// correlate_flat of a 3 x 3 window in groups of three output rows
// (Layout::group_W; see correlate_rows_window_block). Each row's x vectors
// start at its first pixel and its sums lie group_W apart ([K*K][H][group_W]),
// so the vectors that run past a row's end (reading the next row's pixels,
// and up to group_W - W values past the image: the caller checks that a has
// them; b's workspace has a vector to spare) put those lanes where
// compact_row_groups drops them.
template <typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_row_groups(const Layout<acc_t>& L, int64_t count,
                                              const a_t* a_rows, int64_t a_cstride,
                                              const acc_t* b_stage, acc_t* acc) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t H = L.image_H, W = L.image_W, Wp = L.group_W, plane = H * Wp;
  for (int64_t y = 0; y < H; y += 3) {
    for (int64_t x = 0; x < W; x += V) {
      auto run = [&](auto group_rows) STCCL_LAMBDA_INLINE {
        NativeBlocks::rows_window<decltype(group_rows)::value>(
            a_rows + y * W + x, W, a_cstride, b_stage + y * W + x, L.stage_cstride, W, count,
            acc + y * Wp + x, Wp, plane);
      };
      switch (std::min<int64_t>(3, H - y)) {
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        default: run(std::integral_constant<int, 1>{}); break;
      }
    }
  }
}

// The row groups' sums to the flat layout's [K*K][Wv], in place (each row
// moves to a lower or the same address, after every row before it).
template <typename acc_t>
STCCL_ALWAYS_INLINE void compact_row_groups(const Layout<acc_t>& L, acc_t* acc) {
  const int64_t H = L.image_H, W = L.image_W;
  for (int64_t k = 0; k < L.KK; ++k)
    for (int64_t y = 0; y < H; ++y)
      std::memmove(acc + k * L.Wv + y * W, acc + (k * H + y) * L.group_W,
                   W * int64_t(sizeof(acc_t)));
}

// sum_sq[x] += the squares of count channels of a flat image read in place,
// x in [0, width), channels in order (as correlate_flat's blocks add them).
template <typename a_t, typename acc_t>
STCCL_ALWAYS_INLINE void add_flat_squares(const a_t* a, int64_t a_cstride, int64_t count,
                                          int64_t width, acc_t* sum_sq) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  for (int64_t x = 0; x < width; x += V) {
    typename Simd<acc_t>::vec sq = load(sum_sq + x);
    for (int64_t c = 0; c < count; ++c) {
      const typename Simd<acc_t>::vec v = load(a + c * a_cstride + x);
      sq += v * v;
    }
    store(sum_sq + x, sq);
  }
}

// acc[rr][k] += the sums over one chunk of channels, for every offset k (a
// self-correlation: those up to the centre) of the band's rows. a_rows: the
// chunk's rows of a, b_stage: its staged rows of b with the halo.
// ROW_PAIRS: the native builds' kernel over groups of rows (see
// correlate_rows_block).
template <bool ROW_PAIRS, typename acc_t>
STCCL_ALWAYS_INLINE void correlate_chunk(const Layout<acc_t>& L, bool self, int64_t rows,
                                         int64_t count, const acc_t* a_rows, int64_t a_cstride,
                                         int64_t a_rstride, const acc_t* b_stage, acc_t* acc) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, Wv = L.Wv, WB = L.WB, step = L.row_step;
  const int64_t r = K / 2, window_rows = self ? r + 1 : K;
  using Blocks = std::conditional_t<ROW_PAIRS, NativeBlocks, InlineBlocks>;
  if (L.flat) {
    correlate_flat<ROW_PAIRS>(L, self, count, a_rows, a_cstride, b_stage, acc,
                              static_cast<acc_t*>(nullptr));
    return;
  }
  if constexpr (ROW_PAIRS) {
    // Rows in groups (rr, rr + d, ..., rr + (ROW_GROUP - 1) d): staged row
    // rr + i * d of b serves window row i - g of row rr + g d, for every g
    // with 0 <= i - g < window_rows. A self-correlation takes only the first
    // r + 1 offsets of its centre window row r: where the group's first row
    // reads that window row, the offsets past the centre are blocked over the
    // other rows alone.
    const int64_t a_gstride = d * a_rstride, acc_gstride = (d * KK - K) * Wv;
    STCCL_WITH_DILATION(d, {
      for (int64_t x0 = 0; x0 < Wv; x0 += L.x_tile)
      for (int64_t rr = 0; rr < rows; ++rr) {
        if ((rr / d) % ROW_GROUP != 0) continue;  // a later row of a group
        const int64_t group = std::min<int64_t>(ROW_GROUP, (rows - rr + d - 1) / d);
        for (int64_t i = 0; i < window_rows + group - 1; ++i) {
          const int64_t g_lo = std::max<int64_t>(0, i - window_rows + 1);
          const int64_t g_hi = std::min(group - 1, i);
          for (int64_t xb = x0; xb < std::min(Wv, x0 + L.x_tile); xb += V) {
            // Rows g_first..g_last of the group, offsets [j_begin, j_end) of
            // their window rows.
            auto blocks = [&](int64_t g_first, int64_t g_last, int64_t j_begin,
                              int64_t j_end) STCCL_LAMBDA_INLINE {
              const acc_t* a_vec = a_rows + (rr + g_first * d) * a_rstride + xb;
              const acc_t* b_vec = b_stage + rr * WB + i * d * step + xb + j_begin * d;
              acc_t* acc_vec =
                  acc + ((rr + g_first * d) * KK + (i - g_first) * K + j_begin) * Wv + xb;
              const int64_t offsets = j_end - j_begin;
              auto run = [&](auto group_rows) STCCL_LAMBDA_INLINE {
                constexpr int R = decltype(group_rows)::value;
                STCCL_BLOCKED(NativeBlocks::Rows<R>::template block, max_rows_block(R), DIL,
                              offsets, a_vec, a_gstride, a_cstride, b_vec + j0 * d,
                              L.stage_cstride, d, count, acc_vec + j0 * Wv, acc_gstride, Wv);
              };
              switch (g_last - g_first + 1) {
                case 1:
                  STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, offsets, a_vec,
                                a_cstride, b_vec + j0 * d, L.stage_cstride, d, count,
                                acc_vec + j0 * Wv, Wv);
                  break;
                case 2: run(std::integral_constant<int, 2>{}); break;
                default:
                  if constexpr (ROW_GROUP >= 3) run(std::integral_constant<int, ROW_GROUP>{});
                  break;
              }
            };
            if (!self || i < r) {  // (no row of the group reads window row r)
              blocks(g_lo, g_hi, 0, K);
            } else {  // row g_lo reads window row r
              blocks(g_lo, g_hi, 0, r + 1);
              if (g_lo < g_hi) blocks(g_lo + 1, g_hi, r + 1, K);
            }
          }
        }
      }
    });
    return;
  }
  STCCL_WITH_DILATION(d, {
    for (int64_t x0 = 0; x0 < Wv; x0 += L.x_tile)
    for (int64_t rr = 0; rr < rows; ++rr) {
      for (int64_t i = 0; i < window_rows; ++i) {
        const int64_t offsets = (self && i == r) ? r + 1 : K;
        for (int64_t xb = x0; xb < std::min(Wv, x0 + L.x_tile); xb += V) {
          const acc_t* a_vec = a_rows + rr * a_rstride + xb;
          const acc_t* b_vec = b_stage + rr * WB + i * d * step + xb;
          acc_t* acc_vec = acc + (rr * KK + i * K) * Wv + xb;
          STCCL_BLOCKED(Blocks::template single, MAX_BLOCK, DIL, offsets, a_vec, a_cstride,
                        b_vec + j0 * d, L.stage_cstride, d, count, acc_vec + j0 * Wv, Wv);
        }
      }
    }
  });
}

// The sums of offsets whose neighbour lies outside the image: zero, as the
// output is there. Against the zero halo they are a * 0, which is NaN where a
// is infinite or NaN; in the flat layout a neighbour past a row's end is a
// pixel of the next or previous row, and the sum is not zero at all. Per
// offset and image row of the band (flat: of the image): the whole row where
// the neighbour's row is outside, else the first -dx or last dx columns.
template <typename acc_t>
STCCL_ALWAYS_INLINE void zero_outside_image(const Layout<acc_t>& L, int64_t y0, int64_t rows,
                                            acc_t* acc) {
  const int64_t W = L.image_W, H = L.image_H;
  const int64_t first_y = L.flat ? 0 : y0, image_rows = L.image_rows(rows);
  const int64_t row_stride = L.flat ? W : L.KK * L.Wv;
  for (int64_t k = 0; k < L.KK; ++k) {
    const int64_t dy = offset_dy(k, L.K, L.dilation), dx = offset_dx(k, L.K, L.dilation);
    const int64_t x0 = dx < 0 ? 0 : std::max<int64_t>(W - dx, 0);
    const int64_t width = std::min(std::abs(dx), W);
    for (int64_t yy = 0; yy < image_rows; ++yy) {
      acc_t* row = acc + k * L.Wv + yy * row_stride;
      const int64_t yq = first_y + yy + dy;
      if (yq < 0 || yq >= H)
        std::fill_n(row, W, acc_t(0));
      else
        std::fill_n(row + x0, width, acc_t(0));
    }
  }
}

// The band's rows of the output: out[k][y0 + rr] = acc * inv_a * inv_b, with
// inv_a[rr] (rows inv_a_rstride apart) the inverse norms of a and inv_b
// ([rows_b][WB], 0 outside the image) those of b. `out` is the image's
// (K*K, H, W) volume. An offset's rows of the band are one contiguous run of
// it: streamed straight into `out` where its rows are whole vectors from a
// 16-byte boundary (float types), else computed into run_buffer and then
// streamed out (see stream_copy); with L.single_run all offsets' runs are
// gathered and streamed as one.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void write_output(const Layout<acc_t>& L, bool self, int64_t y0, int64_t rows,
                                      const acc_t* acc, const acc_t* inv_a,
                                      int64_t inv_a_rstride, const acc_t* inv_b,
                                      acc_t* run_buffer, scalar_t* out) {
  constexpr int64_t V = Simd<acc_t>::lanes;
  const int64_t K = L.K, KK = L.KK, d = L.dilation, Wv = L.Wv, WB = L.WB, step = L.row_step;
  const int64_t r = K / 2, window_rows = self ? r + 1 : K;
  scalar_t* run = reinterpret_cast<scalar_t*>(run_buffer);
  for (int64_t i = 0; i < window_rows; ++i) {
    const int64_t offsets = (self && i == r) ? r + 1 : K;
    for (int64_t j = 0; j < offsets; ++j) {
      const int64_t k = i * K + j;
      scalar_t* run_out = out + (k * L.H + y0) * L.W;
      // Streamed straight out: no pass through the buffer and back (the
      // output is most of what few channels move).
      const bool direct =
          std::is_same_v<scalar_t, acc_t> && !L.single_run && L.rows_stream_from(run_out);
      for (int64_t rr = 0; rr < rows; ++rr) {
        const acc_t* a_k = acc + (rr * KK + k) * Wv;
        const acc_t* inv_p = inv_a + rr * inv_a_rstride;
        const acc_t* inv_q = inv_b + rr * WB + i * d * step + j * d;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (direct) {
            for (int64_t x = 0; x < L.W; x += V)
              stream_store(run_out + rr * L.W + x,
                           load(a_k + x) * load(inv_p + x) * load(inv_q + x));
            continue;
          }
        }
        scalar_t* o = run + ((L.single_run ? k : 0) * rows + rr) * L.W;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          // Whole vectors: a row's last vector runs into the next row's
          // start, written after it (the buffer has one vector to spare for
          // the last row). Short rows (W = 14) spent most of this loop in a
          // scalar tail.
          for (int64_t x = 0; x < L.W; x += V)
            store(o + x, load(a_k + x) * load(inv_p + x) * load(inv_q + x));
        } else {
          // Whole vectors too (the spare vector holds 2V half values): at
          // W = 56 the eight values past the last whole vector took a
          // scalar loop that cost more than the vectors.
          round_product_row(a_k, inv_p, inv_q, o, (L.W + V - 1) / V * V);
        }
      }
      if (!L.single_run && !direct)
        stream_copy(run_out, run, rows * L.W * int64_t(sizeof(scalar_t)));
    }
  }
  // Self: the offsets up to the centre, k = 0 .. KK / 2, are one run too.
  if (L.single_run)
    stream_copy(out, run, (self ? KK / 2 + 1 : KK) * rows * L.W * int64_t(sizeof(scalar_t)));
}

// One band of the forward pass. For a self-correlation (a is b) only the
// offsets up to the centre are computed; mirror_self_correlation fills in the
// rest afterwards.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void forward_band(const ForwardArgs<scalar_t, acc_t>& args,
                                      const Layout<acc_t>& L, int64_t task,
                                      Workspace<acc_t>& ws) {
  const int64_t n = task / L.bands, y0 = (task % L.bands) * L.band_rows;
  const int64_t rows = std::min(L.band_rows, L.H - y0), rows_b = rows + 2 * L.pad_y;
  const int64_t Wv = L.Wv, WB = L.WB;
  acc_t* acc = ws.acc.data();
  acc_t* inv_b = ws.inv_b.data();
  acc_t* inv_a = ws.inv_a.data();
  // Row groups (Layout::group_W) where a is read in place and holds each
  // group's last vectors whole.
  constexpr bool half_in_place = ROW_PAIRS && HALF_LOADS;
  const bool grouped =
      STCCL_VECTOR_BYTES == 64 && ROW_PAIRS && (std::is_same_v<scalar_t, acc_t> || half_in_place) &&
      L.group_W > 0 && L.C > 0 && !args.self && args.a.strides.x == 1 &&
      args.a.end - args.a.row(n, L.C - 1, 0) >=
          std::max(L.Wv, (L.image_H - 1) * L.image_W + L.group_W);
  std::fill_n(acc, L.KK * (grouped ? L.image_H * L.group_W : rows * Wv), acc_t(0));
  std::fill_n(inv_b, rows_b * WB, acc_t(0));
  if (!args.self) std::fill_n(inv_a, rows * Wv, acc_t(0));

  // a is read where it lies where it can be (see rows_in_place), unless its
  // norms are needed in the rows layout of a window over 3 x 3: the staging
  // pass takes the squares anyway, and its aligned copy served the many
  // offsets better (K = 5, 7 on 60 x 60 and 64 x 64: in place 1-7% slower).
  const bool a_in_place = !args.normalize || L.flat || L.K <= 3;
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    acc_t* b_stage = ws.b_stage.data();
    stage_rows(args.b, L, n, c0, count, y0 - L.pad_y, rows_b, L.stage_cstride, L.pad_x, WB,
               b_stage, args.normalize ? inv_b : nullptr);
    if (args.self) {
      correlate_chunk<ROW_PAIRS>(L, true, rows, count, b_stage + L.own_offset(),
                                 L.stage_cstride, WB, b_stage, acc);
    } else {
      const scalar_t* a_where =
          a_in_place ? rows_in_place(args.a, L, n, c0, count, y0, rows) : nullptr;
      // The flat layout's blocks read a where it lies and take its squares
      // as they go: no pass of its own over a; half types too in the native
      // builds, widened in registers instead of staged. Against full builds
      // of the code before, alternating: 32 x 512 x 10 x 10 K = 7 2.33 ->
      // 2.02 ms; S1 (float32, float16, bfloat16), S2, 7 x 7 and 8 x 8 maps
      // within the noise.
      if constexpr (std::is_same_v<scalar_t, acc_t> || half_in_place) {
        if constexpr (STCCL_VECTOR_BYTES == 64 && ROW_PAIRS) {
          if (grouped) {
            if (args.normalize) add_flat_squares(a_where, args.a.strides.c, count, Wv, inv_a);
            correlate_row_groups(L, count, a_where, args.a.strides.c, b_stage, acc);
            continue;
          }
        }
        if (a_where && L.flat) {
          correlate_flat<ROW_PAIRS>(L, false, count, a_where, args.a.strides.c, b_stage, acc,
                                    args.normalize ? inv_a : nullptr);
          continue;
        }
      }
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (a_where) {
          if (args.normalize) add_squares(args.a, L, n, c0, count, y0, rows, Wv, inv_a);
          correlate_chunk<ROW_PAIRS>(L, false, rows, count, a_where, args.a.strides.c,
                                     args.a.strides.y, b_stage, acc);
          continue;
        }
      }
      stage_rows(args.a, L, n, c0, count, y0, rows, L.a_cstride, 0, Wv, ws.a_stage.data(),
                 args.normalize ? inv_a : nullptr);
      correlate_chunk<ROW_PAIRS>(L, false, rows, count, ws.a_stage.data(), L.a_cstride, Wv,
                                 b_stage, acc);
    }
  }

  if (grouped) compact_row_groups(L, acc);
  inverse_norms_in_place(L, args.normalize, args.eps, y0 - L.pad_y, rows_b, WB, L.pad_x, inv_b,
                         static_cast<acc_t*>(nullptr));
  if (args.self)
    for (int64_t rr = 0; rr < rows; ++rr)
      std::copy_n(inv_b + rr * WB + L.own_offset(), L.W, inv_a + rr * Wv);
  else
    inverse_norms_in_place(L, args.normalize, args.eps, y0, rows, Wv, int64_t(0), inv_a,
                           static_cast<acc_t*>(nullptr));
  zero_outside_image(L, y0, rows, acc);
  write_output(L, args.self, y0, rows, acc, inv_a, Wv, inv_b, ws.out_rows.data(),
               args.out + n * L.KK * L.H * L.W);
}

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
