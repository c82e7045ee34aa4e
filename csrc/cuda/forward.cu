// CUDA forward kernels of the local and self-correlation.
//
// A block computes a tile of output pixels of one image. It stages the a tile
// and the b tile with its halo, chunk by chunk, together with the per-pixel
// sums of squares, so the inverse norms are computed once per pixel, never per
// neighbour. Each thread keeps the dot products of its pixel for up to G
// offsets in registers; G is a compile-time bucket (1, 9, 25, 49, 81), a
// window with more offsets runs in groups. Halos too large for shared memory
// take an unstaged kernel that reads neighbours through the cache. A
// self-correlation computes the offsets up to the centre and mirrors the rest.
#include "tiling.cuh"

namespace stccl::cuda {
namespace {

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

template <typename scalar_t>
cudaError_t forward(const Problem& p, const void* a_, Strides4 sa, const void* b_, Strides4 sb,
                    bool self, void* out_, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p);
  const auto* a = static_cast<const scalar_t*>(a_);
  const auto* b = static_cast<const scalar_t*>(b_);
  auto* out = static_cast<scalar_t*>(out_);
  const acc_t eps = acc_t(p.window.eps);
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
                                              out, g, int(chunk), k0, kc, self, p.window.normalize, eps));
    });
  } else {
    for (int64_t k0 = 0; k0 < count && err == cudaSuccess; k0 += UNSTAGED_GROUP) {
      const int kc = int(std::min<int64_t>(UNSTAGED_GROUP, count - k0));
      err = launch_kernel(forward_unstaged_kernel<scalar_t>, "forward_unstaged", tile_grid(g),
                          THREADS, 0, stream, a, sa, b, sb, out, g, int(k0), kc, p.window.normalize,
                          eps);
    }
  }
  if (err != cudaSuccess || !self || g.KK == 1) return err;
  return launch_kernel(mirror_kernel<scalar_t>, "mirror",
                       flat_blocks(g.N * (g.KK / 2) * g.H * g.W), 256, 0, stream, out, g);
}

// Both volumes of frame n of a clip (the frames are the images of g): the
// spatial offsets up to the centre against the frame itself, then the
// temporal offsets against frame n + S, numbered one after the other
// (j < spatial_offsets: spatial). Per chunk the frame's tile with its halo
// (which holds its `a` pixels too) and, when the group has temporal offsets
// and the frame a successor, the successor's tile are staged once; each
// thread keeps the sums of its pixel for the group's offsets of both windows
// in registers.
template <typename scalar_t, int G>
__device__ __forceinline__ void spatiotemporal_tile(
    const scalar_t* __restrict__ v, Strides4 sv, scalar_t* __restrict__ spatial,
    scalar_t* __restrict__ temporal, const Geometry& g, const ClipWindow& tw, int chunk,
    int j_begin, int j_count, int spatial_offsets, bool normalize,
    typename AccOf<scalar_t>::type eps, int64_t n, unsigned char* smem) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int TB = g.THB * g.TWB;
  acc_t* own_sq = reinterpret_cast<acc_t*>(smem);  // [TB]
  acc_t* next_sq = own_sq + TB;                      // [TB]
  acc_t* tiles = next_sq + TB;                       // [2][chunk][BS]: frames n, n + S
  // Per offset of the group (the epilogue reads them here, not from
  // registers, which hold the sums): where its output goes, where its
  // neighbour lies in the tiles, its (dy, dx), and the sums of squares it
  // divides by (own_sq or next_sq, at the same place as in the tiles).
  int64_t* out_at = reinterpret_cast<int64_t*>(tiles + 2 * int64_t(chunk) * g.BS);  // [G]
  int* offsets = reinterpret_cast<int*>(out_at + G);  // [G]
  int* dys = offsets + G;                              // [G]
  int* dxs = dys + G;                                  // [G]
  int* in_next = dxs + G;                              // [G]

  const int64_t t = n % tw.T, pair = n / tw.T * (tw.T - tw.S) + t, hw = g.H * g.W;
  const bool has_next = t + tw.S < tw.T;
  // The group's offsets this frame has: the temporal ones only with a successor.
  const int active = has_next ? j_count : int(std::clamp<int64_t>(spatial_offsets - j_begin, 0,
                                                                  j_count));
  if (active == 0) return;  // uniform across the block: no barrier is skipped by part of it
  const bool stage_next = has_next && j_begin + j_count > spatial_offsets;
  const int tid = threadIdx.x, tx = tid % TILE_W, ty = tid / TILE_W;
  const auto [x0, y0] = tile_origin(g);
  const int64_t x = x0 + tx, y = y0 + ty;
  const int64_t next_section = int64_t(chunk) * g.BS;
  for (int i = tid; i < TB; i += THREADS) own_sq[i] = next_sq[i] = 0;
  for (int i = tid; i < active; i += THREADS) {
    const int64_t j = j_begin + i;
    const bool is_spatial = j < spatial_offsets;
    const int64_t k = is_spatial ? j : j - spatial_offsets, K = is_spatial ? g.K : tw.K;
    const int64_t d = is_spatial ? g.dilation : tw.dilation;
    dys[i] = int(offset_dy(k, K, d));
    dxs[i] = int(offset_dx(k, K, d));
    in_next[i] = !is_spatial;
    offsets[i] = int((is_spatial ? 0 : next_section) + (g.pad + dys[i]) * g.TWB + g.pad + dxs[i]);
    out_at[i] = (is_spatial ? n * g.KK + k : pair * tw.KK + k) * hw;
  }
  acc_t acc[G];
#pragma unroll
  for (int i = 0; i < G; ++i) acc[i] = 0;

  const scalar_t* own_img = v + image_offset(sv, n);
  const scalar_t* next_img = v + image_offset(sv, has_next ? n + tw.S : n);
  for (int64_t c0 = 0; c0 < g.C; c0 += chunk) {
    const int count = int(min(int64_t(chunk), g.C - c0));
    __syncthreads();  // the previous chunk is consumed
    stage_tile(own_img, sv, g, y0 - g.pad, x0 - g.pad, g.THB, g.TWB, c0, count, tiles, g.BS,
               own_sq);
    if (stage_next)
      stage_tile(next_img, sv, g, y0 - g.pad, x0 - g.pad, g.THB, g.TWB, c0, count,
                 tiles + next_section, g.BS, next_sq);
    __syncthreads();
    const acc_t* a_col = tiles + (ty + g.pad) * g.TWB + tx + g.pad;
    const acc_t* b_col = tiles + ty * g.TWB + tx;
    for (int cc = 0; cc < count; ++cc) {
      const acc_t va = a_col[cc * g.BS];
#pragma unroll
      for (int i = 0; i < G; ++i)
        if (i < active) acc[i] += va * b_col[cc * g.BS + offsets[i]];
    }
  }
  __syncthreads();
  if (y >= g.H || x >= g.W) return;
  const acc_t inv_a =
      normalize ? inverse_norm(own_sq[(ty + g.pad) * g.TWB + tx + g.pad], eps) : acc_t(1);
  const int64_t p = y * g.W + x;
#pragma unroll
  for (int i = 0; i < G; ++i) {
    if (i >= active) break;
    acc_t value = 0;
    if (in_image(y + dys[i], x + dxs[i], g.H, g.W)) {
      const acc_t* sq = in_next[i] ? next_sq : own_sq;
      const int64_t at = ty * g.TWB + tx + offsets[i] - (in_next[i] ? next_section : 0);
      value = acc[i] * inv_a * (normalize ? inverse_norm(sq[at], eps) : acc_t(1));
    }
    (in_next[i] ? temporal : spatial)[out_at[i] + p] = from_acc<scalar_t>(value);
  }
}

// Frames beyond the grid's z extent (65535) are looped over.
template <typename scalar_t, int G>
__global__ void __launch_bounds__(THREADS, (min_blocks<scalar_t, G>()))
    spatiotemporal_kernel(const scalar_t* __restrict__ v, Strides4 sv,
                          scalar_t* __restrict__ spatial, scalar_t* __restrict__ temporal,
                          Geometry g, ClipWindow tw, int chunk, int j_begin, int j_count,
                          int spatial_offsets, bool normalize,
                          typename AccOf<scalar_t>::type eps) {
  unsigned char* smem = dynamic_shared_memory();
  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
    __syncthreads();  // the previous frame's epilogue has read shared memory
    spatiotemporal_tile<scalar_t, G>(v, sv, spatial, temporal, g, tw, chunk, j_begin, j_count,
                                     spatial_offsets, normalize, eps, n, smem);
  }
}

template <typename scalar_t>
cudaError_t spatiotemporal_forward(const Problem& p, const Window& temporal_window, int64_t T,
                                   int64_t S, const void* v_, Strides4 sv, void* spatial_,
                                   void* temporal_, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Geometry g(p, temporal_window.pad());
  const ClipWindow tw = clip_window(temporal_window, T, S);
  const auto* v = static_cast<const scalar_t*>(v_);
  auto* spatial = static_cast<scalar_t*>(spatial_);
  auto* temporal = static_cast<scalar_t*>(temporal_);
  const int64_t spatial_offsets = g.KK / 2 + 1;
  const int64_t chunk = sector_aligned(clip_chunk(g, sizeof(acc_t), 2, 2),
                                       stages_along_channels(sv), sizeof(scalar_t));
  const size_t smem =
      size_t((2 * int64_t(g.THB) * g.TWB + 2 * chunk * g.BS) * sizeof(acc_t) + CLIP_TABLE_BYTES);
  const acc_t eps = acc_t(p.window.eps);
  cudaError_t err = for_offset_groups(0, spatial_offsets + tw.KK, [&](int bucket, int j0, int jc) {
    STCCL_WITH_BUCKET(bucket, launch_kernel(spatiotemporal_kernel<scalar_t, G>, "spatiotemporal",
                                            tile_grid(g), THREADS, smem, stream, v, sv, spatial,
                                            temporal, g, tw, int(chunk), j0, jc,
                                            int(spatial_offsets), p.window.normalize, eps));
  });
  if (err != cudaSuccess || g.KK == 1) return err;
  return launch_kernel(mirror_kernel<scalar_t>, "mirror",
                       flat_blocks(g.N * (g.KK / 2) * g.H * g.W), 256, 0, stream, spatial, g);
}

template <typename T> struct Forward { template <typename... A> static cudaError_t run(A&&... a) { return forward<T>(a...); } };
template <typename T> struct SpatiotemporalForward { template <typename... A> static cudaError_t run(A&&... a) { return spatiotemporal_forward<T>(a...); } };

}  // namespace

bool clip_kernels_fit(const Problem& p, const Window& temporal) {
  const Geometry g(p, temporal.pad());
  const int64_t acc_size = p.dtype == DType::Float64 ? 8 : 4;
  return clip_chunk(g, acc_size, 2, 2) > 0 && clip_chunk(g, acc_size, 3, 0) > 0;
}

cudaError_t launch_spatiotemporal_forward(const Problem& p, const Window& temporal, int64_t T,
                                          int64_t S, const void* v, Strides4 sv, void* spatial,
                                          void* temporal_out, cudaStream_t stream) {
  return dispatch<SpatiotemporalForward>(p.dtype, p, temporal, T, S, v, sv, spatial,
                                         temporal_out, stream);
}

cudaError_t launch_forward(const Problem& p, const void* a, Strides4 sa, const void* b,
                           Strides4 sb, bool self, void* out, cudaStream_t stream) {
  return dispatch<Forward>(p.dtype, p, a, sa, b, sb, self, out, stream);
}

}  // namespace stccl::cuda
