// The Python module stccl_ops._C_cuda_emulated: importing it registers the
// ops of csrc/ops.h in the namespace stccl_ops_cuda_emulated, with the CUDA
// entry points and kernels running on CPU tensors under the emulator. Its
// functions set the emulator's grid caps and read the memory accounting.
#include <torch/extension.h>

#include "emulator.h"
#include "memory_traffic.h"

namespace {

py::dict info() {
  py::dict d;
#if defined(__SANITIZE_THREAD__)
  d["scheduler"] = "os_threads";
#else
  d["scheduler"] = "fibers";
#endif
#if defined(__SANITIZE_ADDRESS__)
  d["address_sanitizer"] = true;
#else
  d["address_sanitizer"] = false;
#endif
  d["counts_memory_traffic"] = stccl::emu::memory_traffic::enabled;
  return d;
}

py::dict counts(const stccl::emu::memory_traffic::Counts& c) {
  py::dict d;
  d["requests"] = c.requests;
  d["sectors"] = c.sectors;
  d["ideal"] = c.ideal;
  d["bytes"] = c.bytes;
  return d;
}

py::list memory_traffic() {
  py::list out;
  for (const auto& launch : stccl::emu::memory_traffic::take()) {
    py::dict d;
    d["kernel"] = launch.kernel;
    d["load"] = counts(launch.load);
    d["store"] = counts(launch.store);
    d["shared_load"] = counts(launch.shared_load);
    d["shared_store"] = counts(launch.shared_store);
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "the CUDA kernels of stccl_ops run on the CPU; ops in torch.ops.stccl_ops_cuda_emulated";
  m.def("info", &info, "How this emulated build runs the kernels.");
  m.def(
      "set_grid_limits",
      [](unsigned flat_x, unsigned z) {
        TORCH_CHECK(flat_x >= 1 && flat_x <= 65535u * 8 && z >= 1 && z <= 65535,
                    "set_grid_limits: flat_x must be in [1, 524280] and z in [1, 65535]");
        stccl::emu::grid_limits() = {flat_x, z};
      },
      py::arg("flat_x") = 65535u * 8, py::arg("z") = 65535,
      "Caps the grids the launchers size (smaller caps make the kernels loop).");
  m.def("memory_traffic", &memory_traffic,
        "Per launch since the last call: global and shared requests, sectors or wavefronts, "
        "their ideal and the bytes asked for (counting build only; else empty).");
}
