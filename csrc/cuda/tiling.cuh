// What the CUDA kernels share: the tiling, the staging of tiles into shared
// memory, the sizing of chunks and offset groups, and the launch helpers. No
// torch headers: the launchers take raw pointers, sizes and strides
// (launch.h); correlation_ops.cpp binds them. Included by forward.cu and
// backward.cu (both, into one file, by the emulator: emulation/kernels.cpp).
//
// A block owns a TILE_H x TILE_W tile of pixels of one image and walks the
// channels in chunks, staging tiles in shared memory (read from global memory
// once, converted to the accumulation type). Every launch goes through
// launch_kernel (device.h): the same source runs on the CPU under the emulator
// (emulation/emulator.h) as the cuda_emulated backend.
#pragma once

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
  // stage_pad: a halo larger than the window's reach (the clip kernels stage
  // one halo for the spatial and the temporal window).
  explicit Geometry(const Problem& p, int64_t stage_pad = 0)
      : N(p.N), C(p.C), H(p.H), W(p.W), K(p.window.kernel_size), KK(p.window.offsets()),
        dilation(p.window.dilation), pad(std::max(p.window.pad(), stage_pad)),
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

// The clip kernels' second window (Geometry holds the spatial one): frame t
// of the clip against frame t + S, T frames a clip.
struct ClipWindow {
  int64_t T, S, K, KK, dilation;
};
inline ClipWindow clip_window(const Window& temporal, int64_t T, int64_t S) {
  return {T, S, temporal.kernel_size, temporal.offsets(), temporal.dilation};
}

// The clip kernels' per-offset tables in shared memory, at most 81 offsets
// per launch: an output position and four ints.
constexpr int64_t CLIP_TABLE_BYTES = 81 * (8 + 4 * 4);

// Channels per chunk when `tiles` tiles with the halo are staged per channel
// (the clip kernels: 2 in the forward, 3 in the gather) next to `sq_tiles`
// halo-sized sums of squares; 0 when one channel does not fit.
int64_t clip_chunk(const Geometry& g, int64_t acc_size, int tiles, int sq_tiles) {
  const int64_t fixed = int64_t(sq_tiles) * g.THB * g.TWB * acc_size + CLIP_TABLE_BYTES;
  const int64_t per_channel = int64_t(tiles) * g.BS * acc_size;
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

// Blocks per SM the register budget must allow: three for the small windows
// of 4-byte-accumulating types (at most 85 registers a thread; K = 3, the
// STCCL window, is memory-bound and wants the warps to hide latency), one
// otherwise (the accumulators of larger groups need the registers).
template <typename scalar_t, int G>
constexpr int min_blocks() {
  return G <= 9 && sizeof(typename AccOf<scalar_t>::type) == 4 ? 3 : 1;
}

dim3 tile_grid(const Geometry& g) {
  const int64_t tiles = (g.W + TILE_W - 1) / TILE_W * ((g.H + TILE_H - 1) / TILE_H);
  return dim3(unsigned(tiles), 1, unsigned(std::min<int64_t>(g.N, max_grid_z())));
}

unsigned flat_blocks(int64_t total) {
  return unsigned(std::min<int64_t>((total + 255) / 256, max_flat_blocks()));
}

// Runs launch(G, k_begin, k_count) over the offsets [first, first + count) in
// groups no larger than `largest` (a bucket), each with the smallest bucket.
template <typename Launch>
cudaError_t for_offset_groups(int64_t first, int64_t count, Launch&& launch,
                              int64_t largest = 81) {
  for (int64_t k0 = first; k0 < first + count; k0 += largest) {
    const int k_count = int(std::min<int64_t>(largest, first + count - k0));
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

template <template <typename> class Fn, typename... Args>
cudaError_t dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::Float16: return Fn<__half>::run(args...);
    case DType::BFloat16: return Fn<__nv_bfloat16>::run(args...);
    case DType::Float32: return Fn<float>::run(args...);
    default: return Fn<double>::run(args...);
  }
}

}  // namespace
}  // namespace stccl::cuda
