// CUDA kernels of the local correlation. No torch headers: the launchers take
// raw pointers, sizes and strides (launch.h); local_correlation_ops.cpp binds them.
//
// Forward: a block computes a TILE_H x TILE_W tile of output pixels of one
// image. It walks the channels in chunks, staging the a tile and the b tile
// with its halo in shared memory (read from global memory once, converted to
// the accumulation type) together with the per-pixel sums of squares, so the
// inverse norms are computed once per pixel, never per neighbour. Each thread
// keeps the dot products of its pixel for up to G offsets in registers; G is a
// compile-time bucket (1, 9, 25, 49, 81), a window with more offsets runs in
// groups. Halos too large for shared memory take an unstaged kernel that
// reads neighbours through the cache.
//
// Backward: per-pixel weights of each neighbour (the same formulas as the CPU
// kernels, through the shared index helpers) are computed once; a gather
// kernel with the forward's tiling then sums weight x neighbour per output
// pixel and channel. Every gradient element is written by one thread, in a
// fixed order: no atomics, bitwise deterministic. A window with more offsets
// than one launch takes carries the partial sums between launches in the
// accumulation type (in the gradient itself for float32 and float64, in the
// workspace for the half types), so the result is rounded once.
//
// Every launch goes through launch_kernel (device.h): the same source runs on
// the CPU under the emulator (emulation/emulator.h) as the cuda_emulated backend.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "device.h"

namespace stccl::cuda {
namespace {

constexpr int TILE_W = 32, TILE_H = 8, THREADS = TILE_W * TILE_H;
constexpr int64_t SMEM_BUDGET = 40 * 1024;
constexpr int UNSTAGED_GROUP = 9;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double v) { return v; }

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// The channel stride of a staged tile of `pixels` values: odd, so that the 32
// lanes of a warp that stage 32 channels of one pixel hit 32 different banks
// (an even stride such as the 256 of an a tile put them all in one).
constexpr int channel_stride(int64_t pixels) { return int(pixels | 1); }

struct Geometry {
  int64_t N, C, H, W, K, KK, dilation, pad;
  int THB, TWB;  // staged b tile with its halo
  int BS, AS;    // channel strides of the staged b and a tiles
  explicit Geometry(const Problem& p)
      : N(p.N), C(p.C), H(p.H), W(p.W), K(p.kernel_size), KK(p.kernel_size * p.kernel_size),
        dilation(p.dilation), pad((p.kernel_size / 2) * p.dilation),
        THB(int(TILE_H + 2 * pad)), TWB(int(TILE_W + 2 * pad)),
        BS(channel_stride(int64_t(THB) * TWB)), AS(channel_stride(TILE_H * TILE_W)) {}
};

// The first pixel of a block's tile. Tiles are numbered row-major along the
// grid's x axis: a y axis would cap maps at 65535 tile rows (524280 pixels).
struct TileOrigin {
  int64_t x0, y0;
};
__device__ __forceinline__ TileOrigin tile_origin(const Geometry& g) {
  const int64_t tiles_x = (g.W + TILE_W - 1) / TILE_W, tile = blockIdx.x;
  return {tile % tiles_x * TILE_W, tile / tiles_x * TILE_H};
}

// Channels staged per chunk so that the tiles fit SMEM_BUDGET; 0 if even one
// channel does not fit (the unstaged kernels then run).
int64_t staged_chunk(const Geometry& g, int64_t acc_size, bool self) {
  const int64_t fixed = (int64_t(g.THB) * g.TWB + TILE_H * TILE_W) * acc_size + 81 * 4;
  const int64_t per_channel = (g.BS + (self ? 0 : g.AS)) * acc_size;
  if (fixed + per_channel > SMEM_BUDGET) return 0;
  return std::max<int64_t>(1, std::min<int64_t>({g.C, 32, (SMEM_BUDGET - fixed) / per_channel}));
}

// Whether staging reads along the channels: they are the smaller stride
// (channels_last), so consecutive threads reading consecutive channels coalesce.
__host__ __device__ __forceinline__ bool stages_along_channels(const Strides4& s) {
  return s.c < s.x;
}

// Channels per chunk of the gather, which stages only the other operand: the
// a-tile part of the forward budget is free (0: the unstaged gather runs).
int64_t gather_chunk(const Geometry& g, int64_t acc_size) {
  return staged_chunk(g, acc_size, /*self=*/true);
}

// A chunk of channels-innermost operands rounded down to whole 32-byte
// sectors, so that each pixel's chunk is whole sectors (a chunk of 11 floats
// took twice the sectors a warp needs).
int64_t sector_aligned(int64_t chunk, bool channels_innermost, int64_t element_size) {
  const int64_t per_sector = 32 / element_size;
  return channels_innermost && chunk > per_sector ? chunk / per_sector * per_sector : chunk;
}

// Launches of the gather: one per group of offsets.
int64_t gather_launches(const Geometry& g, int64_t acc_size) {
  const int64_t group = gather_chunk(g, acc_size) > 0 ? 81 : UNSTAGED_GROUP;
  return (g.KK + group - 1) / group;
}

// Copies rows x cols pixels starting at (y_first, x_first) of channels
// [c0, c0 + count) of one image into tile[cc * tile_stride + i] (0 outside the
// image), adding each pixel's sum of squares to sq[i] when given.
//
// Consecutive threads read along the axis of the smaller stride, so that a
// warp's loads are coalesced: x for NCHW, the channels for channels_last
// (reading along x there took 8x the sectors a warp needs). Along x, each
// thread owns a pixel and sums its squares itself; along channels, the sums
// come from the staged tile after a barrier. Both add in channel order: the
// result is the same bits.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_tile(const scalar_t* __restrict__ img, const Strides4& s,
                                           const Geometry& g, int64_t y_first, int64_t x_first,
                                           int rows, int cols, int64_t c0, int count,
                                           acc_t* tile, int tile_stride, acc_t* sq) {
  const int pixels = rows * cols;
  if (count > 1 && stages_along_channels(s)) {
    for (int j = threadIdx.x; j < pixels * count; j += THREADS) {
      const int i = j / count, cc = j - i * count;
      const int64_t yy = y_first + i / cols, xx = x_first + i % cols;
      tile[cc * tile_stride + i] =
          in_image(yy, xx, g.H, g.W) ? to_acc(img[yy * s.y + xx * s.x + (c0 + cc) * s.c])
                                     : acc_t(0);
    }
    if (sq == nullptr) return;
    __syncthreads();  // the tile is staged
    for (int i = threadIdx.x; i < pixels; i += THREADS) {
      acc_t total = 0;
      for (int cc = 0; cc < count; ++cc) {
        const acc_t v = tile[cc * tile_stride + i];
        total += v * v;
      }
      sq[i] += total;
    }
    return;
  }
  for (int i = threadIdx.x; i < pixels; i += THREADS) {
    const int64_t yy = y_first + i / cols, xx = x_first + i % cols;
    const bool inside = in_image(yy, xx, g.H, g.W);
    const scalar_t* src = img + (inside ? yy * s.y + xx * s.x : 0) + c0 * s.c;
    acc_t total = 0;
    for (int cc = 0; cc < count; ++cc) {
      const acc_t v = inside ? to_acc(src[cc * s.c]) : acc_t(0);
      tile[cc * tile_stride + i] = v;
      total += v * v;
    }
    if (sq != nullptr) sq[i] += total;
  }
}

// --------------------------------------------------------------------- forward

template <typename scalar_t, int G>
__device__ __forceinline__ void forward_staged_tile(
    const scalar_t* __restrict__ a, Strides4 sa, const scalar_t* __restrict__ b, Strides4 sb,
    scalar_t* __restrict__ out, const Geometry& g, int chunk, int k_begin, int k_count, bool self,
    bool normalize, typename AccOf<scalar_t>::type eps, int64_t n, unsigned char* smem) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int TB = g.THB * g.TWB, TILE = TILE_H * TILE_W;
  acc_t* b_sq = reinterpret_cast<acc_t*>(smem);  // [THB * TWB]
  acc_t* a_sq = b_sq + TB;                        // [TILE]
  acc_t* b_tile = a_sq + TILE;                      // [chunk][BS]
  acc_t* a_tile = b_tile + int64_t(chunk) * g.BS;   // [chunk][AS] (not for self)
  int* offsets = reinterpret_cast<int*>(a_tile + (self ? 0 : int64_t(chunk) * g.AS));

  const int tid = threadIdx.x, tx = tid % TILE_W, ty = tid / TILE_W;
  const auto [x0, y0] = tile_origin(g);
  const int64_t x = x0 + tx, y = y0 + ty;
  const scalar_t* a_img = a + image_offset(sa, n);
  const scalar_t* b_img = b + image_offset(sb, n);
  for (int i = tid; i < TB; i += THREADS) b_sq[i] = 0;
  for (int i = tid; i < TILE; i += THREADS) a_sq[i] = 0;
  for (int i = tid; i < k_count; i += THREADS) {
    const int64_t k = k_begin + i;
    offsets[i] = int((g.pad + offset_dy(k, g.K, g.dilation)) * g.TWB + g.pad +
                     offset_dx(k, g.K, g.dilation));
  }
  acc_t acc[G];
#pragma unroll
  for (int i = 0; i < G; ++i) acc[i] = 0;

  for (int64_t c0 = 0; c0 < g.C; c0 += chunk) {
    const int count = int(min(int64_t(chunk), g.C - c0));
    __syncthreads();  // the previous chunk is consumed
    stage_tile(b_img, sb, g, y0 - g.pad, x0 - g.pad, g.THB, g.TWB, c0, count, b_tile, g.BS,
               b_sq);
    if (!self)
      stage_tile(a_img, sa, g, y0, x0, TILE_H, TILE_W, c0, count, a_tile, g.AS, a_sq);
    __syncthreads();
    const acc_t* a_col = self ? b_tile + (ty + g.pad) * g.TWB + tx + g.pad : a_tile + tid;
    const int a_stride = self ? g.BS : g.AS;
    const acc_t* b_col = b_tile + ty * g.TWB + tx;
    for (int cc = 0; cc < count; ++cc) {
      const acc_t va = a_col[cc * a_stride];
#pragma unroll
      for (int i = 0; i < G; ++i)
        if (i < k_count) acc[i] += va * b_col[cc * g.BS + offsets[i]];
    }
  }
  __syncthreads();
  if (y >= g.H || x >= g.W) return;
  const acc_t inv_a =
      !normalize ? acc_t(1)
                 : inverse_norm(self ? b_sq[(ty + g.pad) * g.TWB + tx + g.pad] : a_sq[tid], eps);
#pragma unroll
  for (int i = 0; i < G; ++i) {
    if (i >= k_count) break;
    const int64_t k = k_begin + i;
    const int64_t yq = y + offset_dy(k, g.K, g.dilation), xq = x + offset_dx(k, g.K, g.dilation);
    acc_t v = 0;
    if (in_image(yq, xq, g.H, g.W)) {
      const acc_t inv_b = normalize ? inverse_norm(b_sq[ty * g.TWB + tx + offsets[i]], eps) : 1;
      v = acc[i] * inv_a * inv_b;
    }
    out[((n * g.KK + k) * g.H + y) * g.W + x] = from_acc<scalar_t>(v);
  }
}

// Blocks per SM the register budget must allow: three for the small windows
// of 4-byte-accumulating types (at most 85 registers a thread; K = 3, the
// STCCL window, is memory-bound and wants the warps to hide latency), one
// otherwise (the accumulators of larger groups need the registers).
template <typename scalar_t, int G>
constexpr int min_blocks() {
  return G <= 9 && sizeof(typename AccOf<scalar_t>::type) == 4 ? 3 : 1;
}

// Images beyond the grid's z extent (65535) are looped over.
template <typename scalar_t, int G>
__global__ void __launch_bounds__(THREADS, (min_blocks<scalar_t, G>()))
    forward_staged_kernel(const scalar_t* __restrict__ a, Strides4 sa,
                          const scalar_t* __restrict__ b, Strides4 sb,
                          scalar_t* __restrict__ out, Geometry g, int chunk, int k_begin,
                          int k_count, bool self, bool normalize,
                          typename AccOf<scalar_t>::type eps) {
  unsigned char* smem = dynamic_shared_memory();
  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
    __syncthreads();  // the previous image's epilogue has read shared memory
    forward_staged_tile<scalar_t, G>(a, sa, b, sb, out, g, chunk, k_begin, k_count, self,
                                     normalize, eps, n, smem);
  }
}

// Halos beyond shared memory: each thread reads its neighbours through the
// cache and sums their squares itself (UNSTAGED_GROUP offsets per launch).
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS, 1)
    forward_unstaged_kernel(const scalar_t* __restrict__ a, Strides4 sa,
                            const scalar_t* __restrict__ b, Strides4 sb,
                            scalar_t* __restrict__ out, Geometry g, int k_begin, int k_count,
                            bool normalize, typename AccOf<scalar_t>::type eps) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto [x0, y0] = tile_origin(g);
  const int64_t x = x0 + threadIdx.x % TILE_W, y = y0 + threadIdx.x / TILE_W;
  if (y >= g.H || x >= g.W) return;
  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
  const scalar_t* a_img = a + image_offset(sa, n);
  const scalar_t* b_img = b + image_offset(sb, n);
  acc_t acc[UNSTAGED_GROUP], sq[UNSTAGED_GROUP], sq_a = 0;
  int64_t where[UNSTAGED_GROUP];
#pragma unroll
  for (int i = 0; i < UNSTAGED_GROUP; ++i) {
    acc[i] = sq[i] = 0;
    const int64_t k = k_begin + i;
    const int64_t yq = y + offset_dy(k, g.K, g.dilation), xq = x + offset_dx(k, g.K, g.dilation);
    where[i] = (i < k_count && in_image(yq, xq, g.H, g.W)) ? yq * sb.y + xq * sb.x : -1;
  }
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t va = to_acc(a_img[c * sa.c + y * sa.y + x * sa.x]);
    sq_a += va * va;
#pragma unroll
    for (int i = 0; i < UNSTAGED_GROUP; ++i) {
      if (where[i] < 0) continue;
      const acc_t vb = to_acc(b_img[c * sb.c + where[i]]);
      acc[i] += va * vb;
      sq[i] += vb * vb;
    }
  }
  const acc_t inv_a = normalize ? inverse_norm(sq_a, eps) : acc_t(1);
#pragma unroll
  for (int i = 0; i < UNSTAGED_GROUP; ++i) {
    if (i >= k_count) break;
    const acc_t v = where[i] < 0 ? acc_t(0)
                                 : acc[i] * inv_a * (normalize ? inverse_norm(sq[i], eps) : 1);
    out[((n * g.KK + k_begin + i) * g.H + y) * g.W + x] = from_acc<scalar_t>(v);
  }
  }
}

// out[p, mirror(k)] = out[p + d_mirror(k), k] for the offsets past the centre.
template <typename scalar_t>
__global__ void mirror_kernel(scalar_t* __restrict__ out, Geometry g) {
  const int64_t centre = g.KK / 2, mirrored = g.KK - centre - 1;
  const int64_t total = g.N * mirrored * g.H * g.W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W, y = (idx / g.W) % g.H;
    const int64_t kb = centre + 1 + (idx / (g.W * g.H)) % mirrored;
    const int64_t n = idx / (g.W * g.H * mirrored);
    const int64_t ys = y + offset_dy(kb, g.K, g.dilation), xs = x + offset_dx(kb, g.K, g.dilation);
    scalar_t v = from_acc<scalar_t>(typename AccOf<scalar_t>::type(0));
    if (in_image(ys, xs, g.H, g.W))
      v = out[((n * g.KK + mirror_offset(kb, g.K)) * g.H + ys) * g.W + xs];
    out[((n * g.KK + kb) * g.H + y) * g.W + x] = v;
  }
}

// -------------------------------------------------------------------- backward

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

// w[n, k, p]: the weight of other[p + d_k] in the gradient at p, and the
// per-pixel scale and shift: grad[p] = scale_p * sum_k w[k] other[p + d_k]
// - shift_p * own_p (the formulas of the CPU backward_weights).
template <typename scalar_t>
__global__ void weights_kernel(const scalar_t* __restrict__ grad_out, Strides4 sg,
                               const scalar_t* __restrict__ out, Strides4 so, Geometry g,
                               Grad which, bool normalize,
                               Workspace<typename AccOf<scalar_t>::type> ws) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t total = g.N * g.H * g.W;
  const acc_t* inv_own = which == Grad::B ? ws.inv_b : ws.inv_a;
  const acc_t* pass_own = which == Grad::B ? ws.pass_b : ws.pass_a;
  const acc_t* inv_other = which == Grad::A ? ws.inv_b : ws.inv_a;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W, y = (idx / g.W) % g.H, n = idx / (g.W * g.H);
    const scalar_t* g_img = grad_out + image_offset(sg, n);
    const scalar_t* o_img = out + image_offset(so, n);
    acc_t csum = 0;
    for (int64_t k = 0; k < g.KK; ++k) {
      const int64_t yq = y + offset_dy(k, g.K, g.dilation), xq = x + offset_dx(k, g.K, g.dilation);
      acc_t w = 0;
      if (in_image(yq, xq, g.H, g.W)) {
        // GRAD_B reads the output at q whose mirrored offset points back at p.
        const int64_t kg = which == Grad::B ? mirror_offset(k, g.K) : k;
        const int64_t yg = which == Grad::B ? yq : y, xg = which == Grad::B ? xq : x;
        acc_t gv = to_acc(g_img[kg * sg.c + yg * sg.y + xg * sg.x]);
        const acc_t ov = to_acc(o_img[kg * so.c + yg * so.y + xg * so.x]);
        if (which == Grad::Self)
          gv += to_acc(g_img[mirror_offset(k, g.K) * sg.c + yq * sg.y + xq * sg.x]);
        const int64_t q = (n * g.H + yq) * g.W + xq;
        w = normalize ? gv * inv_other[q] : gv;
        csum += gv * ov;
      }
      ws.weights[(n * g.KK + k) * g.H * g.W + y * g.W + x] = w;
    }
    if (normalize) {
      const acc_t inv = inv_own[idx];
      ws.scale[idx] = inv;
      ws.shift[idx] = pass_own[idx] * inv * inv * csum;
    } else {
      ws.scale[idx] = 1;
      ws.shift[idx] = 0;
    }
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
        v -= shift * to_acc(y_img[c * sy.c + y * sy.y + x * sy.x]);
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

// ------------------------------------------------------------------ launchers

dim3 tile_grid(const Geometry& g) {
  const int64_t tiles = (g.W + TILE_W - 1) / TILE_W * ((g.H + TILE_H - 1) / TILE_H);
  return dim3(unsigned(tiles), 1, unsigned(std::min<int64_t>(g.N, max_grid_z())));
}

unsigned flat_blocks(int64_t total) {
  return unsigned(std::min<int64_t>((total + 255) / 256, max_flat_blocks()));
}

// Runs launch(G, k_begin, k_count) over the offsets [first, first + count) in
// groups no larger than the biggest bucket, each with the smallest bucket.
template <typename Launch>
cudaError_t for_offset_groups(int64_t first, int64_t count, Launch&& launch) {
  for (int64_t k0 = first; k0 < first + count; k0 += 81) {
    const int k_count = int(std::min<int64_t>(81, first + count - k0));
    const int bucket = k_count <= 1 ? 1 : k_count <= 9 ? 9 : k_count <= 25 ? 25
                                                         : k_count <= 49 ? 49 : 81;
    const cudaError_t err = launch(bucket, int(k0), k_count);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define STCCL_WITH_BUCKET(bucket, ...)                      \
  switch (bucket) {                                         \
    case 1: { constexpr int G = 1; return __VA_ARGS__; }    \
    case 9: { constexpr int G = 9; return __VA_ARGS__; }    \
    case 25: { constexpr int G = 25; return __VA_ARGS__; }  \
    case 49: { constexpr int G = 49; return __VA_ARGS__; }  \
    default: { constexpr int G = 81; return __VA_ARGS__; }  \
  }

template <typename scalar_t>
cudaError_t forward(const Problem& p, const void* a_, Strides4 sa, const void* b_, Strides4 sb,
                    bool self, void* out_, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p);
  const auto* a = static_cast<const scalar_t*>(a_);
  const auto* b = static_cast<const scalar_t*>(b_);
  auto* out = static_cast<scalar_t*>(out_);
  const acc_t eps = acc_t(p.eps);
  const int64_t count = self ? g.KK / 2 + 1 : g.KK;
  const int64_t chunk = sector_aligned(staged_chunk(g, sizeof(acc_t), self),
                                       stages_along_channels(sa) || stages_along_channels(sb),
                                       sizeof(scalar_t));
  cudaError_t err = cudaSuccess;
  if (chunk > 0) {
    const int64_t TB = int64_t(g.THB) * g.TWB;
    const size_t smem = size_t((TB + TILE_H * TILE_W + chunk * (g.BS + (self ? 0 : g.AS))) *
                               sizeof(acc_t) + 81 * sizeof(int));
    err = for_offset_groups(0, count, [&](int bucket, int k0, int kc) {
      STCCL_WITH_BUCKET(bucket, launch_kernel(forward_staged_kernel<scalar_t, G>, "forward_staged",
                                              tile_grid(g), THREADS, smem, stream, a, sa, b, sb,
                                              out, g, int(chunk), k0, kc, self, p.normalize, eps));
    });
  } else {
    for (int64_t k0 = 0; k0 < count && err == cudaSuccess; k0 += UNSTAGED_GROUP) {
      const int kc = int(std::min<int64_t>(UNSTAGED_GROUP, count - k0));
      err = launch_kernel(forward_unstaged_kernel<scalar_t>, "forward_unstaged", tile_grid(g),
                          THREADS, 0, stream, a, sa, b, sb, out, g, int(k0), kc, p.normalize,
                          eps);
    }
  }
  if (err != cudaSuccess || !self || g.KK == 1) return err;
  return launch_kernel(mirror_kernel<scalar_t>, "mirror",
                       flat_blocks(g.N * (g.KK / 2) * g.H * g.W), 256, 0, stream, out, g);
}

template <typename scalar_t>
cudaError_t backward_norms(const Problem& p, const void* a_, Strides4 sa, const void* b_,
                           Strides4 sb, bool self, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p);
  Workspace<acc_t> ws(workspace, g);
  const unsigned blocks = flat_blocks(g.N * g.H * g.W);
  cudaError_t err = launch_kernel(inverse_norms_kernel<scalar_t>, "inverse_norms", blocks, 256, 0,
                                  stream, static_cast<const scalar_t*>(a_), sa, g, acc_t(p.eps),
                                  ws.inv_a, ws.pass_a);
  if (err != cudaSuccess || self) return err;
  return launch_kernel(inverse_norms_kernel<scalar_t>, "inverse_norms", blocks, 256, 0, stream,
                       static_cast<const scalar_t*>(b_), sb, g, acc_t(p.eps), ws.inv_b,
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
                                  static_cast<const scalar_t*>(out), so, g, which, p.normalize, ws);
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

template <template <typename> class Fn, typename... Args>
cudaError_t dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::Float16: return Fn<__half>::run(args...);
    case DType::BFloat16: return Fn<__nv_bfloat16>::run(args...);
    case DType::Float32: return Fn<float>::run(args...);
    default: return Fn<double>::run(args...);
  }
}

template <typename T> struct Forward { template <typename... A> static cudaError_t run(A&&... a) { return forward<T>(a...); } };
template <typename T> struct Norms { template <typename... A> static cudaError_t run(A&&... a) { return backward_norms<T>(a...); } };
template <typename T> struct Backward { template <typename... A> static cudaError_t run(A&&... a) { return backward<T>(a...); } };

}  // namespace

cudaError_t launch_forward(const Problem& p, const void* a, Strides4 sa, const void* b,
                           Strides4 sb, bool self, void* out, cudaStream_t stream) {
  return dispatch<Forward>(p.dtype, p, a, sa, b, sb, self, out, stream);
}

int64_t backward_workspace_bytes(const Problem& p) {
  const Geometry g(p);
  const int64_t size = p.dtype == DType::Float64 ? 8 : 4;
  const bool half = p.dtype == DType::Float16 || p.dtype == DType::BFloat16;
  return Workspace<float>::elements(g, half && gather_launches(g, size) > 1) * size;
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
