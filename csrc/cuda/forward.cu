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

template <typename T> struct Forward { template <typename... A> static cudaError_t run(A&&... a) { return forward<T>(a...); } };

}  // namespace

cudaError_t launch_forward(const Problem& p, const void* a, Strides4 sa, const void* b,
                           Strides4 sb, bool self, void* out, cudaStream_t stream) {
  return dispatch<Forward>(p.dtype, p, a, sa, b, sb, self, out, stream);
}

}  // namespace stccl::cuda
