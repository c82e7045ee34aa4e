"""The benchmark shapes and one setup function per case, shared by the
comparison CLI (compare.py) and the pytest-benchmark microbenchmarks: the
standard cases, a grid with one case per shape class users have, and the
peers a user would run instead (an F.unfold implementation; the
spatial_correlation_sampler package when it is importable)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import stccl_ops


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "local", "spatial", "temporal" or "spatiotemporal"
    N: int   # N for local/spatial; B for the clip ops
    C: int
    H: int
    W: int
    K: int
    dilation: int = 1
    T: int = 1  # frames (the clip ops)
    dtype: str = "float32"
    Kt: int = 0  # the temporal window of spatiotemporal (K is the spatial one)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def itemsize(self):
        return self.torch_dtype.itemsize

    @property
    def clip(self):
        return self.op in ("temporal", "spatiotemporal")

    def windows(self):
        """(maps correlated, K) per volume the case computes."""
        if self.op == "spatiotemporal":
            return [(self.N * self.T, self.K), (self.N * (self.T - 1), self.Kt)]
        return [(self.N * (self.T - 1) if self.op == "temporal" else self.N, self.K)]

    def input_elements(self):
        maps = self.N * self.T if self.clip else self.N * (1 if self.op == "spatial" else 2)
        return maps * self.C * self.H * self.W

    def output_elements(self):
        return sum(maps * K * K for maps, K in self.windows()) * self.H * self.W

    def flops(self):
        """Multiply-adds of the dot products, 2 flops each."""
        return 2 * self.C * self.H * self.W * sum(maps * K * K for maps, K in self.windows())

    def floor_bytes(self, pass_):
        """The bytes a pass must move, in the case's dtype, each tensor once:
        "fwd" reads the inputs and writes the output; "bwd" reads the inputs
        and grad_out and writes the input gradients; "fwd+bwd" (the step
        compare.py times) reads the inputs, writes the output (the caller
        holds it), reads grad_out and writes the gradients."""
        inputs, output = self.input_elements(), self.output_elements()
        elements = {"fwd": inputs + output, "bwd": 2 * inputs + output,
                    "fwd+bwd": 2 * inputs + 2 * output}[pass_]
        return elements * self.itemsize

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
    # both STCCL volumes of a clip; the "<backend>-separate" rows run the self
    # and temporal ops one after the other
    Case("ST1", "spatiotemporal", 4, 64, 56, 56, 3, T=5, Kt=3),
)

# One case per shape class (compare.py --grid): narrow maps with many channels
# (late CNN stages), many tiny images, few channels on a large image, wide flat
# maps, long clips of narrow frames, half types and float64.
GRID_CASES = (
    Case("narrow-7x7", "local", 16, 1024, 7, 7, 3),
    Case("narrow-14x14", "local", 32, 256, 14, 14, 5),
    Case("tiny-images", "local", 256, 64, 8, 8, 3),
    Case("few-channels", "local", 1, 4, 512, 512, 7),
    Case("wide-flat", "local", 2, 32, 8, 1024, 3),
    Case("clip-narrow", "temporal", 2, 512, 14, 14, 3, T=16),
    Case("S1-bf16", "local", 20, 64, 56, 56, 3, dtype="bfloat16"),
    Case("S1-fp16", "local", 20, 64, 56, 56, 3, dtype="float16"),
    Case("S2-f64", "local", 20, 256, 14, 14, 3, dtype="float64"),
)
ALL_CASES = STANDARD_CASES + GRID_CASES

# What a user would use instead, timed beside the backends.
PEERS = ("unfold", "sampler")


def sampler_available():
    try:
        import spatial_correlation_sampler  # noqa: F401
    except ImportError:
        return False
    return True


def runs_case(case, backend):
    """Whether `backend` takes the case: spatial_correlation_sampler takes
    float32 and float64 only (a half tensor aborts the whole process); the
    separate ops are the alternative to the fused one only."""
    if backend.endswith("-separate"):
        return case.op == "spatiotemporal"
    return backend != "sampler" or case.dtype in ("float32", "float64")


def unfold_local_correlation(a, b, kernel_size, dilation, normalize=True, eps=1e-8):
    """The common hand-written implementation: F.unfold of b (an (N, C*K*K, H*W)
    copy), times a, summed over channels."""
    N, C, H, W = a.shape
    if normalize:
        a, b = F.normalize(a, dim=1, eps=eps), F.normalize(b, dim=1, eps=eps)
    pad = (kernel_size // 2) * dilation
    cols = F.unfold(b, kernel_size, dilation=dilation, padding=pad)
    cols = cols.view(N, C, kernel_size * kernel_size, H, W)
    return (a.unsqueeze(2) * cols).sum(1)


def sampler_local_correlation(a, b, kernel_size, dilation):
    """spatial_correlation_sampler in raw mode: (N, P, P, H, W) -> (N, P*P, H, W)."""
    from spatial_correlation_sampler import spatial_correlation_sample

    out = spatial_correlation_sample(a, b, kernel_size=1, patch_size=kernel_size, stride=1,
                                     padding=0, dilation=1, dilation_patch=dilation)
    return out.view(a.shape[0], kernel_size * kernel_size, *a.shape[-2:])


def make_inputs(case, device="cpu", requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, case.torch_dtype).requires_grad_(
            requires_grad)

    if case.clip:
        return (rand(case.N, case.T, case.C, case.H, case.W),)
    if case.op == "spatial":
        return (rand(case.N, case.C, case.H, case.W),)
    return rand(case.N, case.C, case.H, case.W), rand(case.N, case.C, case.H, case.W)


def _pair_maps(case, inputs):
    """(a, b) as 4-D maps: the frame pairs of a clip, x twice for spatial."""
    if case.op == "temporal":
        v = inputs[0]
        return v[:, :-1].flatten(0, 1), v[:, 1:].flatten(0, 1)
    if case.op == "spatial":
        return inputs[0], inputs[0]
    return inputs


def run_case(case, inputs, backend):
    """The op of `case` on `inputs` with `backend` (a backend, a peer, a
    backend's raw mode "<backend>-raw": the same op with normalize=False, or
    for spatiotemporal cases "<backend>-separate": the self and temporal ops);
    returns the output volume (a tuple of both for spatiotemporal). The peers
    take 4-D maps: a clip's frame pairs are copied into two (what their users
    do)."""
    if case.op == "spatiotemporal":
        return _run_both(case, inputs[0], backend)
    if backend in PEERS:
        a, b = _pair_maps(case, inputs)
        if backend == "unfold":
            return unfold_local_correlation(a, b, case.K, case.dilation)
        return sampler_local_correlation(a, b, case.K, case.dilation)
    window = dict(kernel_size=case.K, dilation=case.dilation)
    if backend.endswith("-raw"):
        backend, window["normalize"] = backend[:-len("-raw")], False
    if case.op == "temporal":
        return stccl_ops.temporal_correlation(inputs[0], backend=backend, **window)
    if case.op == "spatial":
        return stccl_ops.spatial_correlation(inputs[0], backend=backend, **window)
    return stccl_ops.local_correlation(inputs[0], inputs[1], backend=backend, **window)


def _run_both(case, v, backend):
    """Both volumes of a spatiotemporal case: the fused op, or each volume as
    its own case (the separate ops, or a peer on the frames)."""
    if backend.endswith("-separate"):
        backend = backend[:-len("-separate")]
    elif backend not in PEERS:
        window = dict(kernel_size=case.K, temporal_kernel_size=case.Kt)
        if backend.endswith("-raw"):
            backend, window["normalize"] = backend[:-len("-raw")], False
        return tuple(stccl_ops.spatiotemporal_correlation(v, backend=backend, **window))
    spatial = Case(case.name, "spatial", case.N * case.T, case.C, case.H, case.W, case.K,
                   dtype=case.dtype)
    temporal = Case(case.name, "temporal", case.N, case.C, case.H, case.W, case.Kt, T=case.T,
                    dtype=case.dtype)
    return (run_case(spatial, (v.flatten(0, 1),), backend), run_case(temporal, (v,), backend))


def make_step(case, backend, device="cpu", backward=False):
    """A zero-argument callable running one forward (and backward) of the case."""
    inputs = make_inputs(case, device, requires_grad=backward)
    if not backward:
        return lambda: run_case(case, inputs, backend)
    out = run_case(case, inputs, backend)
    outs = out if isinstance(out, tuple) else (out,)
    grad_outs = [torch.randn_like(o) for o in outs]

    def step():
        out = run_case(case, inputs, backend)
        return torch.autograd.grad(out, inputs, grad_outs)

    return step
