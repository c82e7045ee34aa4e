// SIMD vectors of the accumulation type, cache-line-aligned scratch buffers
// and non-temporal stores: the primitives every CPU kernel is built from. The
// kernels are written once as templates and compiled three times, picked at
// run time (see isa.h): with 32-byte vectors as an AVX2+FMA build and a
// portable one (passes_256.cpp), and with 64-byte vectors as an AVX-512 build
// (passes_512.cpp, x86-64 only).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "isa.h"

// The vector width of this translation unit's kernels. Every kernel header
// puts its code in an inline namespace named after it, so the two widths'
// instances of the same templates are different functions.
#ifndef STCCL_VECTOR_BYTES
#define STCCL_VECTOR_BYTES 32
#endif
#if STCCL_VECTOR_BYTES == 64
#define STCCL_VECTOR_NAMESPACE vec512
// What a function of the native build is compiled for; "v": any of the 32
// vector registers (the asm constraint of correlate_rows_block).
#define STCCL_VECTOR_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#define STCCL_VECTOR_REGISTER "+v"
#elif STCCL_VECTOR_BYTES == 32
#define STCCL_VECTOR_NAMESPACE vec256
#define STCCL_VECTOR_TARGET "avx2,fma,f16c"
#define STCCL_VECTOR_REGISTER "+x"
#else
#error "STCCL_VECTOR_BYTES must be 32 or 64"
#endif

#define STCCL_ALWAYS_INLINE inline __attribute__((always_inline))
// For lambdas in the kernels: a lambda does not take the target of the
// function it sits in, so only inlined does its code get the vector ISA.
#define STCCL_LAMBDA_INLINE __attribute__((always_inline))
// A function of the native build (AVX2+FMA or AVX-512) that is not inlined
// (see NativeBlocks); nothing instantiates one where the target does not exist.
#if defined(__x86_64__) || defined(__i386__)
#define STCCL_NATIVE_FUNCTION __attribute__((target(STCCL_VECTOR_TARGET), noinline))
#else
#define STCCL_NATIVE_FUNCTION __attribute__((noinline))
#endif

namespace stccl::cpu {
inline namespace STCCL_VECTOR_NAMESPACE {

// Whether this width's native build (the STCCL_VECTOR_TARGET code) runs on
// this processor: always with 64-byte vectors (their passes are called only
// where it does, see correlation_ops.cpp), with 32-byte ones where it has
// AVX2 and FMA.
inline bool native_build_runs() {
#if defined(__x86_64__) || defined(__i386__)
  return STCCL_VECTOR_BYTES == 64 || active_isa() != Isa::Generic;
#else
  return false;
#endif
}

// Copies `bytes` from src to dst with non-temporal stores for the 16-byte
// aligned part of dst: outputs and gradients are written once and not read
// back by the pass, so they go to memory without first reading each line into
// the cache (half the memory traffic of plain stores, for results that are
// fresh allocations). SSE2 is part of x86-64, so both builds take this path.
// The stores are weakly ordered: stream_fence must run before another thread
// may read the data.
STCCL_ALWAYS_INLINE void stream_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__x86_64__)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(d, s, bytes);
#endif
}

// The vector v (a whole number of 16 bytes) to p, 16-byte aligned, with
// non-temporal stores (see stream_copy).
template <typename Vec>
STCCL_ALWAYS_INLINE void stream_store(void* p, const Vec& v) {
  static_assert(sizeof(Vec) % 16 == 0);
#if defined(__x86_64__)
  for (int64_t part = 0; part < int64_t(sizeof(v)); part += 16) {
    __m128i h;
    __builtin_memcpy(&h, reinterpret_cast<const char*>(&v) + part, sizeof(h));
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + part), h);
  }
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// float16 <-> float32 with the F16C instructions, exact as c10's conversions
// (float16 -> float32 is exact; the other way rounds to nearest even) but a
// vector at a time instead of bit manipulation per element. Functions of
// their own with the F16C target, called from either build where the
// processor has it: every x86-64 with AVX2 does.
#if defined(__x86_64__)
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return yes;
}

__attribute__((target("avx,f16c"), noinline)) inline void f16c_to_float(const c10::Half* s,
                                                                       float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = _cvtsh_ss(s[i].x);
}

// d = (a * b) * c in float16; b and c may be null (then d = a). STREAM: the
// 16-byte aligned part of d with non-temporal stores (see stream_copy).
template <bool STREAM = false>
__attribute__((target("avx,f16c"), noinline)) inline void f16c_from_product(
    const float* a, const float* b, const float* c, c10::Half* d, int64_t n) {
  int64_t i = 0;
  if constexpr (STREAM)
    for (; i < n && reinterpret_cast<uintptr_t>(d + i) % 16 != 0; ++i)
      d[i].x = _cvtss_sh(b != nullptr ? a[i] * b[i] * c[i] : a[i], _MM_FROUND_TO_NEAREST_INT);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(a + i);
    if (b != nullptr) v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_loadu_ps(b + i)),
                                        _mm256_loadu_ps(c + i));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    if constexpr (STREAM)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), h);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  for (; i < n; ++i)
    d[i].x = _cvtss_sh(b != nullptr ? a[i] * b[i] * c[i] : a[i], _MM_FROUND_TO_NEAREST_INT);
}

// d = a in bfloat16 rounded as c10 rounds (to nearest even; any NaN to
// 0x7fc0), the 16-byte aligned part of d with non-temporal stores, a whole
// vector of this build at a time (the AVX-512 build took 8 values a step
// before: about a tenth of the S1 bfloat16 backward's time).
STCCL_ALWAYS_INLINE void bfloat16_stream(const float* a, c10::BFloat16* d, int64_t n) {
  constexpr int64_t V = STCCL_VECTOR_BYTES / 4;
  typedef uint32_t words __attribute__((vector_size(STCCL_VECTOR_BYTES)));
  typedef uint16_t halves __attribute__((vector_size(STCCL_VECTOR_BYTES / 2)));
  typedef float floats __attribute__((vector_size(STCCL_VECTOR_BYTES)));
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(d + i) % 16 != 0; ++i) d[i] = c10::BFloat16(a[i]);
  for (; i + V <= n; i += V) {
    floats f;
    __builtin_memcpy(&f, a + i, sizeof(f));
    words u;
    __builtin_memcpy(&u, &f, sizeof(u));
    const words nan = (words)(f != f);
    const words rounded = (u + ((u >> 16) & 1) + 0x7fff) >> 16;
    stream_store(d + i, __builtin_convertvector((rounded & ~nan) | (nan & 0x7fc0), halves));
  }
  for (; i < n; ++i) d[i] = c10::BFloat16(a[i]);
}
#endif

// d = s rounded to the half type scalar_t and streamed in one pass, where
// this build can (x86-64; float16 needs F16C): no buffer written and read
// back before stream_copy. False where it cannot.
template <typename scalar_t>
STCCL_ALWAYS_INLINE bool stream_rounded(const float* s, scalar_t* d, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bfloat16_stream(s, d, n);
    return true;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (has_f16c()) {
      f16c_from_product<true>(s, nullptr, nullptr, d, n);
      return true;
    }
  }
#endif
  return false;
}

// d[i] = s[i] converted, for a contiguous row (float16 by F16C either way).
template <typename S, typename D>
STCCL_ALWAYS_INLINE void convert_row(const S* s, D* d, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(d, s, n * sizeof(S));
    return;
  }
#if defined(__x86_64__)
  if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<D, float>) {
    if (has_f16c()) return f16c_to_float(s, d, n);
  } else if constexpr (std::is_same_v<S, float> && std::is_same_v<D, c10::Half>) {
    if (has_f16c()) return f16c_from_product(s, nullptr, nullptr, d, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<D>(s[i]);
}

// d[i] = (a[i] * b[i]) * c[i] rounded to scalar_t.
template <typename scalar_t, typename acc_t>
STCCL_ALWAYS_INLINE void round_product_row(const acc_t* a, const acc_t* b, const acc_t* c,
                                           scalar_t* d, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (has_f16c()) return f16c_from_product(a, b, c, d, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(a[i] * b[i] * c[i]);
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Allocates cache-line-aligned storage for the scratch buffers, whose
// channel strides are whole lines: the inner loops' vector loads then split a
// line only where an offset makes them. From malloc (16-byte aligned, or page
// + 16 for large buffers) half the loads of a and of the sums split one.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(STCCL_VECTOR_BYTES)));
  static constexpr int64_t lanes = STCCL_VECTOR_BYTES / sizeof(float);
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(STCCL_VECTOR_BYTES)));
  static constexpr int64_t lanes = STCCL_VECTOR_BYTES / sizeof(double);
};

template <typename acc_t>
STCCL_ALWAYS_INLINE typename Simd<acc_t>::vec load(const acc_t* p) {
  typename Simd<acc_t>::vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
STCCL_ALWAYS_INLINE void store(acc_t* p, typename Simd<acc_t>::vec v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

#if defined(__x86_64__)
// V floats from as many float16 or bfloat16 values at p (HALF_LOADS: where
// this exists), for the native builds only: F16C's vcvtph2ps, and bfloat16
// zero-extended (one vpmovzxwd from memory, where GCC splits the generic
// conversion into four instructions on half vectors) and shifted. In asm so
// that templates without the native target can hold them (an intrinsic
// there is a target mismatch even where it only ever runs inlined into a
// native function).
template <bool FLOAT16>
STCCL_ALWAYS_INLINE Simd<float>::vec load_halves(const void* p) {
  struct Halves {
    char bytes[STCCL_VECTOR_BYTES / 2];
  };
  const Halves& halves = *static_cast<const Halves*>(p);
  Simd<float>::vec v;
  if constexpr (FLOAT16)
    asm("vcvtph2ps %1, %0" : "=v"(v) : "m"(halves));
  else
    asm("vpmovzxwd %1, %0\n\tvpslld $16, %0, %0" : "=v"(v) : "m"(halves));
  return v;
}
STCCL_ALWAYS_INLINE Simd<float>::vec load(const c10::Half* p) { return load_halves<true>(p); }
STCCL_ALWAYS_INLINE Simd<float>::vec load(const c10::BFloat16* p) {
  return load_halves<false>(p);
}
constexpr bool HALF_LOADS = true;
#else
constexpr bool HALF_LOADS = false;
#endif

}  // namespace STCCL_VECTOR_NAMESPACE
}  // namespace stccl::cpu
