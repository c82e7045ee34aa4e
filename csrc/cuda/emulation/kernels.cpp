// The CUDA kernels, compiled as host C++ under the emulator: the very sources
// nvcc builds, included, not copied. A new .cu file of csrc/cuda/ gets one
// line here.
#include "../backward.cu"
#include "../forward.cu"
