"""The benchmark floor's byte counts (benchmarks/cases.py) against the tensors
a case's step really reads and writes, on each case scaled down."""

import dataclasses
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from cases import ALL_CASES, make_inputs, run_case  # noqa: E402


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_floor_bytes_count_each_tensor_of_the_step_once(case):
    small = dataclasses.replace(case, N=2, C=3, H=6, W=5, T=min(case.T, 3))
    inputs = make_inputs(small, requires_grad=True)
    outputs = run_case(small, inputs, "reference")
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs])

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    read, written = size(inputs), size(outputs)  # grad_out: one per output, same size
    assert size(grads) == read
    assert small.floor_bytes("fwd") == read + written
    assert small.floor_bytes("bwd") == read + written + size(grads)
    assert small.floor_bytes("fwd+bwd") == read + 2 * written + size(grads)
