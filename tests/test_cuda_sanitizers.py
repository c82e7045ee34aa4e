"""The emulated CUDA kernels under AddressSanitizer + UBSan and under
ThreadSanitizer: a subset of test_cuda_emulated.py, run in a subprocess on a
sanitizer build of the emulated library (stccl_ops._cuda_emulation), sized to
take a few minutes on two cores. Any sanitizer report fails the test.

The subprocess blocks `import triton` (Triton crashes at import under ASan;
nothing here needs it). Build and run by hand with
    python -m pytest tests/test_cuda_sanitizers.py -m sanitizer
"""

import os
import subprocess
import sys

import pytest

from helpers import require_cuda_emulated

pytestmark = [pytest.mark.sanitizer, pytest.mark.cuda_emulated]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ASan: every kernel and branch. TSan (one OS thread per CUDA thread, about 4
# s a case) runs the kernels that share memory between barriers: the staged
# forward, mirror and gather; the unstaged kernels share none (ASan has them).
SUBSETS = {
    "asan": ("test_staged_forward_at_every_bucket or test_windows_of_several_offset_groups or "
             "test_self_correlation_staging_mirror or test_unstaged_kernels or "
             "test_image_and_grid_stride or test_map_sizes or test_strided_operands or "
             "test_temporal_on_clip_views or test_zero_vectors or test_spatiotemporal_kernels"),
    "tsan": ("(test_staged_forward_at_every_bucket and float32) or "
             "(test_windows_of_several_offset_groups and float16) or "
             "(test_self_correlation_staging_mirror and float64 and 5-2) or "
             "test_image_and_grid_stride or "
             "(test_map_sizes and c70_k7 and float32) or "
             "(test_spatiotemporal_kernels and float32 and not halo) or "
             "(test_spatiotemporal_kernels and float16 and groups)"),
}
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer",
           "ERROR: LeakSanitizer")
RUN = ("import sys; sys.modules['triton'] = None; import pytest; "
       "sys.exit(pytest.main(sys.argv[1:]))")


@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_emulated_kernels_under_sanitizer(variant):
    require_cuda_emulated()
    from stccl_ops import _cuda_emulation

    path = _cuda_emulation.build(variant)
    env = _cuda_emulation.environment(variant, path)
    # --capture=sys: a sanitizer writes its report to fd 2 and ends the
    # process; pytest's fd capture would swallow it.
    cmd = [sys.executable, "-c", RUN, "tests/test_cuda_emulated.py", "-q", "-x",
           "-p", "no:cacheprovider", "--capture=sys", "-k", SUBSETS[variant]]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert result.returncode == 0 and not reports, output[-6000:]
    assert " passed" in result.stdout, output[-3000:]
