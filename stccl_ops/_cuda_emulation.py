"""Builds of the emulated CUDA library beside the one `pip install` makes
(STCCL_CUDA_EMULATION=1), from a source checkout:

- ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer (what
  ``compute-sanitizer --tool memcheck`` finds on a GPU: out-of-bounds global
  and shared accesses, misaligned accesses, overflow in index math);
- ``tsan``: ThreadSanitizer, each CUDA thread an OS thread (what
  ``--tool racecheck`` finds: shared-memory races between barriers);
- ``plain``: the build `pip install` makes, rebuilt alone (about a minute)
  while working on a kernel;
- ``count``: the kernels instrumented for the per-warp memory accounting
  (csrc/cuda/emulation/memory_traffic.h).

A build is a Python extension module; a process uses it by setting
STCCL_CUDA_EMULATED_LIBRARY to its path before importing stccl_ops, and
``environment(variant, path)`` gives the other variables a sanitizer run needs (its
runtime preloaded: the Python interpreter is not instrumented).

    python -m stccl_ops._cuda_emulation asan   # builds, prints the path
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py builds stccl_ops._C_cuda_emulated from these sources too.
SOURCES = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/cuda/correlation_ops.cpp",
           "csrc/cuda/emulation/emulator.cpp", "csrc/cuda/emulation/kernels.cpp",
           "csrc/cuda/emulation/memory_traffic.cpp", "csrc/cuda/emulation/module.cpp"]
KERNELS = "csrc/cuda/emulation/kernels.cpp"
# Flags of every build of the emulated library, setup.py's included.
FLAGS = ["-fno-math-errno", "-Wno-unknown-pragmas", "-DSTCCL_CUDA_EMULATION",
         "-DSTCCL_OPS_NAMESPACE=stccl_ops_cuda_emulated"]
COMMON = ["-std=c++20", "-fPIC", "-g", *FLAGS]
VARIANTS = {
    # As `pip install` builds it; for working on a kernel without reinstalling.
    "plain": {"cflags": ["-O2"], "ldflags": [], "runtime": None},
    "asan": {"cflags": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                        "-fno-omit-frame-pointer"],
             "ldflags": ["-fsanitize=address,undefined"], "runtime": "libasan.so"},
    "tsan": {"cflags": ["-O1", "-fsanitize=thread"], "ldflags": ["-fsanitize=thread"],
             "runtime": "libtsan.so"},
    # Only the kernels are instrumented, and the hooks are ours (no TSan runtime).
    "count": {"cflags": ["-O2", "-DSTCCL_EMU_COUNT_ACCESSES"], "kernel_cflags": ["-fsanitize=thread"],
              "ldflags": [], "runtime": None},
}
MODULE = "_C_cuda_emulated"


def cuda_include():
    """The toolkit's include folder: CUDA_HOME, else the TOP= that nvcc reports
    (nvcc may be a wrapper script; setup.py finds the root the same way)."""
    home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc")
    if home is None and nvcc is not None:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
        match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        home = match.group(1).strip() if match else str(Path(os.path.realpath(nvcc)).parents[1])
    if home is None or not Path(home, "include", "cuda_fp16.h").exists():
        raise RuntimeError("the emulated CUDA build needs the CUDA toolkit's headers: set CUDA_HOME")
    return str(Path(home, "include"))


def build(variant, jobs=2):
    """Compiles (if a source is newer than the module) and returns its path."""
    os.environ.setdefault("CUDA_HOME", str(Path(cuda_include()).parent))
    from torch.utils import cpp_extension

    if not (ROOT / KERNELS).exists():
        raise RuntimeError(f"stccl_ops: the emulated builds need a source checkout ({ROOT / 'csrc'})")
    spec = VARIANTS[variant]
    out_dir = ROOT / "build" / f"cuda_emulated_{variant}"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    headers = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cu")]
    newest = max(p.stat().st_mtime for p in [*(ROOT / s for s in SOURCES), *headers])
    if target.exists() and target.stat().st_mtime > newest:
        return str(target)
    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), cuda_include(),
                                   sysconfig.get_paths()["include"]]]
    abi = int(__import__("torch")._C._GLIBCXX_USE_CXX11_ABI)
    flags = COMMON + includes + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                                 f"-DTORCH_EXTENSION_NAME={MODULE}",
                                 "-DTORCH_API_INCLUDE_EXTENSION_H"] + spec["cflags"]

    def compile_one(source):
        obj = out_dir / (Path(source).stem + ".o")
        extra = spec.get("kernel_cflags", []) if source == KERNELS else []
        cmd = ["c++", *flags, *extra, "-c", str(ROOT / source), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source} ({variant}) failed:\n{result.stderr[-4000:]}")
        return str(obj)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    cmd = ["c++", "-shared", *objects, "-o", str(target), *spec["ldflags"], *libs,
           "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking the {variant} build failed:\n{result.stderr[-4000:]}")
    return str(target)


def environment(variant, path):
    """os.environ for a process that runs the tests on the `variant` build."""
    env = dict(os.environ, STCCL_CUDA_EMULATED_LIBRARY=path)
    runtime = VARIANTS[variant]["runtime"]
    if runtime:
        lib = subprocess.run(["c++", f"-print-file-name={runtime}"], capture_output=True,
                             text=True).stdout.strip()
        env["LD_PRELOAD"] = lib
    # Torch and Python are not instrumented: leaks at exit are theirs; the
    # kernels' reports stop the run at the first one.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0:second_deadlock_stack=1"
    env["OMP_NUM_THREADS"] = "1"  # torch's own thread pool is not what is under test
    return env


if __name__ == "__main__":
    for name in sys.argv[1:] or ["asan", "tsan", "count"]:
        print(build(name))
