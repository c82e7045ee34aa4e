"""The CUDA emulator's own checks (tests/emulator/selftest.cpp): barriers,
divergence detection, shared memory, launch limits, and the per-warp memory
accounting on access patterns with known answers. Compiled here with the host
compiler; needs the CUDA toolkit's headers, like the emulated build."""

import subprocess

import pytest

from helpers import require_cuda_emulated

pytestmark = pytest.mark.cuda_emulated

SELFTEST = "tests/emulator/selftest.cpp"
RUNTIME = ["csrc/cuda/emulation/emulator.cpp", "csrc/cuda/emulation/memory_traffic.cpp"]


def compile_and_run(tmp_path, counting):
    from stccl_ops import _cuda_emulation

    root = _cuda_emulation.ROOT
    flags = ["-std=c++17", "-O1", "-g", "-Wall", *_cuda_emulation.FLAGS,
             f"-I{_cuda_emulation.cuda_include()}"]
    if counting:
        flags.append("-DSTCCL_EMU_COUNT_ACCESSES")
    objects = []
    for source in [SELFTEST, *RUNTIME]:
        obj = tmp_path / (source.replace("/", "_") + ".o")
        # In the counting build only the kernels' translation unit is instrumented.
        extra = ["-fsanitize=thread"] if counting and source == SELFTEST else []
        subprocess.run(["c++", *flags, *extra, "-c", str(root / source), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        objects.append(str(obj))
    exe = tmp_path / "selftest"
    subprocess.run(["c++", *objects, "-o", str(exe), "-pthread"], check=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("counting", [False, True], ids=["plain", "counting"])
def test_emulator_selftest(tmp_path, counting):
    require_cuda_emulated()
    result = compile_and_run(tmp_path, counting)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("ok") >= (9 if counting else 6)
