"""Shared test helpers: tolerances by dtype, a mismatch report, sample inputs."""

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

import stccl_ops

HAS_EXTENSION = stccl_ops.build_info()["extension"]
HAS_CUDA_GPU = torch.cuda.is_available()
HAS_CUDA_EMULATED = "cuda_emulated" in stccl_ops.available_backends("cpu")
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="stccl_ops._C is not built")
# The CPU SIMD builds this processor runs, best first (avx512, avx2, generic).
CPU_PATHS = (tuple(stccl_ops.build_info()["cpu_simd_paths_runnable"]) if HAS_EXTENSION
             else ("generic",))


def require_cuda_emulated():
    """Skips without the emulated CUDA build, unless the environment says it
    was built (STCCL_CUDA_EMULATION=1, as in CI): then its absence fails."""
    if HAS_CUDA_EMULATED:
        return
    if os.environ.get("STCCL_CUDA_EMULATION") == "1":
        pytest.fail("STCCL_CUDA_EMULATION=1 but stccl_ops._C_cuda_emulated is not importable")
    pytest.skip("the emulated CUDA backend is not built (install with STCCL_CUDA_EMULATION=1)")

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Relative to max(1, max |expected|): cosine outputs lie in [-1, 1]; raw dot
# products and gradients are scaled by their own magnitude. Half types get a
# few units of their epsilon (2^-10, 2^-7): both sides accumulate in float32,
# so the difference is the final rounding plus the rounded saved output.
TOLERANCE = {
    "out": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2},
    "grad": {torch.float64: 1e-11, torch.float32: 5e-5, torch.float16: 1e-2,
             torch.bfloat16: 6e-2},
}


def mismatch_report(actual, expected, tol):
    diff = (actual.double() - expected.double()).abs()
    bad = diff > tol
    where = [tuple(i) for i in bad.nonzero()[:5].tolist()]
    return (f"{int(bad.sum())} of {diff.numel()} elements differ by more than {tol:.3g} "
            f"(max {diff.max().item():.3g}); first at {where}; "
            f"NaN in actual: {bool(actual.isnan().any())}, Inf: {bool(actual.isinf().any())}")


def assert_close(actual, expected, kind="out"):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert torch.isfinite(actual).all(), mismatch_report(actual, expected, 0.0)
    if actual.numel() == 0:
        return
    scale = max(1.0, expected.double().abs().max().item())
    tol = TOLERANCE[kind][expected.dtype] * scale
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= tol, mismatch_report(actual, expected, tol)


def grads(fn, inputs, grad_out):
    """Gradients of sum(fn(*inputs) * grad_out) for the inputs that require grad."""
    out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad_out)


def leaf(t, requires_grad=True):
    """A fresh leaf with the values (and strides) of t."""
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)


@dataclass
class Sample:
    """One input case of local_correlation: a, b, and the window arguments."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    kernel_size: int = 3
    dilation: int = 1
    normalize: bool = True

    @property
    def window(self):
        return (self.kernel_size, self.dilation, self.normalize, 1e-8)


def samples(dtype=torch.float32, device="cpu", seed=0):
    """Odd shapes, every layout, mixed requires_grad: fed to the correctness
    tests, opcheck and the compile test alike."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    out = [
        Sample("basic", rand(2, 4, 7, 9), rand(2, 4, 7, 9)),
        Sample("k5d2_raw", rand(1, 3, 6, 11), rand(1, 3, 6, 11), 5, 2, False),
        Sample("k1", rand(3, 2, 5, 4), rand(3, 2, 5, 4), 1),
        Sample("one_pixel", rand(2, 3, 1, 1), rand(2, 3, 1, 1), 3),
        Sample("smaller_than_window", rand(1, 2, 2, 3), rand(1, 2, 2, 3), 7, 2),
        # With one channel every cosine is +-1 and its exact gradient 0 (pure
        # rounding noise amplified by 1/|a|), so C = 1 is checked in raw mode.
        Sample("c1", rand(2, 1, 5, 6), rand(2, 1, 5, 6), 3, 1, False),
        Sample("channels_last", rand(2, 5, 6, 7).to(memory_format=torch.channels_last),
               rand(2, 5, 6, 7).to(memory_format=torch.channels_last), 3),
        Sample("sliced", rand(2, 8, 9, 12)[:, ::2, 1:, ::2], rand(2, 8, 9, 12)[:, 1::2, :-1, 1::2],
               3, 1),
        Sample("expanded", rand(1, 4, 5, 6).expand(3, 4, 5, 6), rand(3, 4, 5, 6), 3),
        Sample("wide_k9", rand(1, 3, 4, 21), rand(1, 3, 4, 21), 9, 1),
    ]
    z = rand(1, 4, 5, 5)
    z[:, :, 1:3, 2:4] = 0  # zero vectors: cosine 0, never NaN
    out.append(Sample("zero_vectors", z, rand(1, 4, 5, 5), 3))
    return out


@contextlib.contextmanager
def with_threads(n):
    """torch.set_num_threads(n) for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_where_not_finite(actual, expected, kind="out", nan_may_be_inf=False):
    """NaN, +inf and -inf at the same places; the finite values close.
    nan_may_be_inf: where expected is NaN, actual may be infinite instead."""
    nan = torch.isnan(expected)
    if nan_may_be_inf:
        assert (~torch.isfinite(actual[nan])).all()
        actual, expected = actual[~nan], expected[~nan]
    for where in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(where(actual), where(expected)), (where.__name__, actual, expected)
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], kind)


def check_infinite_and_nan(backend, op, at_row_ends, gradients=True, device="cpu"):
    """Infinite and NaN inputs against the reference (float64, 3 x 3 window).
    A neighbour outside the image contributes nothing, not 0 times an
    infinite value: the outputs there stay 0 (both modes), and a raw-mode
    gradient has no term in its own operand. at_row_ends: the values in the
    first and last columns, else inside. The self-correlation's gradient adds
    the weights of x's two roles before multiplying, (g1 + g2) x, where the
    reference adds g1 x + g2 x: with x infinite and g1, g2 of opposite signs
    it is infinite where the reference's is NaN."""
    from stccl_ops import reference

    K, size = 3, (2, 6, 6, 9)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(*size, generator=g, dtype=torch.float64) for _ in range(2))
    columns = (0, 8) if at_row_ends else (3, 5)
    x[0, 1, 0, columns[0]] = float("inf")
    x[1, 2, 4, columns[1]] = float("nan")
    y[0, 3, 5, columns[1]] = float("-inf")
    y[1, 0, 2, columns[0]] = float("inf")
    x, y = x.to(device), y.to(device)
    call, ref_call = {
        "local": (lambda a, b, **kw: stccl_ops.local_correlation(a, b, K, **kw),
                  lambda a, b, **kw: reference.local_correlation(a, b, K, **kw)),
        "self": (lambda a, **kw: stccl_ops.spatial_correlation(a, K, **kw),
                 lambda a, **kw: reference.spatial_correlation(a, K, **kw)),
        "temporal": (lambda v, **kw: stccl_ops.temporal_correlation(v, K, **kw),
                     lambda v, **kw: reference.temporal_correlation(v, K, **kw)),
    }[op]
    inputs = {"local": (x, y), "self": (x,), "temporal": (torch.stack([x, y], 1),)}[op]
    with torch.no_grad():
        for normalize in (True, False):
            assert_same_where_not_finite(call(*inputs, normalize=normalize, backend=backend),
                                         ref_call(*inputs, normalize=normalize))
    if not gradients:
        return
    grad_out = torch.randn(ref_call(*inputs).shape, generator=g,
                           dtype=torch.float64).to(device)
    _, got = grads(lambda *t: call(*t, normalize=False, backend=backend),
                   tuple(map(leaf, inputs)), grad_out)
    _, want = grads(lambda *t: ref_call(*t, normalize=False), tuple(map(leaf, inputs)),
                    grad_out)
    for mine, expected in zip(got, want):
        assert_same_where_not_finite(mine, expected, "grad", nan_may_be_inf=op == "self")
