// The temporal passes over a clip (B, T, C, H, W): frame t against frame
// t + s, each frame staged once per band and read in both of its roles.
#pragma once

#include "backward.h"
#include "forward.h"

namespace stccl::cpu {

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
  c.rows_b = c.rows + 2 * L.pad_y;
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
        out_rows(L.run_buffer(L.KK)) {}
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
  const int64_t WB = L.WB, cs = L.stage_cstride;
  StagedBand<acc_t>& A = stage_frame(image_view(args.v, c.frame), args.normalize, args.eps, L,
                                     c.frame, c.band, c.y0, c.rows_b, ws.staged);
  StagedBand<acc_t>& B = stage_frame(image_view(args.v, c.frame + s), args.normalize, args.eps, L,
                                     c.frame + s, c.band, c.y0, c.rows_b, ws.staged);
  acc_t* acc = ws.acc.data();
  std::fill_n(acc, c.rows * L.KK * L.Wv, acc_t(0));
  for (int64_t c0 = 0; c0 < L.C; c0 += L.chunk) {
    correlate_chunk<ROW_PAIRS>(L, false, c.rows, std::min(L.chunk, L.C - c0),
                               A.stage.data() + c0 * cs + L.own_offset(), cs, WB,
                               B.stage.data() + c0 * cs, acc);
  }
  zero_wrapped(L, acc);
  write_output(L, false, c.y0, c.rows, acc, A.inv.data() + L.own_offset(), WB, B.inv.data(),
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
                     ws.scale_a.data(), ws.shift_a.data(), ws.volume_rows.data());
  }
  if (has_prev) {
    prev = image_view(args.v, m - s);
    prev_band = &stage_frame(prev, args.normalize, args.eps, L, m - s, band, y0, rows_b,
                             ws.staged);
    term.grad_out = image_view(args.grad_out, pair_base + t - s);
    term.out = image_view(args.out, pair_base + t - s);
    gradient_weights(term, L, GradMode::B, 0, y0, rows, own_band.inv.data(),
                     own_band.pass.data(), prev_band->inv.data(), ws.w_b.data(),
                     ws.scale_b.data(), ws.shift_b.data(), ws.volume_rows.data());
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
    const GradientEpilogue<acc_t> final{scale, shift, own_rows + L.own_offset(),
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
