// The CUDA kernels, compiled as host C++ under the emulator: the very source
// nvcc builds, included, not copied. A new .cu file of csrc/cuda/ gets one
// line here.
#include "../local_correlation.cu"
