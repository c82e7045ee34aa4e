// The passes over a clip (B, T, C, H, W): the temporal correlation (frame t
// against frame t + s) and, in the same pass, the spatial self-correlation of
// every frame (spatiotemporal_correlation). Each frame is staged once per
// band and read in all of its roles.
#pragma once

#include "backward.h"
#include "forward.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

template <typename scalar_t>
STCCL_ALWAYS_INLINE Operand<scalar_t> image_view(const Operand<scalar_t>& op, int64_t n) {
  Operand<scalar_t> view = op;
  view.data = op.row(n, 0, 0);
  view.strides.inner = 1;
  view.strides.outer = view.strides.batch = 0;
  return view;
}

// The band's layout `L` is the temporal window's; the spatial window has its
// own (`spatial`, built with the same staged halo, see Layout's stage_pad),
// null when the pass computes no spatial volume.
template <typename scalar_t, typename acc_t>
struct ClipBackwardArgs {
  Operand<scalar_t> grad_out, out;          // temporal (B, T - s, Kt*Kt, H, W); data null: none
  Operand<scalar_t> grad_spatial, spatial;  // (B, T, K*K, H, W); data null: no spatial term
  const Layout<acc_t>* spatial_layout;
  Operand<scalar_t> v;                      // (B, T, C, H, W)
  scalar_t* grad;                           // contiguous (B, T, C, H, W)
  int64_t frames, stride;                   // T, s
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
  c.rows_b = c.rows + 2 * L.pad_y;
  return c;
}

template <typename scalar_t, typename acc_t>
struct ClipForwardArgs {
  Operand<scalar_t> v;         // (B, T, C, H, W)
  scalar_t* temporal;          // contiguous (B, T - s, Kt*Kt, H, W)
  scalar_t* spatial;           // contiguous (B, T, K*K, H, W), or null: no spatial volume
  const Layout<acc_t>* spatial_layout;  // its window's layout (see ClipBackwardArgs)
  int64_t frames, stride;      // T, s
  bool normalize;
  acc_t eps;
};

// Per-thread scratch of the clip forward: sums for the larger window.
template <typename acc_t>
struct ClipWorkspace {
  StagedBands<acc_t> staged;  // frames, whole bands
  Buffer<acc_t> acc, out_rows;
  ClipWorkspace(const Layout<acc_t>& L, const Layout<acc_t>* spatial)
      : staged(L),
        acc(std::max(L.band_rows * std::max(L.KK, spatial ? spatial->KK : 0) * L.Wv,
                     L.KK * L.image_H * L.group_W)),
        out_rows(std::max(L.run_buffer(L.KK), spatial ? spatial->run_buffer(spatial->KK) : 0)) {}
};

// One band of frame t of a clip, for layouts that stage whole bands: the
// frame's spatial self-correlation (when asked for) and its temporal
// correlation with frame t + s (when there is one). Tasks run frame after
// frame within a band of a clip, and each frame is staged once with its halo
// and norms: as the b of pair t - s and then (with s = 1: in the next task)
// in place as the a of pair t and as both operands of its spatial volume.
// A temporal-only pass runs the pairs alone.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void clip_forward_band(const ClipForwardArgs<scalar_t, acc_t>& args,
                                           const Layout<acc_t>& L, int64_t task,
                                           ClipWorkspace<acc_t>& ws) {
  const int64_t s = args.stride, pairs = args.frames - s;
  const ClipTask c = clip_task(L, task, args.spatial ? args.frames : pairs, args.frames);
  const int64_t WB = L.WB, cs = L.stage_cstride, own = L.own_offset();
  StagedBand<acc_t>& A = stage_frame(image_view(args.v, c.frame), args.normalize, args.eps, L,
                                     c.frame, c.band, c.y0, c.rows_b, ws.staged);
  acc_t* acc = ws.acc.data();
  // The volume of one window of frame t against `other` (frame t itself for
  // the spatial one) into `out`, the frame's (K*K, H, W).
  auto volume = [&](const Layout<acc_t>& Lw, bool self, const StagedBand<acc_t>& other,
                    scalar_t* out) STCCL_LAMBDA_INLINE {
    // (the row groups read past a row's end inside the staged halo)
    const bool grouped = STCCL_VECTOR_BYTES == 64 && ROW_PAIRS && Lw.group_W > 0 && !self;
    std::fill_n(acc, Lw.KK * (grouped ? Lw.image_H * Lw.group_W : c.rows * Lw.Wv), acc_t(0));
    for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
      const int64_t count = std::min(L.chunk, L.C - c0);
      const acc_t* a_rows = A.stage.data() + c0 * cs + own;
      const acc_t* b_rows = other.stage.data() + c0 * cs + Lw.inset;
      if constexpr (STCCL_VECTOR_BYTES == 64 && ROW_PAIRS) {
        if (grouped) {
          correlate_row_groups(Lw, count, a_rows, cs, b_rows, acc);
          continue;
        }
      }
      correlate_chunk<ROW_PAIRS>(Lw, self, c.rows, count, a_rows, cs, WB, b_rows, acc);
    }
    if (grouped) compact_row_groups(Lw, acc);
    zero_outside_image(Lw, c.y0, c.rows, acc);
    write_output(Lw, self, c.y0, c.rows, acc, A.inv.data() + own, WB,
                 other.inv.data() + Lw.inset, ws.out_rows.data(), out);
  };
  const int64_t image_volume = L.H * L.W;
  if (args.spatial) {
    const Layout<acc_t>& Ls = *args.spatial_layout;
    volume(Ls, true, A, args.spatial + c.frame * Ls.KK * image_volume);
  }
  if (c.t < pairs) {
    StagedBand<acc_t>& B = stage_frame(image_view(args.v, c.frame + s), args.normalize, args.eps,
                                       L, c.frame + s, c.band, c.y0, c.rows_b, ws.staged);
    volume(L, false, B, args.temporal + (c.clip * pairs + c.t) * L.KK * image_volume);
  }
}

// Per-thread scratch of the clip backward: the temporal terms' of
// BackwardWorkspace and the spatial term's weights and shift.
template <typename acc_t>
struct ClipBackwardWorkspace : BackwardWorkspace<acc_t> {
  Buffer<acc_t> w_s, shift_s;
  ClipBackwardWorkspace(const Layout<acc_t>& L, const Layout<acc_t>* spatial)
      : BackwardWorkspace<acc_t>(L, spatial),
        w_s(spatial && !L.pixel_gather ? L.band_rows * spatial->KK * L.Wv : 0),
        shift_s(spatial ? L.band_rows * L.Wv : 0) {}
};

// One band of frame t of the clip gradient. Frame t is the `a` of pair t
// (against t + s), the `b` of pair t - s and, with a spatial volume, both
// operands of its own self-correlation, so
//   grad_v[t] = inv_t * (sum_k w_S own_t + sum_k w_A other_{t+s} + sum_k w_B other_{t-s})
//               - (shift_S + shift_A + shift_B) v_t,
// gathered into one accumulator and written once (no slice-and-add of view
// gradients, no second pass for the other volume). Tasks run frame by frame
// within a band of a clip, so with s = 1 two of the three frames a task
// needs were staged by the task before.
template <bool ROW_PAIRS, typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void clip_backward_band(const ClipBackwardArgs<scalar_t, acc_t>& args,
                                            const Layout<acc_t>& L, int64_t task,
                                            ClipBackwardWorkspace<acc_t>& ws) {
  const int64_t T = args.frames, s = args.stride, pairs = T - s;
  const ClipTask c = clip_task(L, task, T, T);
  const int64_t t = c.t, m = c.frame, band = c.band, y0 = c.y0, rows = c.rows, rows_b = c.rows_b;
  const int64_t pair_base = c.clip * pairs;
  const bool temporal = args.grad_out.data != nullptr;
  const bool has_next = temporal && t + s < T, has_prev = temporal && t >= s;
  const bool has_self = args.grad_spatial.data != nullptr;
  const Operand<scalar_t> own = image_view(args.v, m);
  BackwardArgs<scalar_t, acc_t> term{args.grad_out, args.out, own, own, nullptr, nullptr,
                                     args.normalize, false, args.eps};
  StagedBand<acc_t>& own_band =
      stage_frame(own, args.normalize, args.eps, L, m, band, y0, rows_b, ws.staged);
  // Every term's scale is the inverse norm of v_t: one buffer for all.
  acc_t* scale = ws.scale_a.data();
  if (L.pixel_gather) {
    // The terms' sums into one accumulator; the shift from their total.
    bool accumulate = false;
    auto term = [&](const Layout<acc_t>& Lw, GradMode mode, const Operand<scalar_t>& grad_out,
                    const StagedBand<acc_t>& other) STCCL_LAMBDA_INLINE {
      pixel_gather_term<ROW_PAIRS>(Lw, grad_out, mode, 0, y0, rows,
                                   other.inv.data() + Lw.inset, other.stage.data() + Lw.inset,
                                   ws.dst.data(), accumulate, ws.g_tile.data());
      accumulate = true;
    };
    if (has_self)
      term(*args.spatial_layout, GradMode::Self, image_view(args.grad_spatial, m), own_band);
    if (has_next)
      term(L, GradMode::A, image_view(args.grad_out, pair_base + t),
           stage_frame(image_view(args.v, m + s), args.normalize, args.eps, L, m + s, band, y0,
                       rows_b, ws.staged));
    if (has_prev)
      term(L, GradMode::B, image_view(args.grad_out, pair_base + t - s),
           stage_frame(image_view(args.v, m - s), args.normalize, args.eps, L, m - s, band, y0,
                       rows_b, ws.staged));
    if (!accumulate) std::fill_n(ws.dst.data(), L.C * L.dst_cstride, acc_t(0));  // in no pair
    finish_pixel_gradient(L, args.normalize, m, y0, rows, own_band, ws, args.grad);
    return;
  }
  auto weights = [&](const Layout<acc_t>& Lw, GradMode mode, const Operand<scalar_t>& grad_out,
                     const Operand<scalar_t>& out, const StagedBand<acc_t>& other, acc_t* w,
                     acc_t* shift) STCCL_LAMBDA_INLINE {
    term.grad_out = grad_out;
    term.out = out;
    gradient_weights<ROW_PAIRS>(term, Lw, mode, 0, y0, rows, own_band.inv.data(),
                                own_band.pass.data(), other.inv.data(), w, scale, shift,
                                ws.volume_rows.data());
  };
  if (has_self)
    weights(*args.spatial_layout, GradMode::Self, image_view(args.grad_spatial, m),
            image_view(args.spatial, m), own_band, ws.w_s.data(), ws.shift_s.data());
  StagedBand<acc_t>* next_band = nullptr;
  StagedBand<acc_t>* prev_band = nullptr;
  Operand<scalar_t> next = own, prev = own;
  if (has_next) {
    next = image_view(args.v, m + s);
    next_band = &stage_frame(next, args.normalize, args.eps, L, m + s, band, y0, rows_b,
                             ws.staged);
    weights(L, GradMode::A, image_view(args.grad_out, pair_base + t),
            image_view(args.out, pair_base + t), *next_band, ws.w_a.data(), ws.shift_a.data());
  }
  if (has_prev) {
    prev = image_view(args.v, m - s);
    prev_band = &stage_frame(prev, args.normalize, args.eps, L, m - s, band, y0, rows_b,
                             ws.staged);
    weights(L, GradMode::B, image_view(args.grad_out, pair_base + t - s),
            image_view(args.out, pair_base + t - s), *prev_band, ws.w_b.data(),
            ws.shift_b.data());
  }
  // The terms' shifts add up (A, then S, then B) in shift_a.
  acc_t* shift = ws.shift_a.data();
  if (!has_next) std::fill_n(shift, rows * L.Wv, acc_t(0));
  for (const acc_t* term_shift : {has_self ? ws.shift_s.data() : nullptr,
                                  has_prev ? ws.shift_b.data() : nullptr}) {
    if (term_shift == nullptr) continue;
    for (int64_t i = 0; i < rows * L.Wv; ++i) shift[i] += term_shift[i];
  }
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    const int64_t count = std::min(L.chunk, L.C - c0);
    const acc_t* own_rows = stage_chunk(own, L, 0, c0, count, y0, rows_b, own_band.stage.data());
    const GradientEpilogue<acc_t> final =
        gradient_epilogue(L, m, c0, y0, scale, args.normalize ? shift : nullptr,
                          own_rows + L.own_offset(), L.stage_cstride, ws.runs.data(), args.grad);
    if (has_self) {
      const Layout<acc_t>& Ls = *args.spatial_layout;
      gather_chunk<ROW_PAIRS>(Ls, rows, count, ws.w_s.data(), own_rows + Ls.inset,
                              static_cast<const acc_t*>(nullptr), 0, ws.dst.data(), false,
                              has_next || has_prev ? nullptr : &final);
    }
    if (has_next) {
      gather_chunk<ROW_PAIRS>(
          L, rows, count, ws.w_a.data(),
          stage_chunk(next, L, 0, c0, count, y0, rows_b, next_band->stage.data()) + L.inset,
          static_cast<const acc_t*>(nullptr), 0, ws.dst.data(), has_self,
          has_prev ? nullptr : &final);
    }
    if (has_prev) {
      gather_chunk<ROW_PAIRS>(
          L, rows, count, ws.w_b.data(),
          stage_chunk(prev, L, 0, c0, count, y0, rows_b, prev_band->stage.data()) + L.inset,
          static_cast<const acc_t*>(nullptr), 0, ws.dst.data(), has_self || has_next, &final);
    }
    const bool no_term = !has_self && !has_next && !has_prev;  // a frame in no pair (T < 2s)
    if (no_term) std::fill_n(ws.runs.data(), count * L.run_cstride, acc_t(0));
    if (no_term || !final.streamed)
      write_gradient(L, m, c0, count, y0, rows, ws.runs.data(), ws.converted.data(), args.grad);
  }
}

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
