"""The standard benchmark shapes and one setup function per case, shared by the
comparison CLI (compare.py) and the pytest-benchmark microbenchmarks."""

from dataclasses import dataclass

import torch

import stccl_ops


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "local", "spatial" or "temporal"
    N: int   # N for local/spatial; B for temporal
    C: int
    H: int
    W: int
    K: int
    dilation: int = 1
    T: int = 1  # frames (temporal)

    @property
    def pairs(self):
        """Number of (a-map, b-map) correlations computed."""
        return self.N * (self.T - 1) if self.op == "temporal" else self.N

    def input_elements(self):
        maps = self.N * self.T if self.op == "temporal" else self.N * (1 if self.op == "spatial" else 2)
        return maps * self.C * self.H * self.W

    def output_elements(self):
        return self.pairs * self.K * self.K * self.H * self.W

    def flops(self):
        """Multiply-adds of the dot products, 2 flops each."""
        return 2 * self.pairs * self.C * self.H * self.W * self.K * self.K

    def floor_bytes(self, backward, itemsize=4):
        """Forward: inputs read once + output written once. Forward+backward:
        inputs + grad_out read, input gradients written."""
        if backward:
            return (2 * self.input_elements() + self.output_elements()) * itemsize
        return (self.input_elements() + self.output_elements()) * itemsize

    def floor_flops(self, backward):
        return 3 * self.flops() if backward else self.flops()


STANDARD_CASES = (
    Case("S1", "local", 20, 64, 56, 56, 3),
    Case("S2", "local", 20, 256, 14, 14, 3),
    Case("S3", "local", 8, 128, 64, 64, 7),
    Case("S4", "local", 4, 32, 128, 128, 9, 2),
    Case("T1", "temporal", 4, 64, 56, 56, 3, T=5),
    Case("S1-self", "spatial", 20, 64, 56, 56, 3),
    Case("S3-self", "spatial", 8, 128, 64, 64, 7),
)


def make_inputs(case, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(
            requires_grad)

    if case.op == "temporal":
        return (rand(case.N, case.T, case.C, case.H, case.W),)
    if case.op == "spatial":
        return (rand(case.N, case.C, case.H, case.W),)
    return rand(case.N, case.C, case.H, case.W), rand(case.N, case.C, case.H, case.W)


def run_case(case, inputs, backend):
    """The op of `case` on `inputs` with `backend`; returns the output volume."""
    if case.op == "temporal":
        return stccl_ops.temporal_correlation(inputs[0], case.K, case.dilation, backend=backend)
    if case.op == "spatial":
        return stccl_ops.spatial_correlation(inputs[0], case.K, case.dilation, backend=backend)
    return stccl_ops.local_correlation(inputs[0], inputs[1], case.K, case.dilation,
                                       backend=backend)


def make_step(case, backend, device="cpu", backward=False):
    """A zero-argument callable running one forward (and backward) of the case."""
    inputs = make_inputs(case, device, requires_grad=backward)
    if not backward:
        return lambda: run_case(case, inputs, backend)
    out = run_case(case, inputs, backend)
    grad_out = torch.randn_like(out)

    def step():
        out = run_case(case, inputs, backend)
        return torch.autograd.grad(out, inputs, grad_out)

    return step
