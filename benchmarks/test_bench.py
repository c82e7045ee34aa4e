"""pytest-benchmark microbenchmarks: every available backend on the standard
cases, forward and forward+backward. Run with

    python -m pytest benchmarks/test_bench.py --benchmark-only

(they are not part of the test suite). compare.py prints the full table with
floors and memory.
"""

import pytest
import torch

import stccl_ops
from cases import STANDARD_CASES, make_step  # pytest puts benchmarks/ on sys.path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", stccl_ops.available_backends(DEVICE))
@pytest.mark.parametrize("case", STANDARD_CASES, ids=lambda c: c.name)
def test_correlation(benchmark, case, backend, backward):
    torch.set_num_threads(2)
    step = make_step(case, backend, DEVICE, backward)
    if DEVICE == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(step)
