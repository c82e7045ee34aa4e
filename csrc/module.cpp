// The Python module stccl_ops._C: importing it registers the ops of
// csrc/ops.h with their CPU (and CUDA) kernels; its functions say how it
// was built.
#include <torch/extension.h>

#include <string>

#include "cpu/isa.h"

namespace {

py::dict build_info() {
  py::dict info;
#ifdef STCCL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(STCCL_CUDA_VERSION);
  info["cuda_arch_list"] = std::string(STCCL_CUDA_ARCH_LIST);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_simd_paths"] = stccl::cpu::compiled_isas();
  info["cpu_simd_paths_runnable"] = stccl::cpu::runnable_isas();
  info["cpu_simd_path"] = stccl::cpu::isa_name(stccl::cpu::active_isa());
  info["torch_version"] = std::string(STCCL_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stccl_ops compiled kernels; the ops live in torch.ops.stccl_ops";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("_set_cpu_isa", &stccl::cpu::set_isa,
        "Force the CPU kernel path: 'auto', 'avx512', 'avx2' or 'generic' (for tests).");
  m.def("_set_cpu_layout", &stccl::cpu::set_layout,
        "Force the CPU kernels' band layout: 'auto', 'rows', 'flat', 'groups' (flat with the "
        "forward's row groups) or 'pixels' (for tests).");
  m.def("_cpu_isa_for_call",
        [](int64_t W, int64_t acc_bytes) {
          return stccl::cpu::isa_name(stccl::cpu::isa_for_call(W, acc_bytes));
        },
        "The CPU build that runs a call on images W wide, accumulating in acc_bytes.");
  m.def("_cpu_layout_is_flat",
        [](const std::string& pass, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
           int64_t element_bytes, int64_t threads) {
          using stccl::cpu::Pass;
          const std::pair<const char*, Pass> passes[] = {{"forward", Pass::Forward},
                                                        {"clip_forward", Pass::ClipForward},
                                                        {"backward", Pass::Backward},
                                                        {"clip_backward", Pass::ClipBackward}};
          for (const auto& [name, value] : passes)
            if (pass == name)
              return stccl::cpu::flat_pays(value, N, C, H, W, K, element_bytes, threads);
          TORCH_CHECK(false, "stccl_ops: unknown pass '", pass, "'");
        },
        "Whether the automatic rule lays out a pass over (N, C, H, W) images of elements of "
        "element_bytes with window K flat on `threads` threads ('forward', 'clip_forward', "
        "'backward' or 'clip_backward').");
  m.def("_cpu_row_groups_pay", &stccl::cpu::row_groups_pay,
        "Whether the automatic rule gives a flat forward over images W wide with window K and "
        "this dilation, `lanes` values a vector, row groups (AVX-512 builds).");
  m.def("_cpu_pixel_gather_pays", &stccl::cpu::pixel_gather_pays,
        "Whether the automatic rule gives the backward of C channels and window K the pixel gather.");
}
