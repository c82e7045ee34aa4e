// CPU kernels of stccl_ops::local_correlation and self_correlation (forward and
// backward), behind the schemas in csrc/ops.cpp.
//
// Copy policy: none. Operands of any strides (channels_last, slices, expanded,
// 5-D clip views) are read in place by the staging loop of each task, which
// also converts half types to float; only the outputs and gradients are
// allocated (contiguous).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "../tensor_args.h"
#include "correlation_kernels.h"
#include "isa.h"

namespace stccl::cpu {
namespace {

template <typename scalar_t>
Operand<scalar_t> operand(const at::Tensor& t) {
  const scalar_t* data = t.const_data_ptr<scalar_t>();
  const auto* storage_end = static_cast<const char*>(t.storage().data()) + t.storage().nbytes();
  const int64_t readable =
      (storage_end - reinterpret_cast<const char*>(data)) / int64_t(sizeof(scalar_t));
  return {data, strides4(t), data + readable};
}

template <typename scalar_t, typename acc_t>
void forward_band_generic(const ForwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L,
                          int64_t task, Workspace<acc_t>& ws) {
  forward_band</*ROW_PAIRS=*/false>(args, L, task, ws);
}

template <typename scalar_t, typename acc_t>
void temporal_forward_band_generic(const TemporalForwardArgs<scalar_t, acc_t>& args,
                                   const Layout<acc_t>& L, int64_t task,
                                   TemporalWorkspace<acc_t>& ws) {
  temporal_forward_band</*ROW_PAIRS=*/false>(args, L, task, ws);
}

template <typename scalar_t, typename acc_t>
void temporal_backward_band_generic(const TemporalBackwardArgs<scalar_t, acc_t>& args,
                                    const Layout<acc_t>& L, int64_t task,
                                    BackwardWorkspace<acc_t>& ws) {
  temporal_backward_band(args, L, task, ws);
}

template <typename scalar_t, typename acc_t>
void backward_band_generic(const BackwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L,
                           int64_t task, BackwardWorkspace<acc_t>& ws) {
  backward_band(args, L, task, ws);
}

#if defined(__x86_64__) || defined(__i386__)
// The same templates, compiled with AVX2+FMA enabled: the always-inline
// kernels take the target of the function they are inlined into, so nothing
// outside these two functions uses AVX2 instructions.
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void forward_band_avx2(
    const ForwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L, int64_t task,
    Workspace<acc_t>& ws) {
  forward_band</*ROW_PAIRS=*/true>(args, L, task, ws);
}

template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void backward_band_avx2(
    const BackwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L, int64_t task,
    BackwardWorkspace<acc_t>& ws) {
  backward_band(args, L, task, ws);
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void temporal_forward_band_avx2(
    const TemporalForwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L, int64_t task,
    TemporalWorkspace<acc_t>& ws) {
  temporal_forward_band</*ROW_PAIRS=*/true>(args, L, task, ws);
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void temporal_backward_band_avx2(
    const TemporalBackwardArgs<scalar_t, acc_t>& args, const Layout<acc_t>& L, int64_t task,
    BackwardWorkspace<acc_t>& ws) {
  temporal_backward_band(args, L, task, ws);
}
#define STCCL_PICK(name) (use_avx2() ? &name##_avx2<scalar_t, acc_t> : &name##_generic<scalar_t, acc_t>)
#else
#define STCCL_PICK(name) (&name##_generic<scalar_t, acc_t>)
#endif

// Runs every band task; each thread gets a contiguous range of tasks (so
// neighbouring bands share cached halo rows) and one workspace. The fence
// orders the range's streamed stores before the join.
template <typename WS, typename Args, typename acc_t, typename Fn>
void run_bands(const Layout<acc_t>& L, const Args& args, Fn band) {
  at::parallel_for(0, L.tasks(), 1, [&](int64_t begin, int64_t end) {
    WS ws(L);
    for (int64_t task = begin; task < end; ++task) band(args, L, task, ws);
    stream_fence();
  });
}

// Fills the offsets past the centre of a self-correlation from the computed
// ones: out[p, mirror(k)] = out[p + d_mirror(k), k].
template <typename scalar_t>
void mirror_self_correlation(scalar_t* out, int64_t N, int64_t K, int64_t H, int64_t W,
                             int64_t dilation) {
  const int64_t KK = K * K, centre = KK / 2, mirrored = KK - centre - 1;
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
      for (int64_t x = 0; x < W; ++x) dst[x] = (x + dx >= 0 && x + dx < W) ? src[x] : scalar_t(0);
    }
  });
}

at::Tensor correlation_forward(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size,
                               int64_t dilation, bool normalize, double eps, bool self) {
  auto out = at::empty(correlation_shape(a, kernel_size), a.options());
  if (out.numel() == 0) return out;
  const auto shape = dims(a);
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "local_correlation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Layout<acc_t> L(N, C, H, W, kernel_size, dilation, /*cover_halo=*/true);
    const ForwardArgs<scalar_t, acc_t> args{operand<scalar_t>(a), operand<scalar_t>(b),
                                            out.mutable_data_ptr<scalar_t>(), normalize, self,
                                            static_cast<acc_t>(eps)};
    run_bands<Workspace<acc_t>>(L, args, STCCL_PICK(forward_band));
    if (self) mirror_self_correlation(args.out, N, kernel_size, H, W, dilation);
  });
  return out;
}

// temporal_correlation: each frame staged once (temporal_forward_band) when
// a band of all channels fits the staging bound, else the two frame views
// correlated like any a and b.
at::Tensor temporal_correlation_forward(const at::Tensor& v, int64_t kernel_size,
                                        int64_t dilation, bool normalize, double eps,
                                        int64_t frame_stride) {
  const auto [a, b] = frame_pairs(v, frame_stride);
  const auto shape = dims(v);
  const auto out_shape = correlation_shape(a, kernel_size);
  at::Tensor out;  // stays undefined when the bands do not fit
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "temporal_correlation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Layout<acc_t> L(shape[0], shape[1], shape[2], shape[3], kernel_size, dilation,
                    /*cover_halo=*/true);
    if (!L.whole_stage) return;
    out = at::empty(out_shape, v.options());
    if (out.numel() == 0) return;
    const int64_t pairs = v.size(1) - frame_stride;
    L.N = v.size(0) * pairs;  // tasks: (clip, band, pair)
    const TemporalForwardArgs<scalar_t, acc_t> args{operand<scalar_t>(v),
                                                    out.mutable_data_ptr<scalar_t>(), v.size(1),
                                                    frame_stride, normalize,
                                                    static_cast<acc_t>(eps)};
    run_bands<TemporalWorkspace<acc_t>>(L, args, STCCL_PICK(temporal_forward_band));
  });
  if (!out.defined())
    return correlation_forward(a, b, kernel_size, dilation, normalize, eps, /*self=*/false);
  return out;
}

// Gradients of a and/or b (of x when self), both from one pass over the bands.
std::tuple<at::Tensor, at::Tensor> correlation_backward(
    const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
    int64_t kernel_size, int64_t dilation, bool normalize, double eps, bool need_a, bool need_b,
    bool self) {
  at::Tensor grad_a = need_a ? at::empty(a.sizes(), a.options()) : at::Tensor();
  at::Tensor grad_b = need_b ? at::empty(b.sizes(), b.options()) : at::Tensor();
  if (a.numel() == 0 || (!need_a && !need_b)) return {grad_a, grad_b};
  const auto shape = dims(a);
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "local_correlation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Layout<acc_t> L(N, C, H, W, kernel_size, dilation, /*cover_halo=*/false);
    const BackwardArgs<scalar_t, acc_t> args{
        operand<scalar_t>(grad_out), operand<scalar_t>(out), operand<scalar_t>(a),
        operand<scalar_t>(b), need_a ? grad_a.mutable_data_ptr<scalar_t>() : nullptr,
        need_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, normalize, self,
        static_cast<acc_t>(eps)};
    run_bands<BackwardWorkspace<acc_t>>(L, args, STCCL_PICK(backward_band));
  });
  return {grad_a, grad_b};
}

// The clip gradient of temporal_correlation, frame by frame (see
// temporal_backward_band).
at::Tensor temporal_correlation_backward(const at::Tensor& grad_out, const at::Tensor& v,
                                         const at::Tensor& out, int64_t kernel_size,
                                         int64_t dilation, bool normalize, double eps,
                                         int64_t frame_stride) {
  auto grad = at::empty(v.sizes(), v.options());
  if (grad.numel() == 0) return grad;
  const auto shape = dims(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "temporal_correlation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Layout<acc_t> L(shape[0], shape[1], shape[2], shape[3], kernel_size, dilation,
                          /*cover_halo=*/false);
    const TemporalBackwardArgs<scalar_t, acc_t> args{
        operand<scalar_t>(grad_out), operand<scalar_t>(out), operand<scalar_t>(v),
        grad.mutable_data_ptr<scalar_t>(), v.size(1), frame_stride, normalize,
        static_cast<acc_t>(eps)};
    run_bands<BackwardWorkspace<acc_t>>(L, args, STCCL_PICK(temporal_backward_band));
  });
  return grad;
}

struct Cpu {
  static constexpr auto forward = correlation_forward;
  static constexpr auto temporal_forward = temporal_correlation_forward;
  static constexpr auto backward = correlation_backward;
  static constexpr auto temporal_backward = temporal_correlation_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(stccl_ops, CPU, m) { EntryPoints<Cpu>::kernels(m); }

}  // namespace stccl::cpu
