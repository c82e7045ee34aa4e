// The passes with 32-byte vectors: the AVX2+FMA build and the portable one.
#define STCCL_VECTOR_BYTES 32
#include "vector_passes.h"
