// CUDA backward kernels of the local and self-correlation.
//
// Per-pixel weights of each neighbour (the same formulas as the CPU kernels,
// through the shared index helpers) are computed once; a gather kernel with
// the forward's tiling then sums weight x neighbour per output pixel and
// channel. Every gradient element is written by one thread, in a fixed order:
// no atomics, bitwise deterministic. A window with more offsets than one
// launch takes carries the partial sums between launches in the accumulation
// type (in the gradient itself for float32 and float64, in the workspace for
// the half types), so the result is rounded once.
#include "tiling.cuh"

namespace stccl::cuda {
namespace {

template <typename acc_t>
struct Workspace {
  // weights: N*K*K*H*W; partial: N*C*H*W when a half-type gradient is gathered
  // in several launches (the float32 sums between them); for float32/64 the
  // launcher points it at the gradient itself.
  acc_t *inv_a, *pass_a, *inv_b, *pass_b, *scale, *shift, *weights, *partial;
  Workspace(void* base, const Geometry& g) {
    const int64_t pixels = g.N * g.H * g.W;
    acc_t* p = static_cast<acc_t*>(base);
    inv_a = p;
    pass_a = p + pixels;
    inv_b = p + 2 * pixels;
    pass_b = p + 3 * pixels;
    scale = p + 4 * pixels;
    shift = p + 5 * pixels;
    weights = p + 6 * pixels;
    partial = weights + g.KK * pixels;
  }
  static int64_t elements(const Geometry& g, bool with_partial) {
    return (6 + g.KK + (with_partial ? g.C : 0)) * g.N * g.H * g.W;
  }
};

template <typename scalar_t>
__global__ void inverse_norms_kernel(const scalar_t* __restrict__ v, Strides4 s, Geometry g,
                                     typename AccOf<scalar_t>::type eps,
                                     typename AccOf<scalar_t>::type* __restrict__ inv,
                                     typename AccOf<scalar_t>::type* __restrict__ pass) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t total = g.N * g.H * g.W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W, y = (idx / g.W) % g.H, n = idx / (g.W * g.H);
    const scalar_t* p = v + image_offset(s, n) + y * s.y + x * s.x;
    acc_t sum = 0;
    for (int64_t c = 0; c < g.C; ++c) {
      const acc_t e = to_acc(p[c * s.c]);
      sum += e * e;
    }
    inv[idx] = inverse_norm(sum, eps);
    pass[idx] = norm_passes_clamp(sum, eps) ? acc_t(1) : acc_t(0);
  }
}

// The weights of one gradient term at pixel (y, x) of an image: w[k * w_stride],
// the weight of other[p + d_k] in the gradient at p, for the K*K offsets, from
// grad_out and out (g_img, o_img: the image's volumes) and the other
// operand's inverse norms (inv_other: the image's [H][W]). Returns
// sum_k G[p, k] out[p, k], the term's share of the shift. The formulas of
// the CPU gradient_weights.
template <typename scalar_t>
__device__ __forceinline__ typename AccOf<scalar_t>::type term_weights(
    const scalar_t* __restrict__ g_img, Strides4 sg, const scalar_t* __restrict__ o_img,
    Strides4 so, const typename AccOf<scalar_t>::type* __restrict__ inv_other, int64_t K,
    int64_t dilation, int64_t H, int64_t W, int64_t y, int64_t x, Grad which, bool normalize,
    typename AccOf<scalar_t>::type* __restrict__ w, int64_t w_stride) {
  using acc_t = typename AccOf<scalar_t>::type;
  acc_t csum = 0;
  for (int64_t k = 0; k < K * K; ++k) {
    const int64_t yq = y + offset_dy(k, K, dilation), xq = x + offset_dx(k, K, dilation);
    acc_t weight = 0;
    if (in_image(yq, xq, H, W)) {
      // GRAD_B reads the output at q whose mirrored offset points back at p.
      const int64_t kg = which == Grad::B ? mirror_offset(k, K) : k;
      const int64_t yg = which == Grad::B ? yq : y, xg = which == Grad::B ? xq : x;
      acc_t gv = to_acc(g_img[kg * sg.c + yg * sg.y + xg * sg.x]);
      const acc_t ov = to_acc(o_img[kg * so.c + yg * so.y + xg * so.x]);
      if (which == Grad::Self)
        gv += to_acc(g_img[mirror_offset(k, K) * sg.c + yq * sg.y + xq * sg.x]);
      weight = normalize ? gv * inv_other[yq * W + xq] : gv;
      csum += gv * ov;
    }
    w[k * w_stride] = weight;
  }
  return csum;
}

// The per-pixel scale and shift of a gradient: grad[p] = scale_p * sum_k
// w[k] other[p + d_k] - shift_p * own_p.
template <typename acc_t>
__device__ __forceinline__ void scale_and_shift(acc_t inv, acc_t pass, acc_t csum,
                                                bool normalize, acc_t* scale, acc_t* shift) {
  *scale = normalize ? inv : acc_t(1);
  *shift = normalize ? pass * inv * inv * csum : acc_t(0);
}

// w[n, k, p] of one gradient (see term_weights) and its scale and shift.
template <typename scalar_t>
__global__ void weights_kernel(const scalar_t* __restrict__ grad_out, Strides4 sg,
                               const scalar_t* __restrict__ out, Strides4 so, Geometry g,
                               Grad which, bool normalize,
                               Workspace<typename AccOf<scalar_t>::type> ws) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t total = g.N * g.H * g.W, hw = g.H * g.W;
  const acc_t* inv_own = which == Grad::B ? ws.inv_b : ws.inv_a;
  const acc_t* pass_own = which == Grad::B ? ws.pass_b : ws.pass_a;
  const acc_t* inv_other = which == Grad::A ? ws.inv_b : ws.inv_a;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W, y = (idx / g.W) % g.H, n = idx / hw;
    const acc_t csum = term_weights(grad_out + image_offset(sg, n), sg, out + image_offset(so, n),
                                    so, inv_other + n * hw, g.K, g.dilation, g.H, g.W, y, x,
                                    which, normalize, ws.weights + n * g.KK * hw + y * g.W + x,
                                    hw);
    scale_and_shift(inv_own[idx], pass_own[idx], csum, normalize, ws.scale + idx,
                    ws.shift + idx);
  }
}

// grad[n, c, p] = scale_p * sum_k w[k, p] other[c, p + d_k] - shift_p own[c, p],
// with other staged per channel chunk. A window of several offset groups sums
// into `partial` (acc_t) on every group but the last, which writes grad.
template <typename scalar_t, int G, bool STAGED>
__device__ __forceinline__ void gather_tile(
    const scalar_t* __restrict__ other, Strides4 sx, const scalar_t* __restrict__ own,
    Strides4 sy, scalar_t* __restrict__ grad, const Geometry& g, int chunk, int k_begin,
    int k_count, bool first_group, bool last_group,
    const Workspace<typename AccOf<scalar_t>::type>& ws, int64_t n, unsigned char* smem) {
  using acc_t = typename AccOf<scalar_t>::type;
  acc_t* x_tile = reinterpret_cast<acc_t*>(smem);  // [chunk][BS]
  int* offsets = reinterpret_cast<int*>(x_tile + (STAGED ? int64_t(chunk) * g.BS : 0));

  const int tid = threadIdx.x, tx = tid % TILE_W, ty = tid / TILE_W;
  const auto [x0, y0] = tile_origin(g);
  const int64_t x = x0 + tx, y = y0 + ty;
  const bool mine = y < g.H && x < g.W;
  const int64_t pixel = (n * g.H + (mine ? y : 0)) * g.W + (mine ? x : 0);
  const scalar_t* x_img = other + image_offset(sx, n);
  const scalar_t* y_img = own + image_offset(sy, n);
  for (int i = tid; i < k_count; i += THREADS) {
    const int64_t k = k_begin + i;
    offsets[i] = int((g.pad + offset_dy(k, g.K, g.dilation)) * g.TWB + g.pad +
                     offset_dx(k, g.K, g.dilation));
  }
  acc_t w[G];
  int64_t where[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const int64_t k = k_begin + i;
    w[i] = (mine && i < k_count) ? ws.weights[(n * g.KK + k) * g.H * g.W + y * g.W + x] : acc_t(0);
    if (!STAGED) {
      const int64_t yq = y + offset_dy(k, g.K, g.dilation), xq = x + offset_dx(k, g.K, g.dilation);
      where[i] = (i < k_count && in_image(yq, xq, g.H, g.W)) ? yq * sx.y + xq * sx.x : -1;
    }
  }
  const acc_t scale = mine ? ws.scale[pixel] : acc_t(0);
  const acc_t shift = mine && first_group ? ws.shift[pixel] : acc_t(0);
  const int64_t pix = (n * g.C * g.H + y) * g.W + x;  // of channel 0

  for (int64_t c0 = 0; c0 < g.C; c0 += chunk) {
    const int count = int(min(int64_t(chunk), g.C - c0));
    if (STAGED) {
      __syncthreads();
      stage_tile(x_img, sx, g, y0 - g.pad, x0 - g.pad, g.THB, g.TWB, c0, count, x_tile, g.BS,
                 static_cast<acc_t*>(nullptr));
      __syncthreads();
    }
    if (!mine) continue;
    for (int cc = 0; cc < count; ++cc) {
      const int64_t c = c0 + cc;
      acc_t s = 0;
#pragma unroll
      for (int i = 0; i < G; ++i) {
        if (i >= k_count) break;
        if (STAGED) {
          s += w[i] * x_tile[cc * g.BS + ty * g.TWB + tx + offsets[i]];
        } else if (where[i] >= 0) {
          s += w[i] * to_acc(x_img[c * sx.c + where[i]]);
        }
      }
      const int64_t at = pix + c * g.H * g.W;
      acc_t v = scale * s;
      if (first_group) {
        // (raw mode has no shift: 0 times an infinite own value would be NaN)
        if (shift != acc_t(0)) v -= shift * to_acc(y_img[c * sy.c + y * sy.y + x * sy.x]);
      } else {
        v += ws.partial[at];
      }
      if (last_group) {
        grad[at] = from_acc<scalar_t>(v);
      } else {
        ws.partial[at] = v;
      }
    }
  }
}

template <typename scalar_t, int G, bool STAGED>
__global__ void __launch_bounds__(THREADS, (STAGED ? min_blocks<scalar_t, G>() : 1))
    gather_kernel(const scalar_t* __restrict__ other, Strides4 sx,
                  const scalar_t* __restrict__ own, Strides4 sy, scalar_t* __restrict__ grad,
                  Geometry g, int chunk, int k_begin, int k_count, bool first_group,
                  bool last_group, Workspace<typename AccOf<scalar_t>::type> ws) {
  unsigned char* smem = dynamic_shared_memory();
  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
    __syncthreads();  // the previous image's threads are done with shared memory
    gather_tile<scalar_t, G, STAGED>(other, sx, own, sy, grad, g, chunk, k_begin, k_count,
                                     first_group, last_group, ws, n, smem);
  }
}

template <typename scalar_t>
cudaError_t backward_norms(const Problem& p, const void* a_, Strides4 sa, const void* b_,
                           Strides4 sb, bool self, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p);
  Workspace<acc_t> ws(workspace, g);
  const unsigned blocks = flat_blocks(g.N * g.H * g.W);
  cudaError_t err = launch_kernel(inverse_norms_kernel<scalar_t>, "inverse_norms", blocks, 256, 0,
                                  stream, static_cast<const scalar_t*>(a_), sa, g, acc_t(p.window.eps),
                                  ws.inv_a, ws.pass_a);
  if (err != cudaSuccess || self) return err;
  return launch_kernel(inverse_norms_kernel<scalar_t>, "inverse_norms", blocks, 256, 0, stream,
                       static_cast<const scalar_t*>(b_), sb, g, acc_t(p.window.eps), ws.inv_b,
                       ws.pass_b);
}

template <typename scalar_t>
cudaError_t backward(const Problem& p, Grad which, const void* grad_out, Strides4 sg,
                     const void* out, Strides4 so, const void* a, Strides4 sa, const void* b,
                     Strides4 sb, void* grad, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p);
  Workspace<acc_t> ws(workspace, g);
  if (which == Grad::Self) {
    ws.inv_b = ws.inv_a;
    ws.pass_b = ws.pass_a;
  }
  cudaError_t err = launch_kernel(weights_kernel<scalar_t>, "weights", flat_blocks(g.N * g.H * g.W),
                                  256, 0, stream, static_cast<const scalar_t*>(grad_out), sg,
                                  static_cast<const scalar_t*>(out), so, g, which, p.window.normalize, ws);
  if (err != cudaSuccess) return err;
  const bool gather_a = which == Grad::B;  // grad_b gathers a; grad_a and self gather b / x
  const auto* other = static_cast<const scalar_t*>(gather_a ? a : b);
  const Strides4 s_other = gather_a ? sa : sb;
  const auto* own = static_cast<const scalar_t*>(which == Grad::B ? b : a);
  const Strides4 s_own = which == Grad::B ? sb : sa;
  auto* g_out = static_cast<scalar_t*>(grad);
  // Sums between offset groups: in the gradient itself where it is acc_t.
  if (std::is_same<scalar_t, acc_t>::value) ws.partial = reinterpret_cast<acc_t*>(grad);
  const int64_t chunk =
      sector_aligned(gather_chunk(g, sizeof(acc_t)), stages_along_channels(s_other),
                     sizeof(scalar_t));
  if (chunk == 0) {  // halo beyond shared memory: neighbours through the cache
    for (int64_t k0 = 0; k0 < g.KK; k0 += UNSTAGED_GROUP) {
      const int kc = int(std::min<int64_t>(UNSTAGED_GROUP, g.KK - k0));
      err = launch_kernel(gather_kernel<scalar_t, UNSTAGED_GROUP, false>, "gather_unstaged",
                          tile_grid(g), THREADS, UNSTAGED_GROUP * sizeof(int), stream, other,
                          s_other, own, s_own, g_out, g, 1, int(k0), kc, k0 == 0,
                          k0 + kc == g.KK, ws);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const size_t smem = size_t(chunk * g.BS * sizeof(acc_t) + 81 * sizeof(int));
  return for_offset_groups(0, g.KK, [&](int bucket, int k0, int kc) {
    STCCL_WITH_BUCKET(bucket, launch_kernel(gather_kernel<scalar_t, G, true>, "gather_staged",
                                            tile_grid(g), THREADS, smem, stream, other, s_other,
                                            own, s_own, g_out, g, int(chunk), k0, kc, k0 == 0,
                                            k0 + kc == g.KK, ws));
  });
}

// Scratch of the clip backward: the frames' inverse norms and clamp masks,
// scale and shift, and the weights of the three terms of every frame pixel:
// [N][J][H][W], J = K*K (spatial, S) + Kt*Kt (pair t, A) + Kt*Kt (pair t - s, B);
// partial as in Workspace.
template <typename acc_t>
struct ClipWorkspace {
  acc_t *inv, *pass, *scale, *shift, *weights, *partial;
  int64_t J;
  ClipWorkspace(void* base, const Geometry& g, const ClipWindow& tw)
      : J(g.KK + 2 * tw.KK) {
    const int64_t pixels = g.N * g.H * g.W;
    acc_t* p = static_cast<acc_t*>(base);
    inv = p;
    pass = p + pixels;
    scale = p + 2 * pixels;
    shift = p + 3 * pixels;
    weights = p + 4 * pixels;
    partial = weights + J * pixels;
  }
  static int64_t elements(const Geometry& g, const ClipWindow& tw, bool with_partial) {
    return (4 + g.KK + 2 * tw.KK + (with_partial ? g.C : 0)) * g.N * g.H * g.W;
  }
};

// The weights of a frame pixel's three terms (zero for a term it does not
// have: no grad_spatial, no grad_temporal, no pair t or t - s), their shared
// scale (the frame's inverse norm) and summed shift.
template <typename scalar_t>
__global__ void clip_weights_kernel(const scalar_t* __restrict__ grad_spatial, Strides4 sgs,
                                    const scalar_t* __restrict__ spatial, Strides4 ss,
                                    const scalar_t* __restrict__ grad_temporal, Strides4 sgt,
                                    const scalar_t* __restrict__ temporal, Strides4 st,
                                    Geometry g, ClipWindow tw, bool normalize,
                                    ClipWorkspace<typename AccOf<scalar_t>::type> ws) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t total = g.N * g.H * g.W, hw = g.H * g.W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W, y = (idx / g.W) % g.H, n = idx / hw;
    const int64_t t = n % tw.T, pair = n / tw.T * (tw.T - tw.S) + t;
    acc_t* w = ws.weights + n * ws.J * hw + y * g.W + x;
    acc_t csum = 0;
    // One term over `offsets` weights from w_at, or zeros when absent.
    auto term = [&](bool present, const scalar_t* g_img, Strides4 sg, const scalar_t* o_img,
                    Strides4 so, int64_t other, int64_t K, int64_t KK, int64_t dilation,
                    Grad which, acc_t* w_at) {
      if (!present) {
        for (int64_t k = 0; k < KK; ++k) w_at[k * hw] = 0;
        return;
      }
      csum += term_weights(g_img, sg, o_img, so, ws.inv + other * hw, K, dilation, g.H, g.W, y,
                           x, which, normalize, w_at, hw);
    };
    const bool has_spatial = grad_spatial != nullptr, has_temporal = grad_temporal != nullptr;
    const bool has_next = has_temporal && t + tw.S < tw.T, has_prev = has_temporal && t >= tw.S;
    term(has_spatial, has_spatial ? grad_spatial + image_offset(sgs, n) : nullptr, sgs,
         spatial + image_offset(ss, n), ss, n, g.K, g.KK, g.dilation, Grad::Self, w);
    term(has_next, has_next ? grad_temporal + image_offset(sgt, pair) : nullptr, sgt,
         has_next ? temporal + image_offset(st, pair) : nullptr, st, n + tw.S, tw.K, tw.KK,
         tw.dilation, Grad::A, w + g.KK * hw);
    term(has_prev, has_prev ? grad_temporal + image_offset(sgt, pair - tw.S) : nullptr, sgt,
         has_prev ? temporal + image_offset(st, pair - tw.S) : nullptr, st, n - tw.S, tw.K,
         tw.KK, tw.dilation, Grad::B, w + (g.KK + tw.KK) * hw);
    scale_and_shift(ws.inv[idx], ws.pass[idx], csum, normalize, ws.scale + idx, ws.shift + idx);
  }
}

// grad[n, c, p] = scale_p * sum_j w[j, p] tile_j[c, p + d_j] - shift_p v[n, c, p]
// over a group of the J weights of frame n, the tiles being frame n (the
// spatial term), n + S (A) and n - S (B), each staged once per chunk with the
// halo of both windows when the group has offsets of its term (a term the
// frame does not have: zeros). Several groups carry their sums in `partial`
// as gather_tile does.
template <typename scalar_t, int G>
__device__ __forceinline__ void clip_gather_tile(
    const scalar_t* __restrict__ v, Strides4 sv, scalar_t* __restrict__ grad, const Geometry& g,
    const ClipWindow& tw, int chunk, int j_begin, int j_count, bool first_group,
    bool last_group, const ClipWorkspace<typename AccOf<scalar_t>::type>& ws, int64_t n,
    unsigned char* smem) {
  using acc_t = typename AccOf<scalar_t>::type;
  acc_t* tiles = reinterpret_cast<acc_t*>(smem);  // [3][chunk][BS]: frames n, n + S, n - S
  int* offsets = reinterpret_cast<int*>(tiles + 3 * int64_t(chunk) * g.BS);  // [G]

  const int tid = threadIdx.x, tx = tid % TILE_W, ty = tid / TILE_W;
  const auto [x0, y0] = tile_origin(g);
  const int64_t x = x0 + tx, y = y0 + ty, hw = g.H * g.W;
  const bool mine = y < g.H && x < g.W;
  const int64_t pixel = (n * g.H + (mine ? y : 0)) * g.W + (mine ? x : 0);
  const int64_t t = n % tw.T, section_size = int64_t(chunk) * g.BS;
  // Term of offset j: 0 spatial (frame n), 1 the pair t (frame n + S), 2 the
  // pair t - S (frame n - S).
  auto term_of = [&](int64_t j) { return j < g.KK ? 0 : j < g.KK + tw.KK ? 1 : 2; };
  for (int i = tid; i < j_count; i += THREADS) {
    const int64_t j = j_begin + i;
    const int term = term_of(j);
    const int64_t k = term == 0 ? j : j - g.KK - (term - 1) * tw.KK;
    const int64_t K = term == 0 ? g.K : tw.K, d = term == 0 ? g.dilation : tw.dilation;
    offsets[i] = int(term * section_size + (g.pad + offset_dy(k, K, d)) * g.TWB + g.pad +
                     offset_dx(k, K, d));
  }
  acc_t w[G];
#pragma unroll
  for (int i = 0; i < G; ++i)
    w[i] = (mine && i < j_count) ? ws.weights[(n * ws.J + j_begin + i) * hw + y * g.W + x]
                                 : acc_t(0);
  const acc_t scale = mine ? ws.scale[pixel] : acc_t(0);
  const acc_t shift = mine && first_group ? ws.shift[pixel] : acc_t(0);
  const scalar_t* own_img = v + image_offset(sv, n);
  const int64_t pix = (n * g.C * g.H + y) * g.W + x;  // of channel 0

  for (int64_t c0 = 0; c0 < g.C; c0 += chunk) {
    const int count = int(min(int64_t(chunk), g.C - c0));
    __syncthreads();
    for (int term = term_of(j_begin); term <= term_of(j_begin + j_count - 1); ++term) {
      acc_t* tile = tiles + term * section_size;
      const int64_t frame = n + (term == 0 ? 0 : term == 1 ? tw.S : -tw.S);
      if (term == 0 || (term == 1 ? t + tw.S < tw.T : t >= tw.S)) {
        stage_tile(v + image_offset(sv, frame), sv, g, y0 - g.pad, x0 - g.pad, g.THB, g.TWB, c0,
                   count, tile, g.BS, static_cast<acc_t*>(nullptr));
      } else {  // a pair the frame is not in: its weights are 0, its tile zeros
        for (int64_t i = tid; i < section_size; i += THREADS) tile[i] = 0;
      }
    }
    __syncthreads();
    if (!mine) continue;
    for (int cc = 0; cc < count; ++cc) {
      const int64_t c = c0 + cc;
      acc_t sum = 0;
#pragma unroll
      for (int i = 0; i < G; ++i) {
        if (i >= j_count) break;
        sum += w[i] * tiles[cc * g.BS + ty * g.TWB + tx + offsets[i]];
      }
      const int64_t at = pix + c * hw;
      acc_t value = scale * sum;
      if (first_group) {
        if (shift != acc_t(0)) value -= shift * to_acc(own_img[c * sv.c + y * sv.y + x * sv.x]);
      } else {
        value += ws.partial[at];
      }
      if (last_group) {
        grad[at] = from_acc<scalar_t>(value);
      } else {
        ws.partial[at] = value;
      }
    }
  }
}

template <typename acc_t>
constexpr int64_t CLIP_GATHER_GROUP = sizeof(acc_t) == 8 ? 49 : 81;

template <typename scalar_t, int G>
__global__ void __launch_bounds__(THREADS, (min_blocks<scalar_t, G>()))
    clip_gather_kernel(const scalar_t* __restrict__ v, Strides4 sv, scalar_t* __restrict__ grad,
                       Geometry g, ClipWindow tw, int chunk, int j_begin, int j_count,
                       bool first_group, bool last_group,
                       ClipWorkspace<typename AccOf<scalar_t>::type> ws) {
  unsigned char* smem = dynamic_shared_memory();
  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
    __syncthreads();  // the previous frame's threads are done with shared memory
    clip_gather_tile<scalar_t, G>(v, sv, grad, g, tw, chunk, j_begin, j_count, first_group,
                                  last_group, ws, n, smem);
  }
}

template <typename scalar_t>
cudaError_t spatiotemporal_backward(const Problem& p, const Window& temporal_window, int64_t T,
                                    int64_t S, const void* grad_spatial, Strides4 sgs,
                                    const void* spatial, Strides4 ss, const void* grad_temporal,
                                    Strides4 sgt, const void* temporal, Strides4 st,
                                    const void* v_, Strides4 sv, void* grad_, void* workspace,
                                    cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p, temporal_window.pad());
  const ClipWindow tw = clip_window(temporal_window, T, S);
  ClipWorkspace<acc_t> ws(workspace, g, tw);
  const auto* v = static_cast<const scalar_t*>(v_);
  auto* grad = static_cast<scalar_t*>(grad_);
  const unsigned blocks = flat_blocks(g.N * g.H * g.W);
  cudaError_t err = launch_kernel(inverse_norms_kernel<scalar_t>, "inverse_norms", blocks, 256, 0,
                                  stream, v, sv, g, acc_t(p.window.eps), ws.inv, ws.pass);
  if (err != cudaSuccess) return err;
  err = launch_kernel(clip_weights_kernel<scalar_t>, "clip_weights", blocks, 256, 0, stream,
                      static_cast<const scalar_t*>(grad_spatial), sgs,
                      static_cast<const scalar_t*>(spatial), ss,
                      static_cast<const scalar_t*>(grad_temporal), sgt,
                      static_cast<const scalar_t*>(temporal), st, g, tw, p.window.normalize, ws);
  if (err != cudaSuccess) return err;
  // Sums between offset groups: in the gradient itself where it is acc_t.
  if (std::is_same<scalar_t, acc_t>::value) ws.partial = reinterpret_cast<acc_t*>(grad);
  const int64_t chunk = sector_aligned(clip_chunk(g, sizeof(acc_t), 3, 0),
                                       stages_along_channels(sv), sizeof(scalar_t));
  const size_t smem = size_t(3 * chunk * g.BS * sizeof(acc_t) + 81 * sizeof(int));
  // float64 weights of 81 offsets do not fit the registers next to the
  // gather's state (8 bytes spilled): groups of 49 there.
  return for_offset_groups(0, ws.J, [&](int bucket, int j0, int jc) {
    // (the 81 bucket is never chosen for float64; instantiated as 49)
    STCCL_WITH_BUCKET(bucket, launch_kernel(clip_gather_kernel<scalar_t, std::min<int>(
                                                G, CLIP_GATHER_GROUP<acc_t>)>, "clip_gather",
                                            tile_grid(g), THREADS, smem, stream, v, sv, grad, g,
                                            tw, int(chunk), j0, jc, j0 == 0, j0 + jc == ws.J,
                                            ws));
  }, CLIP_GATHER_GROUP<acc_t>);
}

template <typename T> struct Norms { template <typename... A> static cudaError_t run(A&&... a) { return backward_norms<T>(a...); } };
template <typename T> struct Backward { template <typename... A> static cudaError_t run(A&&... a) { return backward<T>(a...); } };
template <typename T> struct SpatiotemporalBackward { template <typename... A> static cudaError_t run(A&&... a) { return spatiotemporal_backward<T>(a...); } };

}  // namespace

int64_t backward_workspace_bytes(const Problem& p) {
  const Geometry g(p);
  const int64_t size = p.dtype == DType::Float64 ? 8 : 4;
  const bool half = p.dtype == DType::Float16 || p.dtype == DType::BFloat16;
  return Workspace<float>::elements(g, half && gather_launches(g, size) > 1) * size;
}

int64_t clip_backward_workspace_bytes(const Problem& p, const Window& temporal) {
  const Geometry g(p, temporal.pad());
  const ClipWindow tw = clip_window(temporal, 1, 1);
  const bool half = p.dtype == DType::Float16 || p.dtype == DType::BFloat16;
  const int64_t size = p.dtype == DType::Float64 ? 8 : 4;
  return ClipWorkspace<float>::elements(g, tw, half && g.KK + 2 * tw.KK > CLIP_GATHER_GROUP<float>) *
         size;
}

cudaError_t launch_spatiotemporal_backward(const Problem& p, const Window& temporal, int64_t T,
                                           int64_t S, const void* grad_spatial, Strides4 sgs,
                                           const void* spatial, Strides4 ss,
                                           const void* grad_temporal, Strides4 sgt,
                                           const void* temporal_out, Strides4 st, const void* v,
                                           Strides4 sv, void* grad, void* workspace,
                                           cudaStream_t stream) {
  return dispatch<SpatiotemporalBackward>(p.dtype, p, temporal, T, S, grad_spatial, sgs, spatial,
                                          ss, grad_temporal, sgt, temporal_out, st, v, sv, grad,
                                          workspace, stream);
}

cudaError_t launch_backward_norms(const Problem& p, const void* a, Strides4 sa, const void* b,
                                  Strides4 sb, bool self, void* workspace, cudaStream_t stream) {
  return dispatch<Norms>(p.dtype, p, a, sa, b, sb, self, workspace, stream);
}

cudaError_t launch_backward(const Problem& p, Grad which, const void* grad_out, Strides4 sg,
                            const void* out, Strides4 so, const void* a, Strides4 sa,
                            const void* b, Strides4 sb, void* grad, void* workspace,
                            cudaStream_t stream) {
  return dispatch<Backward>(p.dtype, p, which, grad_out, sg, out, so, a, sa, b, sb, grad,
                            workspace, stream);
}

}  // namespace stccl::cuda
