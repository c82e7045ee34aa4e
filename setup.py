"""Builds stccl_ops._C (C++ CPU kernels, and CUDA kernels where a toolkit is found).

Install with `pip install --no-build-isolation .` (or `-e .`): the extension
links against the torch that will import it, so it must be built against the
torch already installed, not a fresh copy in an isolated build environment.

Environment:
  STCCL_FORCE_CUDA=1   build the CUDA kernels, fail if no toolkit is found
  STCCL_NO_CUDA=1      never build the CUDA kernels
  STCCL_CUDA_EMULATION=1  also build stccl_ops._C_cuda_emulated: the CUDA kernels
                       compiled as host code under the emulator (the
                       cuda_emulated backend, for CPU tensors; needs the CUDA
                       toolkit's headers, not a GPU)
  CUDA_HOME            the CUDA toolkit root (else found from `nvcc --dryrun`)
  TORCH_CUDA_ARCH_LIST the GPU architectures (default "8.0;9.0+PTX": A100,
                       H100 machine code, PTX that newer GPUs compile at load)
  MAX_JOBS             parallel compile jobs (ninja)
"""

import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME, else the TOP= that nvcc reports.

    nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real
    one), in which case torch's guess (the parent of nvcc's folder) is wrong.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if match is None:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.path.realpath(match.group(1).strip())


def nvcc_version(cuda_home):
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def decide_cuda():
    """(build_cuda, cuda_home). Decided from the toolkit and torch.version.cuda,
    never from torch.cuda.is_available(): build machines often have no GPU."""
    if _env_flag("STCCL_NO_CUDA"):
        return False, None
    force = _env_flag("STCCL_FORCE_CUDA")
    cuda_home = find_cuda_home()
    import torch  # noqa: PLC0415  (torch is needed before the extension classes)

    if cuda_home is None or torch.version.cuda is None:
        if force:
            sys.exit(
                "stccl_ops: STCCL_FORCE_CUDA=1 but "
                + ("no CUDA toolkit was found (set CUDA_HOME)" if cuda_home is None
                   else f"torch {torch.__version__} is a CPU-only build")
            )
        return False, None
    version = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != torch_major:
        message = (
            f"stccl_ops: nvcc in {cuda_home} is CUDA {version[0] if version else '?'}.x but torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda}; the major versions "
            "must match. Point CUDA_HOME at a matching toolkit or set STCCL_NO_CUDA=1."
        )
        if force:
            sys.exit(message)
        print(message + " Building without CUDA.", file=sys.stderr)
        return False, None
    return True, cuda_home


def compiler_has_openmp():
    """Whether the C++ compiler builds and links an OpenMP program with -fopenmp."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run(
                [compiler, "-fopenmp", src, "-o", os.path.join(tmp, "probe")], capture_output=True
            )
        except OSError:
            return False
        return result.returncode == 0


# The emulated CUDA library: the schemas, autograd and CUDA entry points of
# stccl_ops._C in a namespace of their own, and the .cu kernels as host C++;
# its sources and flags are those of its sanitizer builds.
_EMULATION = runpy.run_path(os.path.join(ROOT, "stccl_ops", "_cuda_emulation.py"))


def emulated_extension(cuda_home):
    from torch.utils.cpp_extension import CppExtension

    if cuda_home is None:
        sys.exit("stccl_ops: STCCL_CUDA_EMULATION=1 needs the CUDA toolkit's headers (cuda_fp16.h, "
                 "cuda_bf16.h, cuda_runtime_api.h); none was found (set CUDA_HOME)")
    return CppExtension("stccl_ops._C_cuda_emulated", _EMULATION["SOURCES"],
                        include_dirs=[os.path.join(cuda_home, "include")],
                        extra_compile_args={"cxx": ["-O2", *_EMULATION["FLAGS"]]})


def extensions():
    build_cuda, cuda_home = decide_cuda()
    if build_cuda:
        # torch.utils.cpp_extension reads these when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    emulated = []
    if _env_flag("STCCL_CUDA_EMULATION"):
        emulated.append(emulated_extension(cuda_home or find_cuda_home()))
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    openmp = compiler_has_openmp()
    # -fno-math-errno: sqrt never sets errno, so the loops over inverse norms
    # vectorise (the square sums are never negative anyway).
    cxx = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi",
           f'-DSTCCL_TORCH_VERSION="{torch.__version__}"']
    link = []
    if openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        print("stccl_ops: the C++ compiler has no OpenMP; CPU kernels run single-threaded",
              file=sys.stderr)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not build_cuda:
        return [CppExtension("stccl_ops._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=link)] + emulated
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = ["-DSTCCL_WITH_CUDA", f'-DSTCCL_CUDA_VERSION="{torch.version.cuda}"',
               f'-DSTCCL_CUDA_ARCH_LIST="{arch_list}"']
    nvcc = ["-O3", "-Xptxas=-v,-warn-spills",
            "-lineinfo"] + defines
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return [CUDAExtension("stccl_ops._C", sources,
                          extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                          extra_link_args=link)] + emulated


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["stccl_ops", "stccl_ops.*"])
    + find_packages("python", include=["stccl", "stccl.*"]),
    package_dir={"stccl": "python/stccl"},
    package_data={"stccl_ops": ["py.typed"], "stccl": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
