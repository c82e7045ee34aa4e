// The passes with 64-byte vectors: the AVX-512 build (x86-64 only).
#if defined(__x86_64__)
#define STCCL_VECTOR_BYTES 64
#include "vector_passes.h"
#endif
