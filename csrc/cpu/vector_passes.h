// The CPU passes of the ops of csrc/ops.h for one vector width (see simd.h):
// dispatch on dtype and ISA, and the band kernels of forward.h, backward.h and
// temporal.h run over all threads. Compiled once per width (passes_256.cpp,
// passes_512.cpp), each giving its table of passes<STCCL_VECTOR_BYTES>; the
// entry points (correlation_ops.cpp) pick the processor's.
//
// Copy policy: none. Operands of any strides (channels_last, slices, expanded,
// 5-D clip views) are read in place by the staging loop of each task, which
// also converts half types to float; only the outputs and gradients are
// allocated (contiguous, by result()).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <optional>

#include "../checks.h"
#include "../tensor_args.h"
#include "isa.h"
#include "passes.h"
#include "temporal.h"

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {
namespace {

template <typename scalar_t>
Operand<scalar_t> operand(const at::Tensor& t) {
  const scalar_t* data = t.const_data_ptr<scalar_t>();
  const auto* storage_end = static_cast<const char*>(t.storage().data()) + t.storage().nbytes();
  const int64_t readable =
      (storage_end - reinterpret_cast<const char*>(data)) / int64_t(sizeof(scalar_t));
  return {data, strides4(t), data + readable};
}

// Whether every operand's images can be read flat (see Layout).
bool flat_ok(int64_t H, int64_t W, std::initializer_list<const at::Tensor*> operands) {
  for (const at::Tensor* t : operands)
    if (!rows_adjacent(strides4(*t), H, W)) return false;
  return true;
}

// The band kernels: run<NATIVE> does one task (NATIVE: the native builds'
// variant where a kernel has one, the row pairs of the forward and of the
// backward's gather).
struct ForwardBand {
  template <bool NATIVE, typename... Args>
  STCCL_ALWAYS_INLINE static void run(Args&... args) { forward_band<NATIVE>(args...); }
};
struct BackwardBand {
  template <bool NATIVE, typename... Args>
  STCCL_ALWAYS_INLINE static void run(Args&... args) { backward_band<NATIVE>(args...); }
};
struct ClipForwardBand {
  template <bool NATIVE, typename... Args>
  STCCL_ALWAYS_INLINE static void run(Args&... args) { clip_forward_band<NATIVE>(args...); }
};
struct ClipBackwardBand {
  template <bool NATIVE, typename... Args>
  STCCL_ALWAYS_INLINE static void run(Args&... args) {
    clip_backward_band<NATIVE>(args...);
  }
};

// The ISA dispatch, once for every band kernel. The always-inline kernels take
// the target of the function they are inlined into, so nothing outside
// band_native uses the native build's instructions. With 32-byte vectors each
// kernel is compiled twice, and the AVX2+FMA instance runs where the processor
// has both; with 64-byte vectors there is only the AVX-512 one (passes<64> is
// called only where it runs, see correlation_ops.cpp).
template <typename Band, typename Args, typename acc_t, typename WS>
void band_portable(const Args& args, const Layout<acc_t>& L, int64_t task, WS& ws) {
  Band::template run<false>(args, L, task, ws);
}
#if defined(__x86_64__) || defined(__i386__)
template <typename Band, typename Args, typename acc_t, typename WS>
__attribute__((target(STCCL_VECTOR_TARGET))) void band_native(const Args& args,
                                                               const Layout<acc_t>& L,
                                                               int64_t task, WS& ws) {
  Band::template run<true>(args, L, task, ws);
}
#endif

template <typename Band, typename WS, typename Args, typename acc_t>
auto pick_isa() {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (STCCL_VECTOR_BYTES == 64) {
    return &band_native<Band, Args, acc_t, WS>;
  } else {
    if (native_build_runs()) return &band_native<Band, Args, acc_t, WS>;
    return &band_portable<Band, Args, acc_t, WS>;
  }
#else
  return &band_portable<Band, Args, acc_t, WS>;
#endif
}

// Runs every band task with Band's kernel for this processor; each thread
// gets a contiguous range of tasks (so neighbouring bands share cached halo
// rows) and one workspace WS(L, ws_args...). The fence orders the range's
// streamed stores before the join.
template <typename Band, typename WS, typename Args, typename acc_t, typename... WSArgs>
void run_bands(const Layout<acc_t>& L, const Args& args, const WSArgs&... ws_args) {
  const auto band = pick_isa<Band, WS, Args, acc_t>();
  at::parallel_for(0, L.tasks(), 1, [&](int64_t begin, int64_t end) {
    WS ws(L, ws_args...);
    for (int64_t task = begin; task < end; ++task) band(args, L, task, ws);
    stream_fence();
  });
}

// Fills the offsets past the centre of a self-correlation from the computed
// ones: out[p, mirror(k)] = out[p + d_mirror(k), k].
template <typename scalar_t>
void mirror_self_correlation(scalar_t* out, int64_t N, int64_t H, int64_t W, const Window& w) {
  const int64_t K = w.kernel_size, dilation = w.dilation, KK = w.offsets();
  const int64_t centre = KK / 2, mirrored = KK - centre - 1;
  at::parallel_for(0, N * mirrored * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t y = idx % H, kb = centre + 1 + (idx / H) % mirrored, n = idx / (H * mirrored);
      const int64_t k = mirror_offset(kb, K);
      const int64_t dy = offset_dy(kb, K, dilation), dx = offset_dx(kb, K, dilation);
      scalar_t* dst = out + ((n * KK + kb) * H + y) * W;
      const int64_t ys = y + dy;
      if (ys < 0 || ys >= H) {
        std::fill_n(dst, W, scalar_t(0));
        continue;
      }
      const scalar_t* src = out + ((n * KK + k) * H + ys) * W + dx;
      const int64_t x_lo = std::clamp<int64_t>(-dx, 0, W), x_hi = std::clamp<int64_t>(W - dx, x_lo, W);
      std::fill_n(dst, x_lo, scalar_t(0));
      std::copy(src + x_lo, src + x_hi, dst + x_lo);
      std::fill(dst + x_hi, dst + W, scalar_t(0));
    }
  });
}

at::Tensor forward(const at::Tensor& a, const at::Tensor& b, const Window& w, bool self) {
  auto out = result(correlation_shape(a, w.kernel_size), a.options());
  if (out.numel() == 0) return out;
  const auto shape = dims(a);
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "local_correlation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Layout<acc_t> L(N, C, H, W, w, Pass::Forward, a.element_size(),
                          flat_ok(H, W, {&a, &b}));
    const ForwardArgs<scalar_t, acc_t> args{operand<scalar_t>(a), operand<scalar_t>(b),
                                            out.mutable_data_ptr<scalar_t>(), w.normalize, self,
                                            static_cast<acc_t>(w.eps)};
    run_bands<ForwardBand, Workspace<acc_t>>(L, args);
    if (self) mirror_self_correlation(args.out, N, H, W, w);
  });
  return out;
}

// The layout of the clip passes' bands, tasks (clip, band, frame): the
// temporal window's, staging the halo of the larger of the two windows when
// the spatial one (`spatial`, may be null) is computed in the same pass.
template <typename acc_t>
Layout<acc_t> clip_layout(const at::Tensor& v, const Window& temporal, const Window* spatial,
                          Pass pass) {
  const auto shape = dims(v);
  const int64_t H = shape[2], W = shape[3];
  return Layout<acc_t>(shape[0], shape[1], H, W, temporal, pass, v.element_size(),
                       flat_ok(H, W, {&v}), spatial ? spatial->pad() : 0);
}

// The spatial window's layout over the same staged bands as `clip` (see
// Layout's stage_pad): every size but the offsets agrees.
template <typename acc_t>
Layout<acc_t> spatial_layout(const at::Tensor& v, const Window& spatial,
                             const Layout<acc_t>& clip, Pass pass) {
  const auto shape = dims(v);
  Layout<acc_t> L(clip.N, shape[1], shape[2], shape[3], spatial, pass, v.element_size(),
                  flat_ok(shape[2], shape[3], {&v}), clip.pad);
  TORCH_INTERNAL_ASSERT(L.WB == clip.WB && L.rows_b == clip.rows_b && L.chunk == clip.chunk &&
                        L.stage_cstride == clip.stage_cstride && L.flat == clip.flat);
  return L;
}

// Both volumes of a clip from one forward pass (clip_forward_band): `spatial`
// (B, T, K*K, H, W) unless `ws` is null, `temporal` (B, T - s, Kt*Kt, H, W).
// Needs layouts that stage whole bands; returns false (nothing computed)
// otherwise.
template <typename scalar_t>
bool clip_forward(const at::Tensor& v, const Window& wt, const Window* ws, int64_t frame_stride,
                  at::Tensor& temporal, at::Tensor& spatial) {
  using acc_t = at::opmath_type<scalar_t>;
  Layout<acc_t> L = clip_layout<acc_t>(v, wt, ws, Pass::ClipForward);
  if (!L.whole_stage) return false;
  const int64_t T = v.size(1), pairs = T - frame_stride;
  if (!ws && !L.flat) {
    // The temporal volume alone, where the pairs' forward goes flat (windows
    // up to 3 x 3 on images up to 3600 pixels) and the clip's bands would
    // not: as pairs, each frame read twice (as a and as b), but flat, and
    // each chunk of b staged just before it is read (a frame's whole staged
    // band, 0.8 MiB at 64 x 56 x 56, had left the cache by then). Zen 4, 2
    // threads: T1 1.36 -> 0.95 ms, 2 x 8 x 128 x 28 x 28 0.49 -> 0.33.
    const auto shape = dims(v);
    const Layout<acc_t> as_pairs(v.size(0) * pairs, shape[1], shape[2], shape[3], wt,
                                 Pass::Forward, v.element_size(),
                                 flat_ok(shape[2], shape[3], {&v}));
    if (as_pairs.flat) return false;
  }
  std::optional<Layout<acc_t>> Ls;
  if (ws) Ls.emplace(spatial_layout<acc_t>(v, *ws, L, Pass::ClipForward));
  temporal = result(correlation_shape(frame_pairs(v, frame_stride).first, wt.kernel_size),
                    v.options());
  if (ws) spatial = result(correlation_shape(v, ws->kernel_size), v.options());
  if (temporal.numel() == 0) return true;  // no pixels or no clips: both volumes are empty
  if (!ws) L.N = v.size(0) * pairs;  // tasks (clip, band, pair)
  const ClipForwardArgs<scalar_t, acc_t> args{
      operand<scalar_t>(v), temporal.mutable_data_ptr<scalar_t>(),
      ws ? spatial.mutable_data_ptr<scalar_t>() : nullptr, Ls ? &*Ls : nullptr, T, frame_stride,
      wt.normalize, static_cast<acc_t>(wt.eps)};
  run_bands<ClipForwardBand, ClipWorkspace<acc_t>>(L, args, args.spatial_layout);
  if (ws) mirror_self_correlation(args.spatial, L.N, L.image_H, L.image_W, *ws);
  return true;
}

// temporal_correlation: each frame staged once (clip_forward_band) when a
// band of all channels fits the staging bound and the pairs would not go
// flat (see clip_forward), else the two frame views correlated like any a
// and b.
at::Tensor temporal_forward(const at::Tensor& v, const Window& w, int64_t frame_stride) {
  at::Tensor out, unused;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "temporal_correlation_cpu", [&] {
    done = clip_forward<scalar_t>(v, w, nullptr, frame_stride, out, unused);
  });
  if (done) return out;
  const auto [a, b] = frame_pairs(v, frame_stride);
  return forward(a, b, w, /*self=*/false);
}

// spatiotemporal_correlation: both volumes from one staging of each frame
// band (clip_forward_band) when a band of all channels fits the staging
// bound, else the self and temporal passes one after the other.
std::tuple<at::Tensor, at::Tensor> spatiotemporal_forward(const at::Tensor& v,
                                                          const Window& spatial_window,
                                                          const Window& temporal_window,
                                                          int64_t frame_stride) {
  at::Tensor spatial, temporal;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "spatiotemporal_correlation_cpu", [&] {
    done = clip_forward<scalar_t>(v, temporal_window, &spatial_window, frame_stride, temporal,
                                  spatial);
  });
  if (done) return {spatial, temporal};
  return {forward(v, v, spatial_window, /*self=*/true),
          temporal_forward(v, temporal_window, frame_stride)};
}

// Gradients of a and/or b (of x when self), both from one pass over the bands.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& a,
                                            const at::Tensor& b, const at::Tensor& out,
                                            const Window& w, bool need_a, bool need_b,
                                            bool self) {
  at::Tensor grad_a = need_a ? result(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? result(b.sizes(), b.options()) : at::Tensor();
  if (a.numel() == 0 || (!need_a && !need_b)) return {grad_a, grad_b};
  const auto shape = dims(a);
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "local_correlation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Layout<acc_t> L(N, C, H, W, w, Pass::Backward, a.element_size(), flat_ok(H, W, {&a, &b}));
    // Raw mode takes no norms, for which the whole band is staged up front:
    // staged a chunk at a time, the staged rows stay small (20 x 256 x 14 x
    // 14 float64 backward 0.96x the time, 16 x 1024 x 7 x 7 float32 0.91x).
    if (!w.normalize) L.whole_stage = L.pixel_gather;
    const BackwardArgs<scalar_t, acc_t> args{
        operand<scalar_t>(grad_out), operand<scalar_t>(out), operand<scalar_t>(a),
        operand<scalar_t>(b), need_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr,
        need_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, w.normalize, self,
        static_cast<acc_t>(w.eps)};
    run_bands<BackwardBand, BackwardWorkspace<acc_t>>(L, args);
  });
  return {grad_a, grad_b};
}

// The clip gradient of the temporal volume (grad_temporal) and of the spatial
// one (grad_spatial, with `ws`), in one pass frame by frame (see
// clip_backward_band); an undefined grad_* contributes nothing.
at::Tensor clip_backward(const at::Tensor& grad_spatial, const at::Tensor& grad_temporal,
                         const at::Tensor& v, const at::Tensor& spatial,
                         const at::Tensor& temporal, const Window* ws, const Window& wt,
                         int64_t frame_stride) {
  auto grad = result(v.sizes(), v.options());
  if (grad.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "clip_correlation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Layout<acc_t> L = clip_layout<acc_t>(v, wt, ws, Pass::ClipBackward);
    std::optional<Layout<acc_t>> Ls;
    if (ws && grad_spatial.defined())
      Ls.emplace(spatial_layout<acc_t>(v, *ws, L, Pass::ClipBackward));
    auto maybe = [](const at::Tensor& t) {
      return t.defined() ? operand<scalar_t>(t) : Operand<scalar_t>{nullptr, {}, nullptr};
    };
    const bool with_temporal = grad_temporal.defined();
    const ClipBackwardArgs<scalar_t, acc_t> args{
        maybe(grad_temporal), with_temporal ? operand<scalar_t>(temporal) : maybe(at::Tensor()),
        Ls ? operand<scalar_t>(grad_spatial) : maybe(at::Tensor()),
        Ls ? operand<scalar_t>(spatial) : maybe(at::Tensor()), Ls ? &*Ls : nullptr,
        operand<scalar_t>(v), grad.mutable_data_ptr<scalar_t>(), v.size(1), frame_stride,
        wt.normalize, static_cast<acc_t>(wt.eps)};
    run_bands<ClipBackwardBand, ClipBackwardWorkspace<acc_t>>(L, args, args.spatial_layout);
  });
  return grad;
}

at::Tensor temporal_backward(const at::Tensor& grad_out, const at::Tensor& v,
                             const at::Tensor& out, const Window& w, int64_t frame_stride) {
  return clip_backward(at::Tensor(), grad_out, v, at::Tensor(), out, nullptr, w, frame_stride);
}

at::Tensor spatiotemporal_backward(const at::Tensor& grad_spatial,
                                   const at::Tensor& grad_temporal, const at::Tensor& v,
                                   const at::Tensor& spatial, const at::Tensor& temporal,
                                   const Window& spatial_window, const Window& temporal_window,
                                   int64_t frame_stride) {
  return clip_backward(grad_spatial, grad_temporal, v, spatial, temporal, &spatial_window,
                       temporal_window, frame_stride);
}

}  // namespace
}  // namespace STCCL_VECTOR_NAMESPACE

template <>
const Passes& passes<STCCL_VECTOR_BYTES>() {
  namespace own = STCCL_VECTOR_NAMESPACE;
  static const Passes table{own::forward,          own::temporal_forward,
                            own::backward,         own::temporal_backward,
                            own::spatiotemporal_forward, own::spatiotemporal_backward};
  return table;
}

}  // namespace stccl::cpu
