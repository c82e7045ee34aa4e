"""What can be shown about the CUDA kernels without a GPU: they are compiled to
sm_80 and sm_90 machine code (plus PTX for newer GPUs), use no local memory
(no register spills, no stack), and their ops are registered for CUDA.

On a machine whose build has no CUDA part these tests skip, unless
STCCL_REQUIRE_CUDA_BUILD=1 (set by CI, where nvcc is present) makes that a
failure.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import stccl_ops

BUILT_WITH_CUDA = bool(stccl_ops.build_info().get("cuda"))
REQUIRED = os.environ.get("STCCL_REQUIRE_CUDA_BUILD") == "1"
KERNELS = ("forward_staged_kernel", "forward_unstaged_kernel", "mirror_kernel",
           "inverse_norms_kernel", "weights_kernel", "gather_kernel", "spatiotemporal_kernel",
           "clip_weights_kernel", "clip_gather_kernel")
ARCHS = ("sm_80", "sm_90")


def test_cuda_part_is_built_where_required():
    if REQUIRED:
        assert BUILT_WITH_CUDA, f"STCCL_REQUIRE_CUDA_BUILD=1 but {stccl_ops.build_info()}"


pytestmark = pytest.mark.skipif(not BUILT_WITH_CUDA and not REQUIRED,
                                reason="stccl_extension._C was built without CUDA")


def extension_path():
    from stccl_ops import _extension

    return _extension._C.__file__


def cuobjdump():
    """cuobjdump from the toolkit, PATH, or the copy Triton ships."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    try:
        import triton

        candidates += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                             "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.skip("no cuobjdump found (CUDA toolkit or triton)")


def resource_usage():
    """{arch: {kernel symbol: {"REG": n, "STACK": n, "LOCAL": n, ...}}}"""
    out = subprocess.run([cuobjdump(), "-res-usage", extension_path()], capture_output=True,
                         text=True, check=True).stdout
    usage, arch, function = {}, None, None
    for line in out.splitlines():
        if m := re.match(r"arch = (sm_\d+)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[arch][function] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)",
                                                                      line)}
            function = None
    return usage


def test_machine_code_for_every_kernel_on_sm80_and_sm90():
    usage = resource_usage()
    for arch in ARCHS:
        assert arch in usage, f"no {arch} cubin in {extension_path()}: {sorted(usage)}"
        names = " ".join(usage[arch])
        for kernel in KERNELS:
            assert kernel in names, f"{kernel} missing from the {arch} cubin"
        # 4 dtypes of every kernel family
        assert len(usage[arch]) >= 4 * len(KERNELS)
    assert set(usage["sm_80"]) == set(usage["sm_90"])
    ptx = subprocess.run([cuobjdump(), "--list-ptx", extension_path()], capture_output=True,
                         text=True, check=True).stdout
    assert "sm_90.ptx" in ptx, "no PTX for GPUs newer than sm_90"


def test_no_spills_and_bounded_registers():
    usage = resource_usage()
    report = []
    for arch in ARCHS:
        for function, res in sorted(usage[arch].items()):
            name = re.search(r"(\w+_kernel)I(\w+?)(Li\d+E)?", function)
            report.append(f"{arch} {name.group(0) if name else function}: {res['REG']} registers")
            assert res.get("LOCAL", 0) == 0, f"{arch} {function} spills: {res}"
            assert res.get("STACK", 0) == 0, f"{arch} {function} uses a stack: {res}"
            assert res["REG"] <= 255, f"{arch} {function}: {res}"
    print("\n".join(report))


def test_ops_have_cuda_kernels():
    for op in ("local_correlation", "_local_correlation_backward", "self_correlation",
               "_self_correlation_backward", "temporal_correlation",
               "_temporal_correlation_backward", "spatiotemporal_correlation",
               "_spatiotemporal_correlation_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stccl_ops::{op}", "CUDA"), op


def test_gpu_less_import_and_cpu_use():
    """The CUDA part never breaks a GPU-less process."""
    x = torch.randn(1, 2, 5, 5)
    assert stccl_ops.spatial_correlation(x, backend="cpp").shape == (1, 9, 5, 5)
    if not torch.cuda.is_available():
        assert "cuda" not in stccl_ops.available_backends("cuda")
