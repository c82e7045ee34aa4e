"""Every compiled backend against the reference on fresh random inputs.

The CPU (`cpp`) cases run everywhere the extension is built; the same cases
run for `cuda` on a GPU machine (marker `cuda`, skipped without a GPU) and
for `cuda_emulated`, the CUDA kernels executed on the CPU, wherever that is
built (marker `cuda_emulated`).
"""

import pytest
import torch

import stccl_ops
from stccl_ops import reference

from helpers import (DTYPES, HAS_CUDA_GPU, assert_close, check_infinite_and_nan, grads, leaf,
                     needs_extension, require_cuda_emulated, samples, with_threads)

BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp", marks=needs_extension),
    pytest.param(("cuda", "cuda"), id="cuda",
                 marks=[pytest.mark.cuda,
                        pytest.mark.skipif(not HAS_CUDA_GPU, reason="needs a CUDA GPU")]),
    pytest.param(("cuda_emulated", "cpu"), id="cuda_emulated", marks=pytest.mark.cuda_emulated),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name, device = request.param
    if name == "cuda" and not stccl_ops.build_info().get("cuda"):
        pytest.fail("a GPU is present but stccl_ops._C was built without CUDA")
    if name == "cuda_emulated":
        require_cuda_emulated()
    return name, device


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_local_correlation_forward_backward(backend, dtype, K, dilation, normalize):
    name, device = backend
    seed = K * 100 + dilation * 10 + normalize
    a = leaf(rand((2, 5, 9, 13), dtype, device, seed))
    b = leaf(rand((2, 5, 9, 13), dtype, device, seed + 1))
    g = rand((2, K * K, 9, 13), dtype, device, seed + 2)
    window = (K, dilation, normalize, 1e-8)
    out, (ga, gb) = grads(lambda x, y: stccl_ops.local_correlation(x, y, *window, backend=name),
                          (a, b), g)
    ref, (ra, rb) = grads(lambda x, y: reference.local_correlation(x, y, *window), (a, b), g)
    assert_close(out, ref)
    assert_close(ga, ra, "grad")
    assert_close(gb, rb, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,dilation", [(1, 1), (3, 1), (3, 2), (5, 1), (7, 3), (9, 2)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_spatial_correlation_symmetric_path(backend, dtype, K, dilation, normalize):
    name, device = backend
    x = leaf(rand((2, 6, 11, 8), dtype, device, K + dilation))
    g = rand((2, K * K, 11, 8), dtype, device, 7)
    window = (K, dilation, normalize, 1e-8)
    out, (gx,) = grads(lambda v: stccl_ops.spatial_correlation(v, *window, backend=name), (x,), g)
    ref, (rx,) = grads(lambda v: reference.spatial_correlation(v, *window), (x,), g)
    assert_close(out, ref)
    assert_close(gx, rx, "grad")


@pytest.mark.parametrize("sample", samples(), ids=lambda s: s.name)
@pytest.mark.parametrize("which", ["both", "a", "b"])
def test_samples_and_one_sided_gradients(backend, sample, which):
    name, device = backend
    a = leaf(sample.a.to(device), which in ("both", "a"))
    b = leaf(sample.b.to(device), which in ("both", "b"))
    K = sample.kernel_size
    g = rand((a.shape[0], K * K, *a.shape[2:]), a.dtype, device, 3)
    out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, *sample.window, backend=name),
                     (a, b), g)
    ref, expected = grads(lambda x, y: reference.local_correlation(x, y, *sample.window), (a, b),
                          g)
    assert_close(out, ref)
    for actual, wanted in zip(got, expected):
        assert_close(actual, wanted, "grad")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0),
                                   (0, 0, 0, 0)])
def test_empty_inputs(backend, shape):
    name, device = backend
    a = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(shape, device=device, requires_grad=True)
    out = stccl_ops.local_correlation(a, b, 3, backend=name)
    assert out.shape == (shape[0], 9, *shape[2:])
    assert (out == 0).all()  # C = 0: every vector is zero, so every cosine is 0
    out.sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    x = torch.randn(shape, device=device, requires_grad=True)
    stccl_ops.spatial_correlation(x, 3, backend=name).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["local", "self", "temporal"])
@pytest.mark.parametrize("at_row_ends", [False, True])
def test_infinite_and_nan_inputs_as_the_reference(backend, op, at_row_ends):
    """(The C++ backend's flat layout, which these 6 x 9 maps take, reads the
    next row's pixel with a weight of 0 where a window passes a row's end:
    with values at row ends only its forward is compared.)"""
    name, device = backend
    check_infinite_and_nan(name, op, at_row_ends, device=device,
                           gradients=not (name == "cpp" and at_row_ends))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_vectors_give_zero_and_finite_gradients(backend, dtype):
    name, device = backend
    a = rand((1, 4, 6, 6), dtype, device, 11)
    a[:, :, :3] = 0
    a = leaf(a)
    b = leaf(torch.zeros(1, 4, 6, 6, dtype=dtype, device=device))
    out = stccl_ops.local_correlation(a, b, 3, backend=name)
    assert (out == 0).all()
    out.sum().backward()
    # The gradient at a zero vector is (sum of neighbours) / eps: finite in
    # float32/64, beyond float16's range for eps = 1e-8 (as in the reference),
    # but never NaN.
    assert not a.grad.isnan().any() and not b.grad.isnan().any()
    if dtype in (torch.float32, torch.float64):
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    x = leaf(a.detach())
    y = stccl_ops.spatial_correlation(x, 3, backend=name)
    assert torch.isfinite(y).all() and (y[:, :, :2] == 0).all()
    ref, (rx,) = grads(lambda v: reference.spatial_correlation(v, 3), (x,), torch.ones_like(y))
    y.sum().backward()
    assert_close(y, ref)
    assert not x.grad.isnan().any()
    if dtype in (torch.float32, torch.float64):
        assert_close(x.grad, rx, "grad")


def test_clip_ops_match_reference(backend):
    name, device = backend
    v = leaf(rand((2, 5, 4, 7, 6), torch.float64, device, 5))
    st = stccl_ops.spatiotemporal_correlation(v, 3, 2, temporal_kernel_size=3, frame_stride=2,
                                              backend=name)
    ref_s = reference.spatial_correlation(v, 3, 2)
    ref_t = reference.temporal_correlation(v, 3, frame_stride=2)
    assert_close(st.spatial, ref_s)
    assert_close(st.temporal, ref_t)
    g_s, g_t = torch.randn_like(ref_s), torch.randn_like(ref_t)
    (got,) = torch.autograd.grad((st.spatial * g_s).sum() + (st.temporal * g_t).sum(), v)
    (want,) = torch.autograd.grad((ref_s * g_s).sum() + (ref_t * g_t).sum(), v)
    assert_close(got, want, "grad")
    assert_close(stccl_ops.temporal_correlation(v, backend=name),
                 reference.temporal_correlation(v))


def test_gradcheck_float64(backend):
    name, device = backend
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    a, b = torch.randn(1, 3, 4, 5, **opts), torch.randn(1, 3, 4, 5, **opts)
    for normalize in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, y: stccl_ops.local_correlation(x, y, 3, 2, normalize, backend=name), (a, b))
        assert torch.autograd.gradcheck(
            lambda x: stccl_ops.spatial_correlation(x, 5, 1, normalize, backend=name), (a,))
    v = torch.randn(1, 3, 2, 4, 4, **opts)
    assert torch.autograd.gradcheck(
        lambda x: stccl_ops.temporal_correlation(x, 3, backend=name), (v,))
    assert torch.autograd.gradcheck(
        lambda x: tuple(stccl_ops.spatiotemporal_correlation(x, 3, backend=name)), (v,))


def run_forward_backward(name, a, b, x, g, gx):
    a, b, x = leaf(a), leaf(b), leaf(x)
    out = stccl_ops.local_correlation(a, b, 5, 2, backend=name)
    out.backward(g)
    self_out = stccl_ops.spatial_correlation(x, 5, 2, backend=name)
    self_out.backward(gx)
    return [out, a.grad, b.grad, self_out, x.grad]


def test_bitwise_deterministic_across_runs_and_threads(backend):
    name, device = backend
    a, b, x = (rand((3, 37, 21, 19), torch.float32, device, s) for s in (1, 2, 3))
    g, gx = rand((3, 25, 21, 19), torch.float32, device, 4), rand((3, 25, 21, 19),
                                                                   torch.float32, device, 5)
    first = run_forward_backward(name, a, b, x, g, gx)
    again = run_forward_backward(name, a, b, x, g, gx)
    with with_threads(1):
        single = run_forward_backward(name, a, b, x, g, gx)
    for t0, t1, t2 in zip(first, again, single):
        assert torch.equal(t0, t1) and torch.equal(t0, t2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frame_stride", [1, 2, 3])
@pytest.mark.parametrize("K,dilation", [(1, 1), (3, 1), (5, 2)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_temporal_clip_gradient(backend, dtype, frame_stride, K, dilation, normalize):
    """The temporal op's backward writes the clip gradient itself: frames in
    two pairs, in one, and (T = 4, stride 3) in none."""
    name, device = backend
    v = leaf(rand((2, 4, 5, 6, 7), dtype, device, frame_stride * 10 + K))
    g = rand((2, 4 - frame_stride, K * K, 6, 7), dtype, device, 9)
    window = dict(kernel_size=K, dilation=dilation, normalize=normalize,
                  frame_stride=frame_stride)
    out, (gv,) = grads(lambda x: stccl_ops.temporal_correlation(x, backend=name, **window),
                       (v,), g)
    ref, (rv,) = grads(lambda x: reference.temporal_correlation(x, **window), (v,), g)
    assert_close(out, ref)
    assert_close(gv, rv, "grad")
